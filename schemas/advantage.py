"""Advantage stage: A = R - V, the positive filter and the sampling weights."""

from __future__ import annotations

import pyarrow as pa
from pydantic import Field

from schemas.base import Section


class AdvantageConfig(Section):
    """Settings of the DuckDB advantage computation."""

    threads: int = Field(2, gt=0, description="DuckDB threads.")
    memory_limit: str = Field("2GB", description="DuckDB memory limit; larger inputs spill to disk.")


# The stage must not read train.* (its cache key would change with every training setting), so it
# writes the sampling weight of every family and the train stage picks one (SAMPLING_WEIGHT_COLUMN).
ADVANTAGE_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("split", pa.string()),
        ("reward", pa.float64()),
        ("value", pa.float64()),
        ("advantage", pa.float64()),
        ("positive", pa.bool_()),
        ("weight_advantage", pa.float64()),
        ("weight_reward", pa.float64()),
        ("weight_uniform", pa.float64()),
    ]
)

SAMPLING_WEIGHT_COLUMN: dict[str, str] = {
    "nll": "weight_uniform",
    "wbc": "weight_reward",
    "r_gold": "weight_reward",
    "r_lol": "weight_reward",
    "a_lol": "weight_advantage",
    "a_lol_ref_free": "weight_advantage",
    "a_lol_seq": "weight_advantage",
    "a_lol_kl": "weight_advantage",
}
"""Algorithm -> advantage-table column its rows are drawn in proportion to (method.md, priority sampling):
A+ = max(A, 0) for the A-LoL family, max(R, 0) for the reward baselines, 1 for NLL."""

QUANTILES = (0.01, 0.05, 0.25, 0.5, 0.75, 0.95, 0.99)
