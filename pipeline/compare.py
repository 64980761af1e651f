"""`alol compare`: train and evaluate several algorithms (and seeds) over one cached upstream, tables of results.

Every algorithm is a run of the flow with only `train.algorithm` (and the hyper-parameters the
algorithm registry gives compare defaults, e.g. `train.kl_beta` for a_lol_kl) changed; with
`--seeds K` each is run K times with train.seed = seed + 0..K-1. Ingest, score, reference and
advantage read neither `train.*` nor the train seed, so their cache keys, and their outputs, are
shared (DPO and PRO too: their pairs come from the reference stage, reference.pairs); pi_ref's test generations and judge scores are cached by the evaluate stage. Adding an
algorithm or a seed trains and evaluates only that one. `--value-ablation` adds each A-LoL variant
with advantage.value: constant (V = mean reward of pi_ref's value targets), which recomputes only
advantage and what follows.

The table follows the paper's (pipeline.compare_table): one row per method plus pi_ref, the reward
(mean over seeds and prompts with a 95% bootstrap interval over both, and each component), the held-out
judges, the paired difference to pi_ref (also length-controlled, and per judge), length,
distinct-1/2/3, the win rate over pi_ref and the training time (the train stage's own
`train_seconds`: the evaluate stage's files carry no timing, so that recomputing train leaves
evaluate cached); then the paired differences of each A-LoL variant to each other method.
"""

from __future__ import annotations

import csv
import io
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from prefect import flow
from prefect.artifacts import create_markdown_artifact
from prefect.runtime import flow_run as prefect_flow_run
from pydantic import ValidationError

from pipeline.compare_table import (
    ADVANTAGE_WEIGHT, MethodRuns, add_run, difference_rows, method_row, reference_columns, reference_row,
)
from pipeline.flow import run_alol
from pipeline.preflight import check
from pipeline.routing import FLOW_NAME
from pipeline.ui import compare_label, compare_result, send_alol_logs_to_prefect
from schemas.algorithms import ALGORITHM_REGISTRY, ALGORITHMS, OPTIONAL_HYPERPARAMETERS
from schemas.config import ConfigError, Profile, load_config
from schemas.evaluate import Interval
from schemas.stages import STAGE_NAMES
from schemas.train import Algorithm
from stages import fs
from stages.io import StageReader, atomic_write_text
from stages.report import interval_text, markdown_table

log = logging.getLogger("alol.compare")

COMPARE_STAGES = list(STAGE_NAMES)


@dataclass
class Comparison:
    """The comparison rows (flat numbers, as in the CSV), the paired differences between methods, and the files."""

    rows: list[dict[str, Any]]
    components: list[str]
    markdown_path: fs.Location
    csv_path: fs.Location
    differences: list[dict[str, Any]] = field(default_factory=list)
    judges: list[str] = field(default_factory=list)

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


def planned_runs(
    algorithms: Sequence[str], base: dict[str, Any], seeds: int, value_ablation: bool, first_seed: int
) -> list[tuple[str, str, dict[str, Any]]]:
    """(method label, algorithm, overrides) of every flow run of the comparison, method by method.

    Seed k of K sets train.seed = first_seed + k (first_seed: the train stage's seed without the
    comparison, train.seed else run.seed); the first seed leaves the overrides as they are, so it
    shares its outputs with `alol run`. With `value_ablation`, each A-LoL-family algorithm is run
    again with advantage.value: constant, labelled `<algorithm> (V=mean)`.
    """
    if seeds < 1:
        raise ValueError(f"--seeds must be at least 1, got {seeds}")
    methods = [(a, a, algorithm_overrides(base, a)) for a in algorithms]
    if value_ablation:
        methods += [
            (f"{a} (V=mean)", a, {**algorithm_overrides(base, a), "advantage.value": "constant"})
            for a in algorithms if ALGORITHM_REGISTRY[a].weight_column == ADVANTAGE_WEIGHT
        ]
    return [
        (method, algorithm, overrides if k == 0 else {**overrides, "train.seed": first_seed + k})
        for method, algorithm, overrides in methods
        for k in range(seeds)
    ]


