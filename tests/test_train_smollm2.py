"""Slow end-to-end tests on the real SmolLM2: the train stage on the smoke profile for a_lol and a_lol_seq.

Upstream stages run once (ingest, score, reference, advantage) in a temporary run folder; SmolLM2 is
converted once per checkout into the git-ignored `data/cache`.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.runner import execute_stage
from schemas.config import load_config
from stages.catalog import policy_model_path
from stages.io import StageReader
from stages.models.store import load_causal_lm

REPO = Path(__file__).resolve().parent.parent
SHARED_CACHE = REPO / "data" / "cache"

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    torch.set_num_threads(2)
    root = tmp_path_factory.mktemp("train-smollm2") / "runs"
    cfg = load_config("smoke", overrides={"run.root": str(root), "run.cache_dir": str(SHARED_CACHE)})
    outputs = {}
    outputs["ingest"], _ = execute_stage(cfg, "ingest", {})
    outputs["score"], _ = execute_stage(cfg, "score", {"ingest": outputs["ingest"]})
    outputs["reference"], _ = execute_stage(cfg, "reference", {n: outputs[n] for n in ("ingest", "score")})
    outputs["advantage"], _ = execute_stage(cfg, "advantage", {n: outputs[n] for n in ("score", "reference")})
    return root, outputs


@pytest.mark.parametrize("algorithm", ["a_lol", "a_lol_seq"])
def test_train_stage_on_smoke(smoke, algorithm):
    root, outputs = smoke
    cfg = load_config("smoke", overrides={"run.root": str(root), "run.cache_dir": str(SHARED_CACHE),
                                          "train.algorithm": algorithm})
    started = time.perf_counter()
    output, reused = execute_stage(cfg, "train", outputs)
    seconds = time.perf_counter() - started
    assert not reused
    out = StageReader(output.path)
    metrics = out.metrics
    advantage = StageReader(outputs["advantage"].path).metrics
    expected_steps = max(1, int(cfg.train.steps * advantage.positive_rows / advantage.rows))
    assert metrics.steps == expected_steps and metrics.positive_rows == advantage.positive_rows

    log = out.read("train_log").to_pylist()
    assert [r["step"] for r in log] == list(range(1, expected_steps + 1))
    # pi_theta starts as pi_ref, whose log-probs the reference stage stored: the first ratios are 1.
    assert log[0]["importance_weight_mean"] == pytest.approx(1.0, abs=1e-2)
    assert all(np.isfinite(r["loss"]) and r["loss"] > 0 and r["advantage_mean"] > 0 for r in log)
    assert log[-1]["validation_reward"] is not None
    assert metrics.best_validation_reward == max(r["validation_reward"] for r in log if r["validation_reward"] is not None)
    # pi_ref's validation reward: its value-target decodes of the same (first, by prompt id) validation prompts.
    targets = StageReader(outputs["reference"].path).read("value_targets", columns=["prompt_id", "reward"])
    first = targets.sort_by("prompt_id")["reward"].to_numpy()[: cfg.train.validation_prompts]
    assert metrics.validation_prompts == len(first) == min(cfg.train.validation_prompts, targets.num_rows)
    assert metrics.reference_validation_reward == pytest.approx(float(np.mean(first)))

    path = policy_model_path(cfg, out, StageReader(outputs["reference"].path))
    if metrics.policy_is_reference:
        assert not out.path("policy").exists() and metrics.best_step is None
        assert metrics.best_validation_reward <= metrics.reference_validation_reward
    else:
        assert path == out.path("policy") and metrics.best_validation_reward > metrics.reference_validation_reward
        assert load_causal_lm(path).config.hidden_size == 576
    print(f"train {algorithm} on smoke: {seconds:.1f} s, metrics: {metrics.model_dump_json()[:1200]}")
