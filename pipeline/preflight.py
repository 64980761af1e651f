"""What `alol run` checks before Prefect starts, so that a run that cannot work fails in a second,
writes nothing (no folder, no record) and starts no server.

- The outputs the selected stages read from the run (their upstream stages that are not selected)
  are recorded in run.json and intact.
- The data source is readable when ingest runs: the file (data.source=file), a local folder
  (data.source=datasets), the chatterbot-corpus package (data.source=chatterbot).
- reference.model can be loaded when a selected stage loads it: the built-in name needs its package
  (or its converted folder in run.cache_dir), a local folder needs config.json, a hub name needs the
  local hub cache only when HF_HUB_OFFLINE is set (else it is downloaded, as before).
- the language model of a fluency judge (evaluate.judges) can be loaded when evaluate runs: the built-in
  Gemma-3-270M needs its packages (or its converted folder in run.cache_dir), a local folder needs config.json.
- run.root and the run's folders can be written; on an object store (run.root or run.cache_dir a URL),
  that the credentials, endpoint, bucket and write permission work (one probe object, removed again).
- With run.executor=ray and a stage that maps on Ray (score, reference, evaluate) selected: the ray
  package is installed, run.ray_address answers (a TCP connection to the head's GCS port; `auto` is
  joined), and each stage's run.workers.<stage>.cpus_per_actor and gpus_per_actor fit on some node of
  the cluster (this machine when ray_address is empty and the stage starts its own Ray instance).
- With run.executor=ray, train selected and train.nodes > 1: the cluster has that many live nodes with a
  CPU (and train.gpus_per_node GPUs) each, one per node launcher (Ray would wait for the placement forever).
- A run name is not silently reused for other data: when ingest runs and the run already records
  an ingest output of another data source (data.source, data.path, data.dataset_config), the run
  would replace that record (and `alol report`, `status`, `sql` would show the new data under the
  old name): refused unless `force` (`alol run --force`), with the line to give it its own name.

Each problem is one line naming the setting or file and what to do (`PreflightError.problems`).
Only what would fail anyway is refused: e.g. a missing data file is fine while the ingest output of
the same cache key is committed, since ingest then reuses it without reading the source.
"""

from __future__ import annotations

import importlib.util
import os
import socket
from pathlib import Path

from pipeline.runner import RESULTS_FOLDER, STAGES, cache_key, reusable_output
from pipeline.storage import RunStore
from schemas.base import UserInputError
from schemas.config import AlolConfig
from schemas.reference import SMOLLM2_NAME
from schemas.stages import STAGE_NAMES
from stages import fs
from stages.io import IntegrityError, StageReader


