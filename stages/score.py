"""Score stage: every ingest row (all splits) gets one column per reward component and the total

    reward = sum_c weight_c x score_c,        R_max = sum_c weight_c x upper_c

Scoring is one reusable object, `stages.rewards.scorer.Scorer`, used again by the reference stage
(pi_ref's samples) and the evaluate stage (generations) through `stages.catalog.load_scorer`. In this stage each
component's column is cached on its own (`<run.cache_dir>/scores`, a stages.cache.ParquetCache of
(id, score) tables), keyed by the component's kind, options, model fingerprint, code and the ingest
content hash but not its name or weight, so a new weight or a renamed component only recomputes the
sum and a new component only runs its own model.

Outputs: table `score` (id, one float64 column per component, reward) and `scorer_state.json` (state
fitted on the training responses, e.g. the tf-idf vocabulary). Metrics: schemas.score.ScoreMetrics.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
from tqdm.auto import tqdm

from schemas.config import AlolConfig
from schemas.manifest import StageResult, Summary
from schemas.score import ComponentStats, ScoreMetrics, score_schema
from stages.cache import ParquetCache
from stages.catalog import SCORER_STATE
from stages.faults import failpoint
from stages.io import StageReader, StageWriter
from stages.rewards.scorer import Scorer, component_cache_key, fit_states

log = logging.getLogger("alol.score")
WRITE_ROWS = 65_536
CACHE_SCHEMA = pa.schema([("id", pa.string()), ("score", pa.float64())])


def score_column(
    scorer: Scorer, name: str, dataset: pads.Dataset, ids: pa.Array, input_hash: str, cache: ParquetCache
) -> tuple[np.ndarray, ComponentStats]:
    """One component's scores over the whole ingest table, from the cache or computed (then cached)."""
    component = scorer.components[name]
    fingerprint = component.fingerprint()
    key = component_cache_key(scorer.configs[name], component, fingerprint, input_hash)
    started = time.perf_counter()
    hit = cache.load(key, ids)
    if hit is not None:
        scores = hit.table.column("score").to_numpy()
        log.info("score %s: reusing cached scores (%s)", name, cache.path(key))
        compute_seconds = hit.meta.get("seconds")
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
        cache.save(
            key, pa.table({"id": ids, "score": pa.array(scores, pa.float64())}, schema=CACHE_SCHEMA),
            {"component": name, "kind": component.kind, "seconds": compute_seconds, "rows": len(ids)},
        )
        failpoint("score.component_cached")
    seconds = time.perf_counter() - started
    stats = ComponentStats(
        kind=component.kind,
        weight=scorer.configs[name].weight,
        lower=component.lower,
        upper=component.upper,
        **Summary.of(scores).model_dump(),
        fingerprint=fingerprint,
        cache_key=key,
        cached=hit is not None,
        seconds=round(seconds, 4),
        compute_seconds=compute_seconds,
        rows_per_s=round(len(ids) / compute_seconds, 1) if compute_seconds else None,
    )
    return scores, stats


def train_responses(dataset: pads.Dataset) -> Iterator[str]:
    for batch in dataset.to_batches(columns=["response"], filter=pc.field("split") == "train"):
        yield from batch.column("response").to_pylist()


def run(cfg: AlolConfig, inputs: dict[str, StageReader], out: StageWriter) -> StageResult:
    ingest = inputs["ingest"]
    dataset = ingest.dataset("ingest")
    ids = dataset.to_table(columns=["id"]).column("id").combine_chunks()
    states = fit_states(cfg.score, train_responses(dataset))
    out.path(SCORER_STATE).write_text(json.dumps({"components": states}, sort_keys=True), encoding="utf-8")
    scorer = Scorer(cfg.score, states)
    cache = ParquetCache.under(cfg.run.cache_dir, "scores")

    columns: dict[str, np.ndarray] = {}
    stats: dict[str, ComponentStats] = {}
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
    metrics = ScoreMetrics(r_max=scorer.r_max, r_min=scorer.r_min, weights=scorer.weights, components=stats, reward=Summary.of(reward))
    return StageResult(rows_in=len(ids), rows_out=len(ids), metrics=metrics)
