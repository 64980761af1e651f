"""Score stage: every ingest row (all splits) gets one column per reward component and the total

    reward = sum_c weight_c x score_c,        R_max = sum_c weight_c x upper_c

Scoring is one reusable object, `Scorer.score(prompts, responses)`, used again by the reference stage
(pi_ref's samples) and the evaluate stage (generations) through `load_scorer`. In this stage each
component's column is cached on its own (`<run.cache_dir>/scores`), keyed by the component's kind,
options, model fingerprint, code and the ingest content hash, so a new weight only recomputes the sum
and a new component only runs its own model.

Outputs: table `score` (id, one float64 column per component, reward) and `scorer_state.json` (state
fitted on the training responses, e.g. the tf-idf vocabulary). Metrics: `r_max`, `r_min`, `weights`,
`components` (per component: kind, weight, bounds, mean, std, min, max, fingerprint, cache_key, cached,
seconds spent in this run, compute_seconds and rows_per_s of the scoring itself, now or when it was
cached) and `reward` (mean, std, min, max).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
from tqdm.auto import tqdm

from pipeline.storage import StageReader, StageWriter
from schemas.base import canonical_json, sha256_text
from schemas.config import AlolConfig
from schemas.manifest import StageResult
from schemas.score import ComponentConfig, ScoreConfig, score_schema
from stages.rewards import COMPONENTS, RewardComponent, ScoreError, build_component
from stages.rewards.base import Prompt, torch_device
from stages.rewards.cache import ScoreCache

log = logging.getLogger("alol.score")
STATE_FILE = "scorer_state.json"
WRITE_ROWS = 65_536


class Scorer:
    """The configured reward components: `score(prompts, responses)` -> {component name: scores, "reward": R}."""

    def __init__(self, config: ScoreConfig, states: dict[str, dict[str, Any] | None] | None = None):
        states = states or {}
        self.config = config
        self.batch_size = config.batch_size
        device = torch_device(config.device)
        self.configs: dict[str, ComponentConfig] = {c.name: c for c in config.components}
        self.components: dict[str, RewardComponent] = {
            c.name: build_component(c, device, states.get(c.name)) for c in config.components
        }

    @property
    def component_names(self) -> list[str]:
        return list(self.configs)

    @property
    def weights(self) -> dict[str, float]:
        return {name: c.weight for name, c in self.configs.items()}

    @property
    def r_max(self) -> float:
        """sum of weight x upper bound: the largest reward, scale of the value head."""
        return float(sum(c.weight * self.components[n].upper for n, c in self.configs.items()))

    @property
    def r_min(self) -> float:
        return float(sum(c.weight * self.components[n].lower for n, c in self.configs.items()))

    def score_component(
        self, name: str, prompts: list[Prompt], responses: list[str], ids: list[str] | None = None, progress: tqdm | None = None
    ) -> np.ndarray:
        """One component's scores, in batches of `batch_size`, each checked against the declared bounds."""
        component = self.components[name]
        scores = np.empty(len(responses), dtype=np.float64)
        for start in range(0, len(responses), self.batch_size):
            stop = min(start + self.batch_size, len(responses))
            scores[start:stop] = component.score(prompts[start:stop], responses[start:stop])
            if progress is not None:
                progress.update(stop - start)
        check_scores(name, component, scores, ids)
        return scores

    def combine(self, columns: dict[str, np.ndarray]) -> np.ndarray:
        """reward = sum over components of weight x score."""
        reward = np.zeros(len(next(iter(columns.values()))), dtype=np.float64)
        for name, weight in self.weights.items():
            reward += weight * columns[name]
        return reward

    def score(
        self, prompts: list[Prompt], responses: list[str], ids: list[str] | None = None, progress: bool = True
    ) -> dict[str, np.ndarray]:
        """{component name: float64 scores, "reward": weighted sum}; `ids` only name rows in errors."""
        if len(prompts) != len(responses):
            raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
        columns = {}
        for name in self.component_names:
            with tqdm(total=len(responses), desc=f"score {name}", unit="rows", disable=not progress) as bar:
                columns[name] = self.score_component(name, prompts, responses, ids, bar)
        columns["reward"] = self.combine(columns)
        return columns


def check_scores(name: str, component: RewardComponent, scores: np.ndarray, ids: list[str] | None) -> None:
    """NaN, infinite or out-of-bounds scores are errors naming the component and the first bad row."""
    bad = ~np.isfinite(scores) | (scores < component.lower) | (scores > component.upper)
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        where = f"row id {ids[row]!r}" if ids is not None else f"row {row}"
        value = float(scores[row])
        problem = "not a finite number" if not np.isfinite(value) else "outside its declared bounds"
        raise ScoreError(
            f"reward component {name!r} ({component.kind}): {where} scored {value}, {problem} "
            f"[{component.lower}, {component.upper}] ({int(bad.sum())} bad rows in this batch)"
        )


def fit_states(config: ScoreConfig, train_responses: Iterator[str] | list[str]) -> dict[str, dict[str, Any] | None]:
    """State of each component that learns from the training responses (tf-idf); None for the others."""
    fitted = [c.name for c in config.components if COMPONENTS[c.kind].fitted]
    responses = list(train_responses) if fitted else []
    if fitted and not responses:
        raise ValueError(f"components {fitted} are fit on the training responses, but the input has no train rows")
    return {c.name: COMPONENTS[c.kind].fit(c.options, responses) if c.name in fitted else None for c in config.components}