class PreflightError(UserInputError):
    """The run cannot start; `problems` holds one line per problem."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("\n".join(problems))


def check(cfg: AlolConfig, stages: list[str] | None = None, refresh: list[str] | None = None, force: bool = False) -> None:
    """Raise PreflightError listing every problem that would stop a run of `stages` (all by default).
    `force`: a run name that holds another data source may be reused."""
    selected = [s for s in STAGE_NAMES if s in set(stages or STAGE_NAMES)]
    store = RunStore.of(cfg)
    problems = _store_problems(cfg)
    if problems:  # nothing else can be checked on a store that does not answer
        raise PreflightError(problems)
    problems = _unwritable(store, selected)
    upstream, upstream_problems = _recorded_upstream(store, selected)
    problems += upstream_problems
    if "ingest" in selected:
        data_problems = _unreadable_data(cfg)
        if data_problems and not _ingest_reused(cfg, store, refresh or []):
            problems += data_problems
        if not force:
            problems += _another_source(cfg, store)
    if _loads_reference_model(selected, upstream):
        problems += _unavailable_model(cfg)
    if "evaluate" in selected:
        problems += _unavailable_judge_models(cfg)
    problems += _ray_problems(cfg, selected)
    if problems:
        raise PreflightError(problems)


def check_writable(cfg: AlolConfig, stages: list[str] | None = None, force: bool = False) -> None:
    """What a fully cached rerun needs (it reads no data source and loads no model): the store answers, the
    run's folders can be written, and (unless `force`) the run's record is not replaced by other data."""
    selected = [s for s in STAGE_NAMES if s in set(stages or STAGE_NAMES)]
    store = RunStore.of(cfg)
    problems = _store_problems(cfg)
    if not problems:
        problems = _unwritable(store, selected)
        if "ingest" in selected and not force:
            problems += _another_source(cfg, store)
    if problems:
        raise PreflightError(problems)


SOURCE_FIELDS = ("source", "path", "dataset_config")
"""The data.* settings that say which data a run is of (others, e.g. max_rows_per_split, only select from it)."""


def _data_identity(data: dict) -> dict:
    identity = {name: data.get(name) for name in SOURCE_FIELDS}
    path = identity["path"]
    if path and Path(path).expanduser().exists():
        identity["path"] = str(Path(path).expanduser().resolve())
    return identity


def _another_source(cfg: AlolConfig, store: RunStore) -> list[str]:
    """One line when the run already records an ingest output of other data than cfg.data."""
    try:
        recorded = store.current("ingest")
    except (ValueError, OSError):  # run.json unreadable or run.root not a folder: said by the other checks
        return []
    if recorded is None:
        return []
    try:
        previous = StageReader(recorded.path, verify=False).manifest.config.get("data")
    except IntegrityError:  # gone or damaged: the run recomputes it anyway
        return []
    if not previous:
        return []
    old, new = _data_identity(previous), _data_identity(cfg.data.model_dump(mode="json"))
    if old == new:
        return []
    spell = lambda d: ", ".join(f"data.{k}={d[k]}" for k in SOURCE_FIELDS if d[k] is not None)  # noqa: E731
    return [
        f"run {store.name!r} already holds other data ({spell(old)}); give this run ({spell(new)}) its own name: "
        f"--set run.name=NAME (or --force to replace the run's record)"
    ]


RAY_STAGES = ("score", "reference", "evaluate")
"""The stages that map over their rows on Ray under run.executor=ray (stages.executor)."""
CONNECT_SECONDS = 5.0


def _ray_problems(cfg: AlolConfig, selected: list[str]) -> list[str]:
    """One line if Ray is missing or run.ray_address does not answer; one per stage and resource (CPUs, GPUs)
    that an actor asks more of than any node has (Ray would wait for such an actor forever); one if train asks
    for more nodes (train.nodes, each 1 CPU and train.gpus_per_node GPUs) than the cluster has alive."""
    mapped = [s for s in RAY_STAGES if s in selected]
    on_nodes = "train" in selected and cfg.train.nodes > 1
    if cfg.run.executor != "ray" or not (mapped or on_nodes):
        return []
    if importlib.util.find_spec("ray") is None:
        return ["run.executor is ray but the ray package is not installed: pip install -e '.[ray]' (or --set run.executor=local)"]
    address = cfg.run.ray_address
    if address and address != "auto":
        problem = _unreachable(address)
        if problem:
            return [problem]
    try:
        nodes, where = _node_resources(address)
    except Exception as error:  # ray.init's errors are many kinds; the line says which address and why
        return [f"run.ray_address {address}: cannot join the Ray cluster ({type(error).__name__}: {str(error).splitlines()[0]}); "
                "start it (ray start --head) or fix the address"]
    problems = []
    for stage in mapped:
        workers = getattr(cfg.run.workers, stage)
        for resource, field in (("CPU", "cpus_per_actor"), ("GPU", "gpus_per_actor")):
            need = getattr(workers, field)
            if need > 0 and not any(node.get(resource, 0.0) >= need for node in nodes):
                most = max((node.get(resource, 0.0) for node in nodes), default=0.0)
                problems.append(
                    f"run.workers.{stage}.{field} is {need:g} but no node of {where} has that many {resource}s (the most "
                    f"on one node: {most:g}); lower it (--set run.workers.{stage}.{field}={most:g}) or add a larger node"
                )
    if on_nodes:
        gpus = cfg.train.gpus_per_node
        fitting = sum(node.get("CPU", 0.0) >= 1 and node.get("GPU", 0.0) >= gpus for node in nodes)
        if fitting < cfg.train.nodes:
            each = "1 CPU" + (f" and {gpus} GPUs" if gpus else "")
            problems.append(
                f"train.nodes is {cfg.train.nodes} but {where} has {fitting} live node(s) with {each} (one launcher "
                f"per node); lower it (--set train.nodes={max(fitting, 1)}) or add nodes (ray start --address <head>)"
            )
    return problems


def _unreachable(address: str) -> str | None:
    """A line when nothing listens at the head's `host:port` (or `ray://host:port`) within CONNECT_SECONDS."""
    host, _, port = address.partition("://")[2 if "://" in address else 0].rpartition(":")
    if not host or not port.isdigit():
        return f"run.ray_address {address!r} is not host:port (or ray://host:port, or auto); give the head's GCS address, e.g. 10.0.0.1:6379"
    try:
        socket.create_connection((host, int(port)), timeout=CONNECT_SECONDS).close()
    except OSError as error:
        reason = error.strerror or type(error).__name__
        return f"run.ray_address {address}: no Ray cluster answers there ({reason}); start its head (ray start --head --port {port}) or fix the address"
    return None


