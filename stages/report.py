"""The run report: a Markdown summary of the evaluation and PNG plots (matplotlib, no display needed).

The evaluate stage calls these with data it has read; nothing here opens a stage output. Plots use
`matplotlib.figure.Figure` directly (the Agg canvas), so no global pyplot state or backend choice.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from schemas.evaluate import MODELS, PI_REF, PI_THETA, EvaluateMetrics, Interval


def format_cell(value: Any) -> str:
    """A table cell: floats to 3 decimals, None as an em dash, `|` escaped."""
    if value is None:
        return "—"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.3f}"
    return str(value).replace("|", "\\|").replace("\n", " ")


def markdown_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """A GitHub Markdown table; the columns are the keys of the first row, in order."""
    if not rows:
        return "_(no rows)_\n"
    columns = list(rows[0])
    lines = [
        "| " + " | ".join(format_cell(c) for c in columns) + " |",
        "|" + "|".join("---" for _ in columns) + "|",
    ]
    lines += ["| " + " | ".join(format_cell(row.get(c)) for c in columns) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def interval_text(interval: Interval) -> str:
    """`mean [low, high]` with 3 decimals (a value that rounds to zero is 0.000, never -0.000)."""
    mean, low, high = (f"{value:.3f}".replace("-0.000", "0.000") for value in (interval.mean, interval.low, interval.high))
    return f"{mean} [{low}, {high}]"


def summary_rows(metrics: EvaluateMetrics) -> list[dict[str, Any]]:
    """One row per model (pi_theta, pi_ref): reward with its 95% interval, components, length, distinct-n, win rate.

    The win rate column is the policy's wins/ties/losses against pi_ref per prompt; pi_ref's row leaves it empty.
    """
    rows = []
    win = metrics.win_rate
    for model in MODELS:
        m = metrics.models[model]
        row: dict[str, Any] = {"model": model, "reward (95% CI)": interval_text(m.reward)}
        for name in metrics.components:
            row[name] = m.component(name).mean
        row["length"] = m.length_words
        row["dist-1"], row["dist-2"], row["dist-3"] = m.distinct_1, m.distinct_2, m.distinct_3
        row["win/tie/loss vs pi_ref"] = (
            f"{win.win_rate:.2f}/{win.tie_rate:.2f}/{win.loss_rate:.2f}" if model == PI_THETA else None
        )
        rows.append(row)
    return rows


def judge_rows(metrics: EvaluateMetrics) -> list[dict[str, Any]]:
    """One row per judge (evaluate.judges) and one for the training reward: each model's mean with its 95%
    interval and the paired difference pi_theta − pi_ref."""
    rows = []
    for name in ["reward", *metrics.judges]:
        policy, reference = (
            metrics.models[m].reward if name == "reward" else metrics.models[m].component(name) for m in MODELS
        )
        rows.append({
            "score": "reward (training)" if name == "reward" else f"{name} (judge)",
            "pi_theta (95% CI)": interval_text(policy),
            "pi_ref (95% CI)": interval_text(reference),
            "Δ pi_theta − pi_ref (95% CI)": interval_text(metrics.difference[name]),
        })
    return rows


def value_head_rows(value: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The value head's fit (the reference stage's metrics): MSE on its training and held-out validation
    prompts against the mean predictor's, and the chosen epoch (0: the head stayed the mean predictor)."""
    return [
        {"prompts": "train", "rows": value["value_train_rows"], "head MSE": value["value_train_mse"],
         "mean-predictor MSE": value["value_mean_baseline_train_mse"]},
        {"prompts": "held out", "rows": value["value_holdout_rows"], "head MSE": value["value_holdout_mse"],
         "mean-predictor MSE": value["value_mean_baseline_holdout_mse"]},
    ]


def advantage_statistics(advantage: np.ndarray) -> dict[str, float | int]:
    """Count, positive count and share (A > 0, the rows trained on), mean, std and quantiles of A."""
    a = np.asarray(advantage, dtype=np.float64)
    if a.size == 0:
        return {"rows": 0, "positive": 0, "positive_fraction": 0.0}
    q = np.quantile(a, [0.0, 0.1, 0.5, 0.9, 1.0])
    positive = int(np.sum(a > 0))
    return {
        "rows": int(a.size),
        "positive": positive,
        "positive_fraction": positive / a.size,
        "mean": float(a.mean()),
        "std": float(a.std()),
        "min": float(q[0]),
        "p10": float(q[1]),
        "median": float(q[2]),
        "p90": float(q[3]),
        "max": float(q[4]),
    }


