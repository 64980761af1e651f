"""The tables of `alol compare`: one row per method (mean over seeds) plus pi_ref, and the paired
differences between methods, from the evaluate stage's `eval` tables.

Every method's policy rows give (seeds K, prompts n) matrices per column of `eval` (reward, each
component and judge, length_words); pi_ref's rows are one seed (its generations are greedy and cached,
so every evaluation has the same). Intervals are the two-level bootstrap of
stages.metrics.seeds_and_prompts_difference: seeds and prompts resampled, the prompts paired between
methods. With one seed it is the paired bootstrap over prompts.

Paired differences between methods: each method of the A-LoL family (the registry's algorithms that
sample by the advantage, `weight_advantage`) minus every method of the comparison outside it (nll,
wbc, ... and the preference baselines when they are in the registry and the run), and each A-LoL
variant minus its value-head ablation (V constant) when the comparison ran it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow.compute as pc

from schemas.algorithms import ALGORITHM_REGISTRY
from schemas.evaluate import PI_REF, PI_THETA, EvaluateMetrics, Interval
from stages.io import StageReader
from stages.metrics import length_controlled_difference, seeds_and_prompts_difference

REFERENCE_ROW = "pi_ref"
ADVANTAGE_WEIGHT = "weight_advantage"
"""The sampling weight of the A-LoL family in the algorithm registry (schemas.algorithms.AlgorithmSpec.weight_column)."""


@dataclass
class MethodRuns:
    """One method's evaluations: `columns[name]` is a (seeds, prompts) matrix of the policy's `eval` column."""

    method: str
    algorithm: str
    value: str = "head"
    """advantage.value of its runs: `constant` for the value-head ablation."""
    columns: dict[str, np.ndarray] = field(default_factory=dict)
    metrics: list[EvaluateMetrics] = field(default_factory=list)
    train_seconds: list[float] = field(default_factory=list)

    @property
    def seeds(self) -> int:
        return len(self.metrics)

    @property
    def in_alol_family(self) -> bool:
        return ALGORITHM_REGISTRY[self.algorithm].weight_column == ADVANTAGE_WEIGHT


def score_columns(metrics: EvaluateMetrics) -> list[str]:
    """The numeric columns of `eval` compared: reward, the components, the judges, length_words."""
    return ["reward", *metrics.components, *metrics.judges, "length_words"]


def eval_columns(evaluate: StageReader, model: str, columns: Sequence[str]) -> tuple[list[str], dict[str, np.ndarray]]:
    """(ids in order, {column: float64 values}) of one model's rows of the `eval` table."""
    table = evaluate.read("eval", columns=["id", "model", *columns])
    table = table.filter(pc.equal(table["model"], model)).sort_by("id")
    return table["id"].to_pylist(), {c: table[c].to_numpy().astype(np.float64) for c in columns}


def reference_columns(evaluate: StageReader) -> dict[str, np.ndarray]:
    """pi_ref's compared columns of one evaluation, each a (1, prompts) matrix like a method's one seed."""
    _, columns = eval_columns(evaluate, PI_REF, score_columns(evaluate.metrics))
    return {name: column[None, :] for name, column in columns.items()}


def add_run(runs: MethodRuns, evaluate: StageReader, train_seconds: float, ids: list[str] | None) -> list[str]:
    """Append one seed's policy rows to `runs`; returns the prompt ids (which every run must share)."""
    metrics = evaluate.metrics
    run_ids, values = eval_columns(evaluate, PI_THETA, score_columns(metrics))
    if ids is not None and run_ids != ids:
        raise ValueError(f"{evaluate.dir}: evaluated other prompts than the first evaluation of the comparison")
    for name, column in values.items():
        runs.columns[name] = column[None, :] if name not in runs.columns else np.vstack([runs.columns[name], column])
    runs.metrics.append(metrics)
    runs.train_seconds.append(train_seconds)
    return run_ids


def _flat(prefix: str, interval: Interval) -> dict[str, float]:
    return {prefix: interval.mean, f"{prefix}_low": interval.low, f"{prefix}_high": interval.high}


def reference_row(reference: dict[str, np.ndarray], metrics: EvaluateMetrics, samples: int, seed: int) -> dict[str, Any]:
    """pi_ref's row: its mean reward with the bootstrap interval over prompts, components, judges, length, distinct-n."""
    m = metrics.models[PI_REF]
    return {
        "method": REFERENCE_ROW, "seeds": 1,
        **_flat("reward", seeds_and_prompts_difference(reference["reward"], None, samples, seed)),
        **{name: float(reference[name].mean()) for name in [*metrics.components, *metrics.judges]},
        "length_words": float(reference["length_words"].mean()),
        "distinct_1": m.distinct_1, "distinct_2": m.distinct_2, "distinct_3": m.distinct_3,
    }


def differences(
    a: dict[str, np.ndarray], b: dict[str, np.ndarray], judges: Sequence[str], samples: int, seed: int
) -> dict[str, float]:
    """a − b: reward, length-controlled reward and each judge, each with its seeds-and-prompts interval."""
    controlled, _ = length_controlled_difference(
        a["reward"], a["length_words"], b["reward"], b["length_words"], samples, seed
    )
    row = {**_flat("reward_diff", seeds_and_prompts_difference(a["reward"], b["reward"], samples, seed)),
           **_flat("lc_reward_diff", controlled)}
    for name in judges:
        row.update(_flat(f"{name}_diff", seeds_and_prompts_difference(a[name], b[name], samples, seed)))
    return row


def method_row(runs: MethodRuns, reference: dict[str, np.ndarray], samples: int, seed: int) -> dict[str, Any]:
    """A method's row: means over seeds and prompts with their intervals, and its differences to pi_ref."""
    first = runs.metrics[0]
    policy = [m.models[PI_THETA] for m in runs.metrics]
    mean = lambda values: float(np.mean(values))  # noqa: E731
    return {
        "method": runs.method, "seeds": runs.seeds,
        **_flat("reward", seeds_and_prompts_difference(runs.columns["reward"], None, samples, seed)),
        **{name: float(runs.columns[name].mean()) for name in [*first.components, *first.judges]},
        **differences(runs.columns, reference, first.judges, samples, seed),
        "length_words": float(runs.columns["length_words"].mean()),
        "distinct_1": mean([p.distinct_1 for p in policy]),
        "distinct_2": mean([p.distinct_2 for p in policy]),
        "distinct_3": mean([p.distinct_3 for p in policy]),
        "win_rate": mean([m.win_rate.win_rate for m in runs.metrics]),
        "tie_rate": mean([m.win_rate.tie_rate for m in runs.metrics]),
        "loss_rate": mean([m.win_rate.loss_rate for m in runs.metrics]),
        "policy_is_reference": sum(m.policy_is_reference for m in runs.metrics),
        "train_seconds": mean(runs.train_seconds),
    }


def difference_rows(methods: Sequence[MethodRuns], samples: int, seed: int) -> list[dict[str, Any]]:
    """Each A-LoL-family method minus each method outside the family, then each A-LoL variant with the value
    head minus the same variant with V constant (the ablation), paired by prompt."""
    pairs = [(a, b) for a in methods if a.in_alol_family for b in methods if not b.in_alol_family]
    pairs += [
        (a, b) for a in methods if a.value == "head" for b in methods if b.value == "constant" and b.algorithm == a.algorithm
    ]
    return [
        {"difference": f"{a.method} − {b.method}", "seeds": f"{a.seeds}/{b.seeds}",
         **differences(a.columns, b.columns, a.metrics[0].judges, samples, seed)}
        for a, b in pairs
    ]