def _node_resources(address: str) -> tuple[list[dict[str, float]], str]:
    """CPUs and GPUs of each live node of the cluster at `address` (joined as the stages will join it), or of
    this machine when `address` is empty (the stage starts a Ray instance here)."""
    if not address:
        import torch

        here = {"CPU": float(os.cpu_count() or 1), "GPU": float(torch.cuda.device_count())}
        return [here], "this machine (run.ray_address is empty: a Ray instance starts here)"
    import ray

    from stages.executor import ray_session

    joined = ray_session(address)
    nodes = [{k: float(n["Resources"].get(k, 0)) for k in ("CPU", "GPU")} for n in ray.nodes() if n.get("Alive")]
    return nodes, f"the Ray cluster at {joined}"


def _looks_like_a_path(name: str) -> bool:
    """A name that can only mean a local path: hub ids are `name` or `owner/name`."""
    return name.startswith(("/", "./", "../", "~")) or name.count("/") > 1 or "\\" in name


def _store_problems(cfg: AlolConfig) -> list[str]:
    """One line for each object store setting (run.root, run.cache_dir) that cannot be written."""
    problems = []
    failed_buckets = set()
    for setting, url in (("run.root", cfg.run.root), ("run.cache_dir", cfg.run.cache_dir)):
        bucket = url.partition("://")[2].split("/")[0]
        if not fs.is_remote(url) or bucket in failed_buckets:  # one line for one bucket that cannot be used
            continue
        problem = fs.probe_writable(fs.location(url))
        if problem is not None:
            problems.append(f"{setting} {problem}")
            failed_buckets.add(bucket)
    return problems


def _unwritable(store: RunStore, selected: list[str]) -> list[str]:
    if fs.is_remote(store.root):
        return []  # probed by _store_problems
    problems: list[str] = []
    seen: set[Path] = set()
    for folder in (store.dir, *(store.dir / s for s in selected), store.root / RESULTS_FOLDER):
        existing = next(p for p in (folder, *folder.parents) if p.exists())
        if existing in seen:
            continue
        seen.add(existing)
        if not existing.is_dir():
            problems.append(f"run.root {store.root}: {existing} is a file, not a folder; remove it or choose another run.root (--set run.root=FOLDER)")
        elif not os.access(existing, os.W_OK | os.X_OK):
            problems.append(f"run.root {store.root}: cannot write in {existing} (permission denied); choose a writable run.root (--set run.root=FOLDER)")
    return problems


def _recorded_upstream(store: RunStore, selected: list[str]) -> tuple[dict[str, StageReader], list[str]]:
    """The verified outputs run.json records for the upstream stages that are not selected, and the problems."""
    needed = [s for s in STAGE_NAMES if s not in selected and any(s in STAGES[x].upstream for x in selected)]
    if not needed:
        return {}, []
    try:
        recorded = {s: store.current(s) for s in needed}
    except ValueError as exc:  # run.json is not JSON (or not ours)
        return {}, [f"{store.state_path}: unreadable ({exc}); move it away to start the run afresh"]
    missing = [s for s in needed if recorded[s] is None]
    problems: list[str] = []
    if missing:
        readers_of = [x for x in selected if set(STAGES[x].upstream) & set(missing)]
        stages = " ".join(s for s in STAGE_NAMES if s in missing or s in selected)
        problems.append(
            f"run {store.name!r} has no output of {', '.join(missing)} (not in {store.state_path}), which "
            f"{', '.join(readers_of)} {'reads' if len(readers_of) == 1 else 'read'}; run {'it' if len(missing) == 1 else 'them'} "
            f"too: --stages {stages}"
        )
    readers: dict[str, StageReader] = {}
    for stage in (s for s in needed if recorded[s] is not None):
        try:
            readers[stage] = StageReader(recorded[stage].path)
        except IntegrityError as exc:
            stages = " ".join(s for s in STAGE_NAMES if s == stage or s in selected)
            problems.append(f"the {stage} output recorded in {store.state_path} is damaged ({exc}); run it again: --stages {stages}")
    return readers, problems


def _ingest_reused(cfg: AlolConfig, store: RunStore, refresh: list[str]) -> bool:
    """Whether ingest will reuse a committed output of its cache key (and so not read the source)."""
    return "ingest" not in refresh and reusable_output(store, "ingest", cache_key(cfg, "ingest", {})) is not None


