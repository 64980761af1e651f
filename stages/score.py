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
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads

from schemas.config import AlolConfig
from schemas.manifest import StageResult, Summary
from schemas.score import ComponentStats, ScoreMetrics, score_schema
from stages.cache import ParquetCache
from stages.catalog import SCORER_STATE
from stages.executor import ShardMapper
from stages.faults import failpoint
from stages.io import StageReader, StageWriter
from stages.rewards.scorer import Scorer, component_cache_key, fit_states
from stages.rewards.shards import ComponentShards

log = logging.getLogger("alol.score")
WRITE_ROWS = 65_536
CACHE_SCHEMA = pa.schema([("id", pa.string()), ("score", pa.float64())])


def score_column(
    scorer: Scorer, states: dict[str, dict[str, Any] | None], name: str, rows: pa.Table, input_hash: str,
    cache: ParquetCache, mapper: ShardMapper,
) -> tuple[np.ndarray, ComponentStats]:
    """One component's scores over the whole ingest table (`rows`: id, prompt, response), from the cache or
    computed through `mapper` (then cached)."""
    component = scorer.components[name]
    fingerprint = component.fingerprint()
    key = component_cache_key(scorer.configs[name], component, fingerprint, input_hash)
    started = time.perf_counter()
    ids = rows.column("id").combine_chunks()
    hit = cache.load(key, ids)
    if hit is not None:
        scores = hit.table.column("score").to_numpy()
        log.info("score %s: reusing cached scores (%s)", name, cache.path(key))
        compute_seconds = hit.meta.get("seconds")
    else:
        shards = ComponentShards(scorer.config, states, name)
        scores = mapper.map_shards(f"score {name}", rows, shards, scorer.batch_size).column("score").to_numpy()
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
    rows = dataset.to_table(columns=["id", "prompt", "response"]).combine_chunks()
    ids = rows.column("id").combine_chunks()
    states = fit_states(cfg.score, train_responses(dataset))
    out.path(SCORER_STATE).write_text(json.dumps({"components": states}, sort_keys=True), encoding="utf-8")
    scorer = Scorer(cfg.score, states)
    cache = ParquetCache.under(cfg.run.cache_dir, "scores")
    mapper = ShardMapper.for_stage(cfg, "score")

    columns: dict[str, np.ndarray] = {}
    stats: dict[str, ComponentStats] = {}
    for name in scorer.component_names:
        columns[name], stats[name] = score_column(scorer, states, name, rows, ingest.content_hash, cache, mapper)
    reward = scorer.combine(columns)

    schema = score_schema(scorer.component_names)
    with out.table("score", schema) as table:
        for start in range(0, len(ids), WRITE_ROWS):
            stop = min(start + WRITE_ROWS, len(ids))
            arrays = [ids[start:stop]] + [pa.array(columns[n][start:stop]) for n in scorer.component_names]
            table.write(pa.Table.from_arrays(arrays + [pa.array(reward[start:stop])], schema=schema))

    log.info("score: %d rows, R_max %.3g, mean reward %.4g", len(ids), scorer.r_max, reward.mean() if len(ids) else float("nan"))
    metrics = ScoreMetrics(r_max=scorer.r_max, r_min=scorer.r_min, weights=scorer.weights, components=stats, reward=Summary.of(reward))
    return StageResult(rows_in=len(ids), rows_out=len(ids), metrics=metrics, execution=mapper.execution())