def _save(fig: Figure, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


def plot_reward_distribution(policy: np.ndarray, reference: np.ndarray, path: Path) -> Path:
    """Overlaid histograms of the total test reward of pi_theta and pi_ref, with each mean marked."""
    fig = Figure(figsize=(6, 3.6))
    ax = fig.add_subplot()
    both = np.concatenate([np.asarray(policy, float), np.asarray(reference, float)])
    bins = np.histogram_bin_edges(both, bins=min(30, max(5, both.size // 4)))
    for values, label, colour in ((reference, PI_REF, "tab:gray"), (policy, PI_THETA, "tab:blue")):
        ax.hist(values, bins=bins, alpha=0.55, color=colour, label=f"{label} (mean {np.mean(values):.3f})")
        ax.axvline(float(np.mean(values)), color=colour, linestyle="--", linewidth=1)
    ax.set_xlabel("total reward R(x, y)")
    ax.set_ylabel("test prompts")
    ax.set_title(f"Test reward: {PI_THETA} vs {PI_REF}")
    ax.legend()
    return _save(fig, path)


def plot_advantage_histogram(advantage: np.ndarray, path: Path) -> Path:
    """Histogram of A = R − V over the training rows; the filtered part (A ≤ 0) drawn apart in red."""
    a = np.asarray(advantage, dtype=np.float64)
    fig = Figure(figsize=(6, 3.6))
    ax = fig.add_subplot()
    bins = np.histogram_bin_edges(a, bins=40) if a.size else 10
    ax.hist(a[a <= 0], bins=bins, color="tab:red", alpha=0.7, label=f"filtered, A ≤ 0 ({np.sum(a <= 0)})")
    ax.hist(a[a > 0], bins=bins, color="tab:green", alpha=0.7, label=f"trained on, A > 0 ({np.sum(a > 0)})")
    ax.axvline(0.0, color="black", linewidth=1)
    ax.set_xlabel("advantage A = R − V(x)")
    ax.set_ylabel("training rows")
    ax.set_title("Advantage of the training rows")
    ax.legend()
    return _save(fig, path)


def plot_training_curves(
    loss_steps: Sequence[int],
    loss: Sequence[float],
    validation_steps: Sequence[int],
    validation_reward: Sequence[float],
    reference_validation_reward: float | None,
    path: Path,
) -> Path:
    """Training loss (left) and validation reward (right, with pi_ref's as a dashed line) over optimiser steps."""
    fig = Figure(figsize=(9, 3.4))
    left, right = fig.subplots(1, 2)
    left.plot(loss_steps, loss, color="tab:blue", linewidth=1, marker="o", markersize=2)
    left.set_xlabel("step")
    left.set_ylabel("training loss")
    left.set_title("Training loss")
    right.plot(validation_steps, validation_reward, marker="o", color="tab:green", label=PI_THETA)
    if reference_validation_reward is not None:
        right.axhline(reference_validation_reward, color="tab:gray", linestyle="--", label=PI_REF)
    right.set_xlabel("step")
    right.set_ylabel("mean validation reward")
    right.set_title("Validation reward")
    right.legend()
    for ax in (left, right):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    return _save(fig, path)


def render_report(
    *,
    title: str,
    metrics: EvaluateMetrics,
    config: Mapping[str, Any],
    advantage: Mapping[str, Any] | None,
    links: Mapping[str, str],
    plots: Mapping[str, str],
    value_head: Mapping[str, Any] | None = None,
) -> str:
    """The whole Markdown report. `links` and `plots` map a caption to a path relative to the report."""
    diff = metrics.difference["reward"]
    generation = metrics.generation
    decoding = "sampled" if generation["do_sample"] else "greedy"
    intro = (
        f"Algorithm `{metrics.algorithm}`, {metrics.prompts} prompts of the {metrics.split} split, {decoding} decoding of at "
        f"most {generation['max_new_tokens']} new tokens."
    )
    if metrics.policy_is_reference:
        intro += " No checkpoint beat pi_ref on validation, so the policy **is** pi_ref."
    sections = [
        f"# {title}",
        intro,
        "## Test metrics",
        markdown_table(summary_rows(metrics)).rstrip(),
        f"Reward difference pi_theta − pi_ref: {interval_text(diff)} "
        f"(95% paired bootstrap over prompts, {metrics.bootstrap_samples} resamples).",
    ]
    controlled = metrics.length_controlled
    sections += [
        "## Held-out judges and length control",
        markdown_table(judge_rows(metrics)).rstrip(),
        f"Length-controlled reward difference pi_theta − pi_ref (the intercept of the per-prompt reward difference "
        f"regressed on the length difference in words): {interval_text(controlled.difference)}, slope "
        f"{controlled.slope_per_word:.4f} reward per word.",
    ]
    harmless = metrics.harmlessness
    if harmless is not None:
        rows = [
            {"model": m, harmless.component: interval_text(harmless.models[m])}
            for m in MODELS
        ]
        sections += [
            f"## Harmlessness ({harmless.prompts} Do-Not-Answer prompts, component `{harmless.component}`)",
            markdown_table(rows).rstrip(),
            f"Difference pi_theta − pi_ref: {interval_text(harmless.difference)}.",
        ]
    sections += ["## Training", markdown_table([metrics.train.model_dump()]).rstrip()]
    if advantage:
        sections += ["## Advantage (training rows)", markdown_table([advantage]).rstrip()]
    if value_head:
        chosen = value_head["value_chosen_epoch"]
        sections += [
            f"## Value head (advantage.value: {value_head['advantage_value']})",
            markdown_table(value_head_rows(value_head)).rstrip(),
            f"Chosen epoch {chosen} of {len(value_head['value_holdout_mse_by_epoch']) - 1}"
            + (" (0: no epoch beat the mean predictor on the held-out prompts, so V is that constant)." if chosen == 0 else "."),
        ]
    if plots:
        sections += ["## Plots", *(f"![{caption}]({rel})" for caption, rel in plots.items())]
    if links:
        sections += ["## Tables", "\n".join(f"- [{caption}]({rel})" for caption, rel in links.items())]
    sections += ["## Configuration", "```yaml\n" + yaml.safe_dump(dict(config), sort_keys=True) + "```"]
    return "\n\n".join(sections) + "\n"
