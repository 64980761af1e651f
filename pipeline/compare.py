"""`alol compare`: train and evaluate several algorithms over one cached upstream, one table of results.

Every algorithm is a run of the flow with only `train.algorithm` (and the hyper-parameters the
algorithm registry gives compare defaults, e.g. `train.kl_beta` for a_lol_kl) changed. Ingest, score, reference and advantage do not read `train.*`, so their cache keys, and
their outputs, are shared (DPO and PRO too: their pairs come from the reference stage, reference.pairs);
pi_ref's test generations are cached by the evaluate stage. Adding an
algorithm to the list trains and evaluates only that one.

The table follows the paper's: one row per method plus pi_ref, the reward (total with its 95%
bootstrap interval, and each component), the paired difference to pi_ref, length, distinct-1/2/3,
the win rate over pi_ref and the training time (the train stage's own `train_seconds`: the
evaluate stage's files carry no timing, so that recomputing train leaves evaluate cached).
"""

from __future__ import annotations

import csv
import io
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from prefect import flow
from prefect.artifacts import create_markdown_artifact

from pipeline.flow import run_alol
from pipeline.preflight import check
from pipeline.routing import FLOW_NAME
from pipeline.ui import send_alol_logs_to_prefect
from schemas.algorithms import ALGORITHM_REGISTRY, ALGORITHMS, OPTIONAL_HYPERPARAMETERS
from schemas.config import Profile, load_config
from schemas.evaluate import PI_REF, PI_THETA, EvaluateMetrics, Interval
from schemas.stages import STAGE_NAMES
from schemas.train import Algorithm
from stages import fs
from stages.io import StageReader, atomic_write_text
from stages.report import interval_text, markdown_table

log = logging.getLogger("alol.compare")

COMPARE_STAGES = list(STAGE_NAMES)
REFERENCE_ROW = PI_REF


@dataclass
class Comparison:
    """The comparison rows (flat numbers, as in the CSV) and the files they were written to."""

    rows: list[dict[str, Any]]
    components: list[str]
    markdown_path: fs.Location
    csv_path: fs.Location

    def markdown(self) -> str:
        return fs.read_text(self.markdown_path)


def algorithm_overrides(base: dict[str, Any], algorithm: str) -> dict[str, Any]:
    """The run's overrides with this algorithm. Each optional hyper-parameter (`train.kl_beta`) is the
    user's value, else the registry's compare default, for the algorithms that take it, and None for the others."""
    if algorithm not in ALGORITHMS:
        raise ValueError(f"unknown algorithm {algorithm!r}; choose from {', '.join(ALGORITHMS)}")
    spec = ALGORITHM_REGISTRY[algorithm]
    overrides = {**base, "train.algorithm": algorithm}
    for name in OPTIONAL_HYPERPARAMETERS:
        given = base.get(f"train.{name}")
        overrides[f"train.{name}"] = (given or spec.compare_defaults[name]) if name in spec.hyperparameters else None
    return overrides


def pair_overrides(base: dict[str, Any], algorithms: Sequence[str], profile: str | None, config_file: str | None) -> dict[str, Any]:
    """The comparison's overrides with reference.pairs `built` when it runs a pair algorithm (DPO, PRO) and the
    configuration would give it no pairs (the default `data` on pair-less data). Every algorithm shares the
    upstream, so all of them get it; a reference.pairs the user set is kept (and refused if pair-less)."""
    if "reference.pairs" in base or not any(ALGORITHM_REGISTRY[a].needs_pairs for a in algorithms if a in ALGORITHMS):
        return base
    pairless = next(a for a in ALGORITHMS if not ALGORITHM_REGISTRY[a].needs_pairs)
    if not load_config(profile, config_file, algorithm_overrides(base, pairless)).pairs_missing():
        return base
    log.info("compare: reference.pairs built for every algorithm (DPO and PRO need pairs; the data has none)")
    return {**base, "reference.pairs": "built"}


def method_row(method: str, metrics: EvaluateMetrics, model: str, train_seconds: float | None = None) -> dict[str, Any]:
    """One row of the comparison from an evaluation's metrics; model is PI_THETA or PI_REF.
    `train_seconds` is the train stage's (TrainMetrics), shown on the policy's row."""
    m = metrics.models[model]
    is_policy = model == PI_THETA
    diff = metrics.difference["reward"] if is_policy else Interval(mean=0.0, low=0.0, high=0.0)
    win = metrics.win_rate if is_policy else None
    row: dict[str, Any] = {
        "method": method,
        "reward": m.reward.mean,
        "reward_low": m.reward.low,
        "reward_high": m.reward.high,
        **{name: m.component(name).mean for name in metrics.components},
        "reward_diff": diff.mean,
        "reward_diff_low": diff.low,
        "reward_diff_high": diff.high,
        "length_words": m.length_words,
        "distinct_1": m.distinct_1,
        "distinct_2": m.distinct_2,
        "distinct_3": m.distinct_3,
        "win_rate": win.win_rate if win else None,
        "tie_rate": win.tie_rate if win else None,
        "loss_rate": win.loss_rate if win else None,
        "policy_is_reference": metrics.policy_is_reference if is_policy else None,
        "train_seconds": train_seconds if is_policy else None,
    }
    return row


