"""`run.executor: ray` on a real local Ray cluster (tests/support/ray.py): the same outputs as the local
executor, the manifest's workers and timings, and an actor killed mid-stage changing nothing."""

from __future__ import annotations

import os

import pytest

from pipeline.runner import STAGES, cache_key
from schemas.manifest import StageOutput
from stages.io import StageReader
from tests.support.ray import ray_cluster  # noqa: F401 (fixture)
from tests.support.train import WHOLE_PIPELINE, config, run_stages, tiny_setup

pytest.importorskip("ray")

SCORE_ONLY = ("ingest", "score")


def _run(tmp_path, name: str, stages: tuple[str, ...], **extra):
    tmp = tmp_path / name
    model, data = tiny_setup(tmp)
    cfg = config(tmp, model, data, **WHOLE_PIPELINE, **{"score.batch_size": 4, **extra})
    return run_stages(cfg, stages)


def _ray(address: str, actors: int = 2) -> dict:
    return {
        "run.executor": "ray", "run.ray_address": address,
        **{f"run.workers.{stage}": {"actors": actors, "cpus_per_actor": 1, "batch_rows": 8} for stage in ("score", "reference", "evaluate")},
    }


def _execution(output):
    return StageReader(output.path).manifest.execution


def test_score_on_ray_equals_local_and_the_manifest_names_the_workers(tmp_path, ray_cluster):
    local = _run(tmp_path, "local", SCORE_ONLY)
    on_ray = _run(tmp_path, "ray", SCORE_ONLY, **_ray(ray_cluster))
    assert on_ray["score"].content_hash == local["score"].content_hash

    execution = _execution(on_ray["score"])
    assert execution.executor == "ray" and execution.ray_address == ray_cluster
    assert [m.name for m in execution.maps] == ["score cats", "score informative"]
    for run in execution.maps:
        assert run.rows == 46 and run.shards == 6 and run.actors == 2  # 46 rows, shards of 8 (two batches of 4)
        assert sum(w.rows for w in run.workers) == 46 and sum(w.shards for w in run.workers) == 6
        assert all(not w.worker.endswith(f":{os.getpid()}") and w.peak_rss_bytes > 0 for w in run.workers)
    assert _execution(local["score"]).executor == "local"
    assert all(m.workers[0].worker.endswith(f":{os.getpid()}") for m in _execution(local["score"]).maps)


def test_an_actor_killed_mid_stage_is_restarted_and_the_output_is_the_same(tmp_path, ray_cluster, monkeypatch):
    local = _run(tmp_path, "local", SCORE_ONLY)
    monkeypatch.setenv("ALOL_FAILPOINT", "executor.shard@2")  # each actor's first life dies after its 2nd shard
    on_ray = _run(tmp_path, "ray", SCORE_ONLY, **_ray(ray_cluster, actors=1))
    assert on_ray["score"].content_hash == local["score"].content_hash
    for run in _execution(on_ray["score"]).maps:
        # the killed actor's first shard came back from it, the rest from its restarted process
        assert len(run.workers) == 2 and sorted(w.shards for w in run.workers) == [1, 5]


def test_executor_settings_are_in_no_cache_key(tmp_path):
    model, data = tiny_setup(tmp_path)
    local = config(tmp_path, model, data)
    on_ray = config(tmp_path, model, data, **_ray("127.0.0.1:1", actors=3))
    inputs = {name: StageOutput(stage=name, cache_key="k" * 64, path=str(tmp_path), content_hash="h" * 64) for name in STAGES}
    for stage in ("score", "reference", "evaluate"):
        upstream = {name: inputs[name] for name in STAGES[stage].upstream}
        assert cache_key(on_ray, stage, upstream) == cache_key(local, stage, upstream)
