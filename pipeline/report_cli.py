"""What `alol report` and `alol compare` print: a run's evaluation metrics, the comparison table."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

from pipeline.storage import RunStore
from stages.io import StageReader
from schemas.config import AlolConfig
from schemas.evaluate import PI_REF, PI_THETA, EvaluateMetrics
from stages.catalog import REPORT_FILE
from stages.report import format_cell, interval_text, summary_rows

log = logging.getLogger("alol.report")


def text_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """Columns aligned with spaces for a terminal; the columns are the keys of the first row."""
    columns = list(rows[0])
    cells = [columns] + [[format_cell(row.get(c)) for c in columns] for row in rows]
    widths = [max(len(line[i]) for line in cells) for i in range(len(columns))]
    lines = ["  ".join(v.ljust(w) for v, w in zip(line, widths)).rstrip() for line in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def load_metrics(store: RunStore) -> tuple[EvaluateMetrics, StageReader]:
    """The metrics of the evaluation this run last recorded, from its verified output folder."""
    current = store.current("evaluate")
    if current is None:
        raise FileNotFoundError(
            f"run {store.name!r} under {store.root} has no evaluation yet; run `alol run` (or `alol run --stages evaluate`)"
        )
    reader = StageReader(current.path)
    return reader.metrics, reader


def print_report(run_name: str | None, cfg: AlolConfig) -> str:
    """The metrics table of a run (default: the latest run under run.root) as terminal text."""
    name = run_name or RunStore.latest_name(cfg.run.root) or cfg.run.name
    metrics, reader = load_metrics(RunStore(cfg.run.root, name))
    lines = [
        f"run {name}: algorithm {metrics.algorithm}, {metrics.prompts} {metrics.split} prompts",
        "",
        text_table(summary_rows(metrics)),
        "",
        f"reward difference pi_theta - pi_ref: {interval_text(metrics.difference['reward'])} (95% paired bootstrap)",
    ]
    if metrics.policy_is_reference:
        lines.append("no checkpoint beat pi_ref on validation: the policy is pi_ref")
    harmless = metrics.harmlessness
    if harmless is not None:
        lines.append(
            f"harmlessness ({harmless.prompts} Do-Not-Answer prompts, {harmless.component}): "
            f"{PI_THETA} {interval_text(harmless.models[PI_THETA])}, {PI_REF} {interval_text(harmless.models[PI_REF])}"
        )
    lines.append(f"report: {reader.path(REPORT_FILE)}")
    return "\n".join(lines)


def compare_main(
    profile: str | None, config_file: str | None, overrides: dict[str, Any], algorithms: Sequence[str] | None,
    seeds: int = 1, value_ablation: bool = False,
) -> int:
    """`alol compare`: run the comparison, print its tables and where they were written. Returns the exit code."""
    from pipeline.compare import compare, markdown_difference_rows, markdown_rows

    result = compare(algorithms, profile, config_file, overrides, seeds, value_ablation)
    print(text_table(markdown_rows(result.rows, result.components, result.judges)))
    if result.differences:
        print("\npaired differences between methods (95% CI over prompts and seeds)\n")
        print(text_table(markdown_difference_rows(result.differences, result.judges)))
    print(f"\nwritten: {result.markdown_path}\n         {result.csv_path}")
    return 0
