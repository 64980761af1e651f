"""Run one stage outside any orchestrator: cache key, inputs, atomic output, manifest.

The Prefect flow (pipeline.flow) is a thin layer over `execute_stage`; tests call it directly.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import logging
import os
import platform
import socket
import tempfile
import time
from dataclasses import dataclass
from functools import lru_cache
from importlib import metadata
from pathlib import Path
from typing import Any

import yaml

from pipeline.nodes import launch_arguments, train_on_ray_nodes
from pipeline.storage import RunStore
from schemas.base import UserInputError, canonical_json, sha256_text
from schemas.config import AlolConfig
from schemas.manifest import Producer, StageOutput
from schemas.stages import STAGE_NAMES
from stages import fs
from stages.io import IntegrityError, StageReader, StageWriter
from stages.torchrun import failure, run_torchrun, torchrun_command

log = logging.getLogger("alol.runner")

PACKAGE_ROOT = Path(__file__).resolve().parent.parent


RESULTS_FOLDER = ".prefect-results"
"""Under run.root: the flow's Prefect result records (one per stage cache key) and its stage locks."""

CACHES = ("run.cache_dir",)
"""Where shared caches live: a stage that uses them may read it, but it is in no cache key (moving
the cache folder changes no output)."""

EXECUTION = ("run.executor", "run.ray_address", "run.workers")
"""Where a data stage computes (stages.executor): read by the stages that map over their rows, in no cache key
(the local and the Ray executor give the same output)."""

PROCESSES = ("train.processes", "train.nodes", "train.rendezvous", "train.gpus_per_node")
"""On how many processes and machines the train stage trains (pipeline.launch): in no cache key (N processes equal one)."""

SFT_PROCESSES = ("reference.sft_processes",)
"""How many processes the reference stage fine-tunes pi_ref on: in no cache key of any stage that reads `reference`."""


@dataclass(frozen=True)
class StageSpec:
    """A stage: its function (`module:function`), the config it reads and the stages it reads from.

    `sections` are section names, or `section.field` for a single field (e.g. `run.seed`): exactly
    what goes into the cache key. `unkeyed` are settings the stage may read that do not change its
    output (CACHES, EXECUTION), whole sections or fields of a keyed section (PROCESSES), which leave the key. The stage function gets a `StageConfig` that refuses to read anything else.
    """

    function: str
    sections: tuple[str, ...]
    upstream: tuple[str, ...]
    accelerator: bool = False
    unkeyed: tuple[str, ...] = ()
    external: str | None = None
    """`module:function` of the config giving what the stage reads from outside the run (ingest: its data
    files' digests; reference, train and evaluate: a local
    reference.model folder's, which they load when pi_ref is the base model), for the cache key."""


STAGES: dict[str, StageSpec] = {
    "ingest": StageSpec("stages.ingest:run", ("data",), (), external="stages.ingest:external_inputs"),
    "score": StageSpec("stages.score:run", ("score",), ("ingest",), unkeyed=CACHES + EXECUTION),
    "reference": StageSpec(
        "stages.reference:run", ("reference", "value", "score", "run.seed"), ("ingest", "score"), True,
        CACHES + EXECUTION + SFT_PROCESSES, external="stages.catalog:reference_model_inputs",
    ),
    "advantage": StageSpec("stages.advantage:run", ("advantage",), ("score", "reference")),
    "train": StageSpec(
        "stages.train:run", ("train", "reference", "score", "run.seed"),
        ("ingest", "score", "reference", "advantage"), True, CACHES + PROCESSES + SFT_PROCESSES,
        external="stages.catalog:reference_model_inputs",
    ),
    "evaluate": StageSpec(
        "stages.evaluate:run", ("evaluate", "reference", "score", "run.seed"),
        ("ingest", "score", "reference", "advantage", "train"), True, CACHES + EXECUTION + SFT_PROCESSES,
        external="stages.catalog:reference_model_inputs",
    ),
}


assert tuple(STAGES) == STAGE_NAMES, "STAGES must list every stage of schemas.stages, in pipeline order"


class MissingUpstreamError(UserInputError, RuntimeError):
    """A stage was asked to run alone but an upstream stage has no output in this run."""


class UndeclaredConfigError(AttributeError):
    """A stage read a config setting it did not declare in STAGES (it would be missing from its cache key)."""


class _SectionView:
    """The declared fields of one config section (e.g. `run.seed` without the rest of `run`)."""

    def __init__(self, stage: str, name: str, section: Any, fields: set[str]):
        self._stage, self._name, self._section, self._fields = stage, name, section, fields

    def __getattr__(self, field: str) -> Any:
        if field.startswith("_") or field not in self._fields:
            raise UndeclaredConfigError(
                f"stage {self._stage!r} read {self._name}.{field}, which it does not declare in pipeline.runner.STAGES"
            )
        return getattr(self._section, field)


