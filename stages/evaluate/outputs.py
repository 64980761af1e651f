"""The evaluate stage's files for people: report.md, metrics.json, metrics_table.json and plots/*.png."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from schemas.evaluate import PI_REF, PI_THETA, EvaluateMetrics
from stages.catalog import EVAL_METRICS_FILE, METRICS_TABLE_FILE, REPORT_FILE
from stages.io import StageReader, StageWriter
from stages.report import (
    plot_advantage_histogram,
    plot_reward_distribution,
    plot_training_curves,
    render_report,
    summary_rows,
)


def training_plot(train: StageReader, path: Path) -> Path | None:
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


VALUE_FIT_KEYS = (
    "value_chosen_epoch", "value_train_mse", "value_holdout_mse", "value_mean_baseline_train_mse",
    "value_mean_baseline_holdout_mse", "value_train_rows", "value_holdout_rows", "value_holdout_mse_by_epoch",
)
"""The reference stage's metrics of the value head fit that the report shows (no timing: the report is hashed)."""


def value_head_fit(inputs: dict[str, StageReader]) -> dict[str, Any]:
    """The value head's fit from the reference stage's metrics, and where the advantage stage took V from."""
    reference = inputs["reference"].metrics.model_dump()
    return {**{key: reference[key] for key in VALUE_FIT_KEYS}, "advantage_value": inputs["advantage"].metrics.value_source}


def write_report(
    out: StageWriter, inputs: dict[str, StageReader], metrics: EvaluateMetrics, config: dict[str, Any],
    rewards: dict[str, np.ndarray], advantage_values: np.ndarray,
) -> None:
    """report.md, metrics.json, metrics_table.json and the plots, all inside the stage output."""
    plots = {
        "Test reward, pi_theta vs pi_ref": plot_reward_distribution(
            rewards[PI_THETA], rewards[PI_REF], out.path("plots/reward_distribution.png")
        ),
        "Advantage of the training rows (A ≤ 0 filtered)": plot_advantage_histogram(
            advantage_values, out.path("plots/advantage_histogram.png")
        ),
    }
    training = training_plot(inputs["train"], out.path("plots/training_curves.png"))
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
        value_head=value_head_fit(inputs),
    )
    out.path(REPORT_FILE).write_text(text, encoding="utf-8")
    # Whether pi_ref's generations came from the cache is in the manifest only: metrics.json stays
    # the same whichever algorithm was evaluated first.
    as_json = metrics.model_dump(mode="json", exclude={"reference_generations_cached"})
    out.path(EVAL_METRICS_FILE).write_text(json.dumps(as_json, indent=2), encoding="utf-8")
    out.path(METRICS_TABLE_FILE).write_text(json.dumps(summary_rows(metrics), indent=2), encoding="utf-8")