def _interval_cell(row: dict[str, Any], key: str) -> str | None:
    if row.get(key) is None:
        return None
    return interval_text(Interval(mean=row[key], low=row[f"{key}_low"], high=row[f"{key}_high"]))


def markdown_rows(rows: Sequence[dict[str, Any]], components: Sequence[str], judges: Sequence[str] = ()) -> list[dict[str, Any]]:
    """The rows as the paper prints them, intervals in brackets, win/tie in one cell; judges beside the reward."""
    out = []
    for row in rows:
        method = row["method"]
        same = row.get("policy_is_reference")
        if same:
            method += " (= pi_ref: no checkpoint beat it)" if row["seeds"] == 1 else f" (= pi_ref in {same} of {row['seeds']} seeds)"
        out.append(
            {
                "method": method,
                "seeds": row["seeds"],
                "reward (95% CI)": _interval_cell(row, "reward"),
                **{name: row[name] for name in components},
                "Δ reward vs pi_ref (95% CI)": _interval_cell(row, "reward_diff"),
                "length-controlled Δ vs pi_ref": _interval_cell(row, "lc_reward_diff"),
                **{f"{name} (judge)": row[name] for name in judges},
                **{f"Δ {name} vs pi_ref": _interval_cell(row, f"{name}_diff") for name in judges},
                "length": row["length_words"],
                "dist-1": row["distinct_1"],
                "dist-2": row["distinct_2"],
                "dist-3": row["distinct_3"],
                "win/tie vs pi_ref": None if row.get("win_rate") is None else f"{row['win_rate']:.2f}/{row['tie_rate']:.2f}",
                "train s": None if row.get("train_seconds") is None else f"{row['train_seconds']:.0f}",
            }
        )
    return out


def markdown_difference_rows(rows: Sequence[dict[str, Any]], judges: Sequence[str]) -> list[dict[str, Any]]:
    return [
        {
            "difference": row["difference"],
            "seeds": row["seeds"],
            "Δ reward (95% CI)": _interval_cell(row, "reward_diff"),
            "length-controlled Δ reward": _interval_cell(row, "lc_reward_diff"),
            **{f"Δ {name}": _interval_cell(row, f"{name}_diff") for name in judges},
        }
        for row in rows
    ]


def csv_text(rows: Sequence[dict[str, Any]]) -> str:
    columns = list(dict.fromkeys(key for row in rows for key in row))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def write_comparison(
    folder: fs.Location, rows: list[dict[str, Any]], components: list[str], title: str,
    differences: list[dict[str, Any]] | None = None, judges: Sequence[str] = (), note: str = "",
) -> Comparison:
    """comparison.md, comparison.csv and, when there are differences between methods, differences.csv in `folder`
    (a local folder or an object store prefix)."""
    differences = differences or []
    markdown = f"# {title}\n\n" + (f"{note}\n\n" if note else "") + markdown_table(markdown_rows(rows, components, judges))
    if differences:
        markdown += (
            "\n## Paired differences between methods (95% CI over prompts and seeds)\n\n"
            + markdown_table(markdown_difference_rows(differences, judges))
        )
    markdown_path, csv_path = fs.join(folder, "comparison.md"), fs.join(folder, "comparison.csv")
    atomic_write_text(markdown_path, markdown)
    atomic_write_text(csv_path, csv_text(rows))
    if differences:
        atomic_write_text(fs.join(folder, "differences.csv"), csv_text(differences))
    return Comparison(rows, components, markdown_path, csv_path, differences, list(judges))