def load_scorer(cfg: AlolConfig, score_stage: StageReader) -> Scorer:
    """The Scorer of `cfg.score` with the state the score stage fitted (read from its `scorer_state.json`)."""
    path = score_stage.path(STATE_FILE)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: the score stage output has no {STATE_FILE}; rerun the score stage")
    states = json.loads(path.read_text(encoding="utf-8"))["components"]
    missing = [c.name for c in cfg.score.components if COMPONENTS[c.kind].fitted and states.get(c.name) is None]
    if missing:
        raise ValueError(
            f"{path}: no fitted state for components {missing}; the score stage ran with another score config, rerun it"
        )
    return Scorer(cfg.score, states)


def component_cache_key(config: ComponentConfig, component: RewardComponent, fingerprint: str | None, input_hash: str) -> str:
    """sha256 of what determines a component's scores: kind, options, model fingerprint, code and input (not name or weight)."""
    payload = {
        "kind": config.kind,
        "options": config.options.model_dump(mode="json"),
        "model": fingerprint,
        "code": component.code_fingerprint(),
        "input": input_hash,
    }
    return sha256_text(canonical_json(payload))


def score_column(
    scorer: Scorer, name: str, dataset: pads.Dataset, ids: pa.Array, input_hash: str, cache: ScoreCache
) -> tuple[np.ndarray, dict[str, Any]]:
    """One component's scores over the whole ingest table, from the cache or computed (then cached)."""
    component = scorer.components[name]
    fingerprint = component.fingerprint()
    key = component_cache_key(scorer.configs[name], component, fingerprint, input_hash)
    started = time.perf_counter()
    hit = cache.load(key, ids)
    if hit is not None:
        scores, meta = hit
        log.info("score %s: reusing cached scores (%s)", name, cache.path(key))
        compute_seconds = meta.get("seconds")
    else:
        scores = np.empty(len(ids), dtype=np.float64)
        offset = 0
        with tqdm(total=len(ids), desc=f"score {name}", unit="rows") as bar:
            for batch in dataset.to_batches(columns=["id", "prompt", "response"], batch_size=scorer.batch_size):
                batch_ids = batch.column("id").to_pylist()
                if batch_ids != ids[offset : offset + len(batch_ids)].to_pylist():
                    raise RuntimeError(f"ingest rows came back in a different order near row {offset}; rerun the stage")
                prompts, responses = batch.column("prompt").to_pylist(), batch.column("response").to_pylist()
                scores[offset : offset + len(batch_ids)] = scorer.score_component(name, prompts, responses, batch_ids, bar)
                offset += len(batch_ids)
        compute_seconds = time.perf_counter() - started
        cache.save(key, ids, scores, {"component": name, "kind": component.kind, "seconds": compute_seconds, "rows": len(ids)})
    seconds = time.perf_counter() - started
    stats = {
        "kind": component.kind,
        "weight": scorer.configs[name].weight,
        "lower": component.lower,
        "upper": component.upper,
        **summary(scores),
        "fingerprint": fingerprint,
        "cache_key": key,
        "cached": hit is not None,
        "seconds": round(seconds, 4),
        "compute_seconds": compute_seconds,
        "rows_per_s": round(len(ids) / compute_seconds, 1) if compute_seconds else None,
    }
    return scores, stats


def summary(values: np.ndarray) -> dict[str, float | None]:
    if len(values) == 0:
        return {"mean": None, "std": None, "min": None, "max": None}
    return {"mean": float(values.mean()), "std": float(values.std()), "min": float(values.min()), "max": float(values.max())}


def train_responses(dataset: pads.Dataset) -> Iterator[str]:
    for batch in dataset.to_batches(columns=["response"], filter=pc.field("split") == "train"):
        yield from batch.column("response").to_pylist()


def run(cfg: AlolConfig, inputs: dict[str, StageReader], out: StageWriter) -> StageResult:
    ingest = inputs["ingest"]
    dataset = ingest.dataset("ingest")
    ids = dataset.to_table(columns=["id"]).column("id").combine_chunks()
    states = fit_states(cfg.score, train_responses(dataset))
    out.path(STATE_FILE).write_text(json.dumps({"components": states}, sort_keys=True), encoding="utf-8")
    scorer = Scorer(cfg.score, states)
    cache = ScoreCache(Path(cfg.run.cache_dir) / "scores")

    columns: dict[str, np.ndarray] = {}
    stats: dict[str, dict[str, Any]] = {}
    for name in scorer.component_names:
        columns[name], stats[name] = score_column(scorer, name, dataset, ids, ingest.content_hash, cache)
    reward = scorer.combine(columns)

    schema = score_schema(scorer.component_names)
    with out.table("score", schema) as table:
        for start in range(0, len(ids), WRITE_ROWS):
            stop = min(start + WRITE_ROWS, len(ids))
            arrays = [ids[start:stop]] + [pa.array(columns[n][start:stop]) for n in scorer.component_names]
            table.write(pa.Table.from_arrays(arrays + [pa.array(reward[start:stop])], schema=schema))

    log.info("score: %d rows, R_max %.3g, mean reward %.4g", len(ids), scorer.r_max, reward.mean() if len(ids) else float("nan"))
    metrics = {
        "r_max": scorer.r_max,
        "r_min": scorer.r_min,
        "weights": scorer.weights,
        "components": stats,
        "reward": summary(reward),
    }
    return StageResult(rows_in=len(ids), rows_out=len(ids), metrics=metrics)
