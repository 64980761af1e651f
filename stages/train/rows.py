"""The training rows and the step budget.

The rows the sampler can draw are the advantage table's training rows (on preference data the chosen
responses only, unless advantage.rows is `all`) whose sampling weight (the
algorithm's `weight_column` in schemas.algorithms: A+, R or 1) is positive, joined by id with their
prompt and response (ingest) and pi_ref's log-probs l_t^ref, L_ref and token hash (reference table).
The A-LoL family's step budget is int(steps x #(A > 0) / N), N the number of training rows of that table.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from schemas.algorithms import ALGORITHM_REGISTRY
from schemas.train import TrainConfig
from stages.io import StageReader
from stages.train.errors import TrainError

TRAIN_ROWS_SQL = """
SELECT a.id, i.prompt, i.response, a.reward, a.advantage, a.{weight} AS weight,
       r.ref_logprob, r.ref_token_logprobs, r.response_tokens, r.token_hash
FROM {advantage} AS a
LEFT JOIN {reference} AS r USING (id)
LEFT JOIN {ingest} AS i USING (id)
WHERE a.split = 'train' AND a.{weight} > 0
ORDER BY a.id
"""

ROW_COUNTS_SQL = """
SELECT count(*) AS rows, count(*) FILTER (WHERE positive) AS positive_rows
FROM {advantage} WHERE split = 'train'
"""


@dataclass
class TrainRows:
    """The rows the sampler can draw (sampling weight > 0), ordered by id, and the counts of the step budget.

    For the pair algorithms (stages.train.pairs) the sampler draws groups: `weight` has one entry per pair and
    `table` holds `group_size` (2) consecutive rows per pair, chosen first."""

    table: pa.Table
    weight: np.ndarray
    train_rows: int
    positive_rows: int
    group_size: int = 1
    pair_source: str | None = None  # reference.pairs as resolved: `data` or `built` (pair algorithms only)
    tied_pairs_left_out: int = 0

    def take(self, indices: Sequence[int]) -> list[dict[str, Any]]:
        """The rows of the drawn indices (of their groups, in order, for the pair algorithms)."""
        rows = [i * self.group_size + k for i in indices for k in range(self.group_size)]
        return self.table.take(pa.array(rows, type=pa.int64())).to_pylist()


def load_train_rows(algorithm: str, inputs: dict[str, StageReader]) -> TrainRows:
    """The training rows of the advantage table with their prompt, response and pi_ref log-probs."""
    weight = ALGORITHM_REGISTRY[algorithm].weight_column
    globs = {
        "advantage": inputs["advantage"].table_glob("advantage"),
        "reference": inputs["reference"].table_glob("reference"),
        "ingest": inputs["ingest"].table_glob("ingest"),
    }
    con = duckdb.connect(":memory:")
    try:
        tables = {name: inputs[name].sql_table(name) for name in globs}
        table = con.sql(TRAIN_ROWS_SQL.format(weight=weight, **tables)).to_arrow_table()
        rows, positive = con.execute(ROW_COUNTS_SQL.format(advantage=tables["advantage"])).fetchone()
    finally:
        con.close()
    if table.num_rows == 0:
        raise TrainError(
            f"{globs['advantage']}: none of the {rows} training rows has a positive `{weight}` "
            f"({positive} with A > 0); {algorithm} has nothing to train on"
        )
    for column, stage in (("ref_logprob", "reference"), ("prompt", "ingest")):
        missing = table[column].is_null()
        if pc.any(missing).as_py():
            row_id = table.filter(missing)["id"][0].as_py()
            raise TrainError(f"{globs[stage]}: training row id {row_id} of the advantage table is missing here")
    return TrainRows(table=table, weight=table["weight"].to_numpy(), train_rows=rows, positive_rows=positive)


def step_budget(train: TrainConfig, positive_rows: int, rows: int) -> int:
    """Optimiser steps: int(steps x #(A > 0) / N) for the A-LoL family (at least 1), `steps` otherwise."""
    if not ALGORITHM_REGISTRY[train.algorithm].shrinks_steps:
        return train.steps
    return max(1, int(train.steps * positive_rows / rows))