def compare(
    algorithms: Sequence[str] | None = None,
    profile: str | None = "default",
    config_file: str | None = None,
    overrides: dict[str, Any] | None = None,
    seeds: int = 1,
    value_ablation: bool = False,
) -> Comparison:
    """Run the flow for every algorithm (default: the whole registry, DPO and PRO included) and seed, and write the comparison
    tables under the run folder (`<run.root>/<run.name>/compare/`)."""
    algorithms = list(algorithms or ALGORITHMS)
    base = pair_overrides(dict(overrides or {}), algorithms, profile, config_file)
    given = load_config(profile, config_file, base)
    planned = planned_runs(algorithms, base, seeds, value_ablation, given.train.seed_or(given.run.seed))
    # Every configuration is read before any work: an unknown name or a bad setting fails at once.
    configs = [load_config(profile, config_file, run_overrides) for _, _, run_overrides in planned]
    cfg = configs[0]
    check(cfg)  # the data, the model and the run folders, shared by every algorithm: before any work
    methods: dict[str, MethodRuns] = {}
    ids: list[str] | None = None
    first: StageReader | None = None
    for (method, algorithm, _), run_cfg in zip(planned, configs):
        log.info("compare: %s, train.seed %s", method, run_cfg.train.seed_or(run_cfg.run.seed))
        outputs = run_alol(run_cfg, stages=COMPARE_STAGES)
        evaluate = StageReader(outputs["evaluate"].path)
        train_seconds = StageReader(outputs["train"].path).metrics.train_seconds
        runs = methods.setdefault(method, MethodRuns(method, algorithm, run_cfg.advantage.value))
        ids = add_run(runs, evaluate, train_seconds, ids)
        first = first or evaluate
    metrics = first.metrics
    samples, seed = cfg.evaluate.bootstrap_samples, cfg.run.seed
    reference = reference_columns(first)
    rows = [reference_row(reference, metrics, samples, seed)]
    rows += [method_row(runs, reference, samples, seed) for runs in methods.values()]
    folder = fs.join(fs.location(cfg.run.root), cfg.run.name, "compare")
    title = f"alol compare: run {cfg.run.name}, {metrics.prompts} {metrics.split} prompts, {seeds} seed{'s' if seeds > 1 else ''}"
    note = (
        f"Means over seeds and prompts; 95% intervals from a bootstrap over prompts and seeds ({samples} resamples). "
        "Length-controlled Δ: the intercept of the per-prompt reward difference regressed on the length difference "
        f"(words). Judges score nothing the training reward uses: {', '.join(metrics.judges) or 'none configured'}."
    )
    differences = difference_rows(list(methods.values()), samples, seed)
    return write_comparison(folder, rows, metrics.components, title, differences, metrics.judges, note)


def _compare_run_name() -> str:
    """The flow run's name in the UI (pipeline.ui.compare_label); Prefect calls this before the run starts."""
    parameters = prefect_flow_run.parameters
    try:
        cfg = load_config(parameters.get("profile", "default"), parameters.get("config_file"), parameters.get("overrides") or {})
    except (ConfigError, ValidationError):
        cfg = None  # the flow reports the configuration error when it starts
    return compare_label(cfg, parameters.get("algorithms"), parameters.get("seeds", 1), parameters.get("value_ablation", False))


@flow(name=FLOW_NAME, flow_run_name=_compare_run_name)
def compare_flow(
    algorithms: list[Algorithm] | None = None,
    profile: Profile | None = "default",
    config_file: str | None = None,
    overrides: dict[str, Any] | None = None,
    seeds: int = 1,
    value_ablation: bool = False,
) -> str:
    """`alol compare` as the deployment `alol/compare`: train and evaluate each algorithm (all of the
    registry by default) over one cached upstream, write the comparison table and publish it as the
    artifact `alol-compare`. Returns the path of comparison.md.

    A flow of its own (named `alol`, so the deployment is `alol/compare`) because it loops over
    algorithms and writes a table, which a selection of stages of the `alol` flow cannot express.
    """
    send_alol_logs_to_prefect()
    result = compare(algorithms, profile, config_file, overrides or {}, seeds, value_ablation)
    create_markdown_artifact(key="alol-compare", markdown=result.markdown(), description="alol compare: one row per method plus pi_ref")
    log.info("%s", compare_result(load_config(profile, config_file, overrides or {}).run.name, result.rows))
    return str(result.markdown_path)