class StageConfig:
    """What a stage function sees of the configuration: the sections and fields of its StageSpec
    (`sections` and `unkeyed`), read like an AlolConfig; anything else raises UndeclaredConfigError."""

    def __init__(self, cfg: AlolConfig, stage: str):
        spec = STAGES[stage]
        self._cfg, self._stage = cfg, stage
        self._fields: dict[str, set[str] | None] = {}
        for name in (*spec.sections, *spec.unkeyed):
            section, _, field = name.partition(".")
            if not field:
                self._fields[section] = None
            elif self._fields.get(section, set()) is not None:
                self._fields.setdefault(section, set()).add(field)

    def __getattr__(self, section: str) -> Any:
        if section.startswith("_") or section not in self._fields:
            raise UndeclaredConfigError(
                f"stage {self._stage!r} read config section {section!r}, which it does not declare in pipeline.runner.STAGES"
            )
        fields = self._fields[section]
        value = getattr(self._cfg, section)
        return value if fields is None else _SectionView(self._stage, section, value, fields)


@lru_cache(maxsize=1)
def code_version() -> str:
    """alol's version plus a hash of every source file in stages/ and schemas/: any edit invalidates the caches."""
    digest = hashlib.sha256(_alol_version().encode())
    for package in ("stages", "schemas"):
        for path in sorted((PACKAGE_ROOT / package).rglob("*.py")):
            digest.update(path.relative_to(PACKAGE_ROOT).as_posix().encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def _alol_version() -> str:
    try:
        return metadata.version("alol")
    except metadata.PackageNotFoundError:
        return "0+unknown"


def versions() -> dict[str, str]:
    found = {"python": platform.python_version(), "alol": _alol_version()}
    for pkg in ("torch", "transformers", "accelerate", "duckdb", "pyarrow", "pydantic", "prefect"):
        try:
            found[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    return found


def section_values(cfg: AlolConfig, stage: str) -> dict[str, Any]:
    """The config values a stage reads, keyed by section (or section.field)."""
    dumped = cfg.model_dump(mode="json")
    for name in STAGES[stage].unkeyed:
        section, _, field = name.partition(".")
        if field and section in STAGES[stage].sections:
            dumped[section].pop(field)
    values: dict[str, Any] = {}
    for name in STAGES[stage].sections:
        section, _, field = name.partition(".")
        values[name] = dumped[section][field] if field else dumped[section]
    return values


def stage_fingerprints(cfg: AlolConfig, stage: str) -> dict[str, str]:
    return {name: sha256_text(canonical_json(value)) for name, value in section_values(cfg, stage).items()}


def cache_key(cfg: AlolConfig, stage: str, inputs: dict[str, StageOutput]) -> str:
    """sha256 of (stage, the fingerprints of the config it reads, its inputs' content hashes, what it reads
    from outside the run (StageSpec.external), code version)."""
    missing = set(STAGES[stage].upstream) - set(inputs)
    if missing:
        raise MissingUpstreamError(f"stage {stage!r} needs the output of {sorted(missing)}")
    payload = {
        "stage": stage,
        "config": stage_fingerprints(cfg, stage),
        "inputs": {name: inputs[name].content_hash for name in STAGES[stage].upstream},
        "code": code_version(),
    }
    external = STAGES[stage].external
    if external is not None:
        payload["external"] = _imported(external)(cfg)
    return sha256_text(canonical_json(payload))


def _imported(reference: str):
    """The function a `module:function` reference of STAGES names."""
    module, _, func = reference.partition(":")
    return getattr(importlib.import_module(module), func)


def load_stage_function(stage: str):
    return _imported(STAGES[stage].function)


def reusable_output(store: RunStore, stage: str, key: str) -> StageOutput | None:
    """The committed output for this exact key, if it is present and intact."""
    folder = store.stage_dir(stage, key)
    if not fs.exists(folder):
        return None
    try:
        reader = StageReader(folder)
    except IntegrityError as exc:
        log.warning("recomputing %s: %s", stage, exc)
        return None
    return reader.output() if reader.manifest.cache_key == key else None


def execute_stage(
    cfg: AlolConfig, stage: str, inputs: dict[str, StageOutput], *, refresh: bool = False, store: RunStore | None = None,
    run: str | None = None, run_id: str | None = None,
) -> tuple[StageOutput, bool]:
    """Run `stage` on its upstream outputs, or reuse the intact output with the same cache key.

    `store` is the run's folders (the flow passes the one it uses; default: `RunStore.of(cfg)`); `run`
    and `run_id` name the flow run computing it, for the manifest's `producer`.
    Returns the output handle and whether it was reused. Does not touch run.json (the caller records).
    """
    store = store or RunStore.of(cfg)
    key = cache_key(cfg, stage, inputs)
    if not refresh:
        existing = reusable_output(store, stage, key)
        if existing is not None:
            return existing, True
    launched = cfg.train.processes > 1 or cfg.train.nodes > 1
    if stage == "train" and launched and int(os.environ.get("WORLD_SIZE", "1")) == 1:
        return train_on_processes(cfg, inputs, key, store), False
    readers = {name: StageReader(inputs[name].path) for name in STAGES[stage].upstream}
    writer = StageWriter(store.stage_dir(stage, key))
    try:
        result = load_stage_function(stage)(StageConfig(cfg, stage), readers, writer)
        writer.commit(
            stage=stage,
            cache_key=key,
            result=result,
            config_fingerprints=stage_fingerprints(cfg, stage),
            config=section_values(cfg, stage),
            inputs={name: reader.content_hash for name, reader in readers.items()},
            code_version=code_version(),
            versions=versions(),
            producer=Producer(host=socket.gethostname(), pid=os.getpid(), run=run, run_id=run_id),
        )
    except OSError as exc:
        writer.abort()
        if exc.filename is None and exc.errno is not None and str(writer.dir) not in str(exc):
            # e.g. a full disk while writing a small file: say where, and that nothing was kept.
            raise OSError(exc.errno, f"{exc.strerror or exc}: while stage {stage} wrote {writer.dir} (discarded)") from exc
        raise
    except BaseException:
        writer.abort()
        raise
    return committed_output(store.stage_dir(stage, key)), False


COMMIT_WAIT_SECONDS = 120.0
"""How long a stage that just committed waits for another host committing the same key to finish."""


def committed_output(location: str) -> StageOutput:
    """The output just committed at `location`. In an object store another host may commit the same key at
    the same time (same inputs, so the same files): its commit removes the manifest first and uploads it
    last, so a missing manifest here means wait for that commit, up to COMMIT_WAIT_SECONDS."""
    deadline = time.monotonic() + COMMIT_WAIT_SECONDS
    while True:
        try:
            return StageReader(location, verify=False).output()
        except IntegrityError:
            if not fs.is_remote(location) or time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def upstream_from_run(store: RunStore, stage: str) -> StageOutput:
    """The output a stage that is not being run contributes: what run.json says, checked against its manifest."""
    current = store.current(stage)
    if current is None:
        raise MissingUpstreamError(
            f"run {store.name!r} has no output of stage {stage!r} yet; run it first (alol run --stages {stage})"
        )
    reader = StageReader(current.path)
    return reader.output()


def train_on_processes(cfg: AlolConfig, inputs: dict[str, StageOutput], key: str, store: RunStore) -> StageOutput:
    """Train on cfg.train.processes processes of this machine, or of each of cfg.train.nodes machines, all running
    pipeline.launch under torchrun (stages.torchrun); returns the output their rank-0 process committed under `key`.

    One machine: torchrun --standalone. Several under run.executor ray: the stage places one launcher per node
    (pipeline.nodes). Several under local: this machine is one of them, meeting the others at train.rendezvous
    (each runs the same stage, so has the same key: its first 16 digits are the rendezvous id).
    The configuration goes to the processes as one YAML file (run.storage_options left out: never written to a
    file; the workers use the AWS_* environment variables), the upstream outputs as one JSON file."""
    train = cfg.train
    config_text = yaml.safe_dump(cfg.model_dump(mode="json", exclude={"run": {"storage_options"}}), sort_keys=True)
    inputs_text = json.dumps({n: o.model_dump(mode="json") for n, o in inputs.items()})
    what = f"train on {train.nodes} x {train.processes} processes"
    if train.nodes > 1 and cfg.run.executor == "ray":
        train_on_ray_nodes(cfg, config_text, inputs_text, rendezvous_id=key[:16])
    else:
        with tempfile.TemporaryDirectory(prefix="alol-train-launch-") as folder:
            command = torchrun_command(
                "pipeline.launch", launch_arguments(Path(folder), config_text, inputs_text), train.processes,
                nodes=train.nodes, rendezvous=train.rendezvous, rendezvous_id=key[:16],
            )
            status, tail = run_torchrun(command)
        if status != 0:
            raise failure(what, status, tail)
    output = reusable_output(store, "train", key)
    if output is None:
        raise RuntimeError(f"{what} committed no output under the key {key[:16]}; rerun the stage")
    return output

