"""The smoke profile (the real SmolLM2 and the four reward models) with `run.executor: ray` on a real local Ray
cluster gives the local executor's outputs: the data stages that Ray maps (score, reference, evaluate)
computed again on 2 actors over the local run's upstream have the same content hashes.

tests/test_executor_ray.py checks every pass on the tiny random model; this checks the same on the models
users run, where batching, padding and the real tokenizer and reward models meet the sharding. Each run has
its own run.cache_dir (in no cache key), so that the Ray run finds no scores or generations of the local one
to reuse; both link the converted models of the checkout's git-ignored `data/cache`.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from pipeline.runner import STAGES, execute_stage
from schemas.config import load_config
from schemas.stages import STAGE_NAMES
from stages.io import StageReader
from tests.support.ray import ray_cluster  # noqa: F401 (fixture)
from tests.support.train import run_stages

pytest.importorskip("ray")
pytestmark = pytest.mark.slow

SHARED_CACHE = Path(__file__).resolve().parent.parent / "data" / "cache"
MAPPED = ("score", "reference", "evaluate")


def _cache_dir(folder: Path) -> str:
    """A fresh cache folder whose models are the checkout's (converted once)."""
    (SHARED_CACHE / "models").mkdir(parents=True, exist_ok=True)
    folder.mkdir()
    (folder / "models").symlink_to(SHARED_CACHE / "models", target_is_directory=True)
    return str(folder)


def test_smoke_profile_on_ray_gives_the_local_content_hashes(tmp_path, ray_cluster):
    root = {"run.root": str(tmp_path / "runs")}
    local = run_stages(load_config("smoke", overrides={**root, "run.cache_dir": _cache_dir(tmp_path / "local-cache")}), STAGE_NAMES)

    workers = {"actors": 2, "cpus_per_actor": 1, "batch_rows": 8}
    ray_cfg = load_config("smoke", overrides={
        **root, "run.cache_dir": _cache_dir(tmp_path / "ray-cache"), "run.executor": "ray", "run.ray_address": ray_cluster,
        **{f"run.workers.{stage}": workers for stage in MAPPED},
    })
    for stage in MAPPED:
        # The same cache key (the executor is in none), computed again on the actors from the local upstream.
        upstream = {name: local[name] for name in STAGES[stage].upstream}
        on_ray, reused = execute_stage(ray_cfg, stage, upstream, refresh=True)
        assert not reused and on_ray.cache_key == local[stage].cache_key
        assert on_ray.content_hash == local[stage].content_hash, f"{stage}: Ray's output differs from the local one"

        execution = StageReader(on_ray.path).manifest.execution
        assert execution.executor == "ray" and execution.maps, stage
        assert all(m.executor == "ray" and m.actors == 2 for m in execution.maps), stage
        # The work ran in the actors, not in this process.
        assert all(not w.worker.endswith(f":{os.getpid()}") for m in execution.maps for w in m.workers), stage
    reference_maps = [m.name for m in StageReader(local["reference"].path).manifest.execution.maps]
    assert "reference value-target decoding" in reference_maps, "smoke decodes its value targets"