def _unreadable_data(cfg: AlolConfig) -> list[str]:
    data = cfg.data
    if data.source == "chatterbot":
        from stages.ingest.sources import chatterbot_files

        try:
            found = chatterbot_files()
        except UserInputError as exc:
            return [f"data.source chatterbot: {exc}"]
        return [] if found else ["data.source chatterbot: the chatterbot-corpus package holds no English corpus files; reinstall it (make setup)"]
    path = Path(data.path)
    if data.source == "file":
        from stages.ingest.sources import FILE_SUFFIXES

        if not path.exists():
            return [f"data.path {path}: no such file; give an existing {', '.join(FILE_SUFFIXES)} file (--set data.path=FILE)"]
        if path.is_dir():
            return [f"data.path {path}: a folder, but data.source=file reads one file (a saved or file-based dataset folder: data.source=datasets)"]
        if path.suffix.lower() not in FILE_SUFFIXES:
            return [f"data.path {path}: unknown file type {path.suffix!r}; expected one of {', '.join(FILE_SUFFIXES)}"]
        try:
            with open(path, "rb"):
                pass
        except OSError as exc:
            return [f"data.path {path}: cannot read it ({exc.strerror}); fix its permissions or give another file"]
        return []
    # data.source=datasets: a local file or folder, else a hub name that `datasets` resolves itself.
    if path.exists():
        if not os.access(path, os.R_OK | (os.X_OK if path.is_dir() else 0)):
            return [f"data.path {path}: cannot read it (permission denied); fix its permissions or give another dataset"]
        return []
    if _looks_like_a_path(data.path):
        return [f"data.path {path}: no such file or folder; give a saved dataset folder or a hub dataset name"]
    return []


def _loads_reference_model(selected: list[str], upstream: dict[str, StageReader]) -> bool:
    """Reference loads reference.model; train and evaluate load it too when pi_ref is the base model
    (not fine-tuned), which the reference output says when it is not being recomputed."""
    if "reference" in selected:
        return True
    if not any(s in selected for s in ("train", "evaluate")):
        return False
    reference = upstream.get("reference")
    if reference is None:  # missing or damaged: already a problem of its own
        return False
    try:
        return reference.metrics.pi_ref == "base"
    except ValueError:  # metrics of another schema version: the stage will say so; check the model anyway
        return True


def _unavailable_model(cfg: AlolConfig) -> list[str]:
    name = cfg.reference.model
    if name == SMOLLM2_NAME:
        from stages.models import store

        # resolve_model's converted folder: present, it needs the package no more.
        if store.shared_model_committed(cfg.run.cache_dir):
            return []
        try:
            store.smollm2_gguf_path()
        except store.ModelNotFoundError as exc:
            return [f"{exc} (or set reference.model to a local model folder)"]
        return []
    folder = Path(name).expanduser()
    if folder.is_dir():
        if not (folder / "config.json").is_file():
            return [f"reference.model {folder}: the folder has no config.json; give a transformers model folder"]
        return []
    if folder.exists() or _looks_like_a_path(name):
        return [f"reference.model {folder}: no such folder; give a transformers model folder, a hub name or {SMOLLM2_NAME!r}"]
    from stages.models.store import hub_folder

    return _not_in_offline_hub_cache(name, hub_folder(cfg.run.cache_dir))


def _unavailable_judge_models(cfg: AlolConfig) -> list[str]:
    from stages.models import store

    problems = []
    for judge in cfg.evaluate.judges:
        if judge.kind != "fluency":
            continue
        name = judge.options.model
        if name == store.GEMMA3:
            if (Path(cfg.run.cache_dir).resolve() / "models" / store.GEMMA3).is_dir():
                continue
            try:
                store.gemma3_gguf_module()
            except store.ModelNotFoundError as exc:
                problems.append(f"evaluate.judges {judge.name!r}: {exc} (or remove the judge: --set evaluate.judges=[])")
        elif not (Path(name).expanduser() / "config.json").is_file():
            problems.append(f"evaluate.judges {judge.name!r}: {name} is not a model folder with a config.json")
    return problems


def _not_in_offline_hub_cache(name: str, hub_dir: Path) -> list[str]:
    """A hub name is downloaded into `hub_dir` when online; offline (HF_HUB_OFFLINE or
    TRANSFORMERS_OFFLINE, read by huggingface_hub at import) only a cached snapshot loads."""
    from huggingface_hub import constants, try_to_load_from_cache

    if not constants.HF_HUB_OFFLINE:
        return []
    try:
        cached = try_to_load_from_cache(name, "config.json", cache_dir=hub_dir)
    except ValueError as exc:  # not a valid hub id
        return [f"reference.model {name!r}: not {SMOLLM2_NAME!r}, not a local folder and not a hub name ({exc})"]
    if isinstance(cached, str):
        return []
    return [
        f"reference.model {name!r}: not in the local hub cache {hub_dir} and HF_HUB_OFFLINE is set; unset "
        "HF_HUB_OFFLINE (and TRANSFORMERS_OFFLINE) to download it, or set reference.model to a local model folder"
    ]