def markdown_rows(rows: Sequence[dict[str, Any]], components: Sequence[str]) -> list[dict[str, Any]]:
    """The rows as the paper prints them: intervals in brackets, win/tie in one cell."""
    out = []
    for row in rows:
        interval = lambda key: Interval(mean=row[key], low=row[f"{key}_low"], high=row[f"{key}_high"])  # noqa: E731
        method = row["method"] + (" (= pi_ref: no checkpoint beat it)" if row["policy_is_reference"] else "")
        out.append(
            {
                "method": method,
                "reward (95% CI)": interval_text(interval("reward")),
                **{name: row[name] for name in components},
                "Δ reward vs pi_ref (95% CI)": None if row["method"] == REFERENCE_ROW else interval_text(interval("reward_diff")),
                "length": row["length_words"],
                "dist-1": row["distinct_1"],
                "dist-2": row["distinct_2"],
                "dist-3": row["distinct_3"],
                "win/tie vs pi_ref": None if row["win_rate"] is None else f"{row['win_rate']:.2f}/{row['tie_rate']:.2f}",
                "train s": None if row["train_seconds"] is None else f"{row['train_seconds']:.0f}",
            }
        )
    return out


def csv_text(rows: Sequence[dict[str, Any]]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def write_comparison(folder: fs.Location, rows: list[dict[str, Any]], components: list[str], title: str) -> Comparison:
    """comparison.md and comparison.csv in `folder` (a local folder or an object store prefix)."""
    markdown = f"# {title}\n\n" + markdown_table(markdown_rows(rows, components))
    markdown_path, csv_path = fs.join(folder, "comparison.md"), fs.join(folder, "comparison.csv")
    atomic_write_text(markdown_path, markdown)
    atomic_write_text(csv_path, csv_text(rows))
    return Comparison(rows, components, markdown_path, csv_path)


def compare(
    algorithms: Sequence[str] | None = None,
    profile: str | None = "default",
    config_file: str | None = None,
    overrides: dict[str, Any] | None = None,
) -> Comparison:
    """Run the flow once per algorithm (default: every algorithm of the registry, DPO and PRO included) and write the comparison table under the run folder."""
    algorithms = list(algorithms or ALGORITHMS)
    base = pair_overrides(dict(overrides or {}), algorithms, profile, config_file)
    # Every configuration is read before any work: an unknown name or a bad setting fails at once.
    configs = [load_config(profile, config_file, algorithm_overrides(base, a)) for a in algorithms]
    cfg = configs[0]
    check(cfg)  # the data, the model and the run folders, shared by every algorithm: before any work
    rows: list[dict[str, Any]] = []
    reference: dict[str, Any] | None = None
    components: list[str] = []
    for algorithm, algorithm_cfg in zip(algorithms, configs):
        log.info("compare: %s", algorithm)
        outputs = run_alol(algorithm_cfg, stages=COMPARE_STAGES)
        metrics = StageReader(outputs["evaluate"].path).metrics
        train_seconds = StageReader(outputs["train"].path).metrics.train_seconds
        components = metrics.components
        reference = reference or method_row(REFERENCE_ROW, metrics, PI_REF)
        rows.append(method_row(algorithm, metrics, PI_THETA, train_seconds))
    folder = fs.join(fs.location(cfg.run.root), cfg.run.name, "compare")
    title = f"alol compare: run {cfg.run.name}, {metrics.prompts} test prompts"
    return write_comparison(folder, [reference, *rows], components, title)


@flow(name=FLOW_NAME, flow_run_name="compare")
def compare_flow(
    algorithms: list[Algorithm] | None = None,
    profile: Profile | None = "default",
    config_file: str | None = None,
    overrides: dict[str, Any] | None = None,
) -> str:
    """`alol compare` as the deployment `alol/compare`: train and evaluate each algorithm (all of the
    registry by default) over one cached upstream, write the comparison table and publish it as the
    artifact `alol-compare`. Returns the path of comparison.md.

    A flow of its own (named `alol`, so the deployment is `alol/compare`) because it loops over
    algorithms and writes a table, which a selection of stages of the `alol` flow cannot express.
    """
    send_alol_logs_to_prefect()
    result = compare(algorithms, profile, config_file, overrides or {})
    create_markdown_artifact(key="alol-compare", markdown=result.markdown(), description="alol compare: one row per method plus pi_ref")
    return str(result.markdown_path)
