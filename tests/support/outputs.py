"""Committed stage outputs built by hand, for tests of one stage or of the pipeline around it.

`commit_output(folder, stage, tables=..., files=..., metrics=...)` writes a real output folder
through stages.io (hashed, manifest last) and returns its verified `StageReader`. `metrics(stage,
**fields)` is a valid metrics model of that stage (schemas.stages.STAGE_METRICS) with neutral
values, the given fields replacing them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pyarrow as pa

from schemas.evaluate import PI_REF, PI_THETA
from schemas.manifest import StageMetrics, StageResult, Summary
from schemas.stages import STAGE_METRICS
from stages.io import StageReader, StageWriter

_SUMMARY = Summary(mean=0.0, std=0.0, min=0.0, max=0.0).model_dump()
_INTERVAL = {"mean": 0.0, "low": 0.0, "high": 0.0}


def _model_metrics(components: list[str]) -> dict[str, Any]:
    return {"reward": _INTERVAL, **{c: _INTERVAL for c in components}, "length_words": 0.0,
            "distinct_1": 0.0, "distinct_2": 0.0, "distinct_3": 0.0}


def _neutral(stage: str) -> dict[str, Any]:
    if stage == "ingest":
        return {"source": "test", "format": "prompt_response", "source_rows": 0, "rows_per_split": {},
                "pairs_out": 0, "rejected_by_reason": {}, "rows_invalid": 0, "rows_in_equals_out_plus_rejected": True}
    if stage == "score":
        return {"r_max": 1.0, "r_min": 0.0, "weights": {}, "components": {}, "reward": _SUMMARY}
    if stage == "reference":
        return {"pi_ref": "base", "model": "test", "hidden_size": 64, "device": "cpu", "rows": {},
                "prompts_at_token_limit": 0, "responses_at_token_limit": 0, "r_max": 1.0, "value_target_prompts": 0,
                "value_target_reward": _SUMMARY, "value_chosen_epoch": 1, "value_train_mse": 0.0,
                "value_holdout_mse": 0.0, "value_mean_baseline_train_mse": 0.0, "value_mean_baseline_holdout_mse": 0.0,
                "value_train_rows": 0, "value_holdout_rows": 0, "value_holdout_mse_by_epoch": [],
                "ref_logprob": _SUMMARY, "response_tokens": _SUMMARY, "value": _SUMMARY, "logprob_tokens": 0,
                "logprob_tokens_per_s": 0.0, "load_seconds": 0.0, "value_targets_seconds": 0.0,
                "value_head_seconds": 0.0, "logprob_seconds": 0.0}
    if stage == "advantage":
        return {"rows": 0, "positive_rows": 0, "positive_fraction": 0.0, "reward_mean": 0.0, "value_mean": 0.0,
                "advantage_mean": 0.0, "advantage_quantiles": {}, "negative_reward_rows": 0, "rejected_rows_left_out": 0}
    if stage == "train":
        return {"algorithm": "a_lol", "policy_is_reference": True, "best_step": None, "best_validation_reward": None,
                "best_validation_step": None, "reference_validation_reward": 0.0, "validation_prompts": 0,
                "train_seconds": 0.0, "validation_seconds": 0.0, "steps": 0, "steps_full": 0, "train_rows": 0,
                "positive_rows": 0, "drawable_rows": 0, "rows_per_step": 0, "processes": 1, "device": "cpu",
                "mixed_precision": "no", "step_tokens_per_s": [], "tokens_per_s_median": None, "final_loss": None,
                "resumed_from_step": 0}
    if stage == "evaluate":
        return {"algorithm": "a_lol", "prompts": 0, "components": [], "bootstrap_samples": 1,
                "policy_is_reference": True, "models": {PI_THETA: _model_metrics([]), PI_REF: _model_metrics([])},
                "difference": {"reward": _INTERVAL},
                "win_rate": {"wins": 0, "ties": 0, "losses": 0, "win_rate": 0.0, "tie_rate": 0.0, "loss_rate": 0.0},
                "length_controlled": {"difference": _INTERVAL, "slope_per_word": 0.0},
                "train": {"policy_is_reference": True, "best_step": None, "best_validation_reward": None,
                          "reference_validation_reward": 0.0},
                "generation": {}, "advantage": {}}
    raise KeyError(f"no stage {stage!r}")


def metrics(stage: str, **fields: Any) -> StageMetrics:
    """A valid metrics model of `stage`: neutral values, replaced by `fields` (validated)."""
    return STAGE_METRICS[stage].model_validate({**_neutral(stage), **fields})


def model_metrics(components: list[str], **fields: Any) -> dict[str, Any]:
    """One model's entry of the evaluate metrics (`models.pi_theta`), for `metrics("evaluate", models=...)`."""
    return {**_model_metrics(components), **fields}


def commit_output(
    folder: str | Path,
    stage: str,
    tables: dict[str, pa.Table] | None = None,
    files: dict[str, str | bytes] | None = None,
    metrics_model: StageMetrics | None = None,
    *,
    cache_key: str | None = None,
    config: dict[str, Any] | None = None,
) -> StageReader:
    """Write and commit a `stage` output folder holding `tables` and `files`; its verified reader."""
    writer = StageWriter(folder)
    for name, table in (tables or {}).items():
        writer.write_table(name, table)
    for relative, content in (files or {}).items():
        path = writer.path(relative)
        path.write_bytes(content) if isinstance(content, bytes) else path.write_text(content, encoding="utf-8")
    rows = sum(t.num_rows for t in (tables or {}).values())
    writer.commit(
        stage=stage, cache_key=cache_key or stage * 8,
        result=StageResult(rows_in=rows, rows_out=rows, metrics=metrics_model or metrics(stage)),
        config_fingerprints={}, config=config or {}, inputs={}, code_version="test", versions={},
    )
    return StageReader(folder)
