"""Advantage stage: A = R - V, the positive filter and the sampling weights."""

from __future__ import annotations

import pyarrow as pa
from typing import Literal

from pydantic import Field

from schemas.base import Section, column
from schemas.manifest import StageMetrics


class AdvantageConfig(Section):
    """Settings of the DuckDB advantage computation."""

    threads: int = Field(2, gt=0, description="DuckDB threads.")
    memory_limit: str = Field("2GB", description="DuckDB memory limit; larger inputs spill to disk.")
    rows: Literal["chosen", "all"] = Field(
        "chosen",
        description="Which training rows of preference data (chosen/rejected pairs) the reward and advantage "
        "methods train on: `chosen` (the paper's default) leaves the rejected responses out of the advantage "
        "table, so nothing draws them and the positive fraction (the A-LoL step budget) counts chosen rows only; "
        "`all` keeps every row. Rows without a preference (prompt/response data) are always kept.",
    )
    value: Literal["head", "constant"] = Field(
        "head",
        description="V(x) in A = R - V: `head` the value head's prediction (the reference table's `value`); `constant` "
        "the ablation V = mean reward of pi_ref's value-target decodes (what a head that learnt nothing from the prompt "
        "predicts), so A = R - mean. Changes only advantage and what follows it.",
    )


# The stage must not read train.* (its cache key would change with every training setting), so it
# writes the sampling weight of every family and the train stage picks its algorithm's
# (`weight_column` in schemas.algorithms.ALGORITHM_REGISTRY).
ADVANTAGE_SCHEMA = pa.schema(
    [
        column("id", pa.string(), "The ingest row id (training rows only; rejected responses left out under advantage.rows: chosen)."),
        column("split", pa.string(), "Always train."),
        column("reward", pa.float64(), "R(x, y) from the score stage."),
        column("value", pa.float64(), "V(x) from the reference stage."),
        column("advantage", pa.float64(), "A = R - V(x)."),
        column("positive", pa.bool_(), "A > 0: the rows the A-LoL family trains on."),
        column("weight_advantage", pa.float64(), "Sampling weight of the A-LoL family, max(A, 0): rows are drawn in proportion to it."),
        column("weight_reward", pa.float64(), "Sampling weight of the reward baselines (wbc, r_gold, r_lol), max(R, 0)."),
        column("weight_uniform", pa.float64(), "Sampling weight of nll: 1 for every row."),
    ]
)

QUANTILES = (0.01, 0.05, 0.25, 0.5, 0.75, 0.95, 0.99)


class AdvantageMetrics(StageMetrics):
    """The training rows' advantage statistics (the positive fraction shrinks the A-LoL step budget)."""

    rows: int = Field(..., description="Training rows trained on (those of the advantage table, see advantage.rows).")
    positive_rows: int = Field(..., description="Training rows with A > 0.")
    rejected_rows_left_out: int = Field(
        0, description="Training rows with preference `rejected` left out of the table (advantage.rows: chosen)."
    )
    positive_fraction: float
    value_source: Literal["head", "constant"] = Field("head", description="advantage.value: where V came from.")
    reward_mean: float
    value_mean: float
    advantage_mean: float
    advantage_quantiles: dict[str, float] = Field(..., description="p1 .. p99 of A.")
    negative_reward_rows: int = Field(..., description="Rows with R < 0 (drawn with weight 0 by the reward baselines).")
