"""The preference pairs of the pair algorithms (DPO, PRO: `needs_pairs` in schemas.algorithms).

What reference.pairs resolved to (the reference stage's metrics `pairs`) says where they come from:
- `data`: the training split's chosen/rejected rows, joined by `pair_id` (ingest) with their reference
  log-probs and token hashes (reference table);
- `built`: each training row trained on (unpaired or chosen) against pi_ref's greedy response to its prompt
  (the reference stage's `pi_ref_responses`, which carries that response's reward, log-probs and hash); the
  one with the higher reward R is chosen, and a tie (both rewards equal, e.g. pi_ref reproducing the data)
  says nothing about a preference, so it is left out.
Either way the result is two rows per pair, chosen first, ordered by pair id: the `TrainRows` of a pair
algorithm with `group_size` 2, drawn uniformly (no A-LoL shrink: `steps` optimiser steps).
"""

from __future__ import annotations

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from stages.catalog import PI_REF_RESPONSES_TABLE
from stages.io import StageReader
from stages.train.errors import TrainError
from stages.train.rows import ROW_COUNTS_SQL, TrainRows

RESPONSE_COLUMNS = "id, prompt, response, reward, advantage, ref_logprob, ref_token_logprobs, response_tokens, token_hash"

DATA_PAIRS_SQL = """
SELECT i.pair_id, (i.preference = 'rejected')::INTEGER AS rank, i.id, i.prompt, i.response, s.reward,
       s.reward - r.value AS advantage, r.ref_logprob, r.ref_token_logprobs, r.response_tokens, r.token_hash,
       count(*) OVER (PARTITION BY i.pair_id) AS responses,
       sum((i.preference = 'chosen')::INTEGER) OVER (PARTITION BY i.pair_id) AS chosen
FROM {ingest} AS i
JOIN {reference} AS r USING (id)
LEFT JOIN {score} AS s USING (id)
WHERE i.split = 'train' AND i.pair_id IS NOT NULL
ORDER BY i.pair_id, rank
"""

BUILT_PAIRS_SQL = """
WITH responses AS (
    SELECT r.id AS pair_id, r.id, i.prompt, i.response, s.reward, s.reward - r.value AS advantage,
           r.ref_logprob, r.ref_token_logprobs, r.response_tokens, r.token_hash
    FROM {reference} AS r
    JOIN {ingest} AS i USING (id)
    LEFT JOIN {score} AS s USING (id)
    WHERE r.split = 'train' AND r.preference IS DISTINCT FROM 'rejected'
    UNION ALL
    SELECT p.row_id AS pair_id, p.id, i.prompt, p.response, p.reward, p.reward - r.value AS advantage,
           p.ref_logprob, p.ref_token_logprobs, p.response_tokens, p.token_hash
    FROM {pi_ref_responses} AS p
    JOIN {ingest} AS i ON i.id = p.row_id
    JOIN {reference} AS r ON r.id = p.row_id
),
ranked AS (
    SELECT *, row_number() OVER (PARTITION BY pair_id ORDER BY reward DESC, id) - 1 AS rank,
           count(*) OVER (PARTITION BY pair_id) AS responses,
           max(reward) OVER (PARTITION BY pair_id) > min(reward) OVER (PARTITION BY pair_id) AS ranked
    FROM responses
)
SELECT pair_id, rank, {columns}, responses, ranked FROM ranked ORDER BY pair_id, rank
"""


def _query(sql: str, **tables: str) -> pa.Table:
    con = duckdb.connect(":memory:")
    try:
        return con.sql(sql.format(columns=RESPONSE_COLUMNS, **tables)).to_arrow_table()
    finally:
        con.close()


def _counts(advantage: StageReader) -> tuple[int, int]:
    con = duckdb.connect(":memory:")
    try:
        return con.execute(ROW_COUNTS_SQL.format(advantage=advantage.sql_table("advantage"))).fetchone()
    finally:
        con.close()


def load_pairs(algorithm: str, inputs: dict[str, StageReader]) -> TrainRows:
    """Two rows per pair (chosen, rejected) with prompt, response, R and pi_ref's log-probs of both responses."""
    reference = inputs["reference"]
    source = reference.metrics.pairs
    tables = {name: inputs[name].sql_table(name) for name in ("ingest", "score")}
    tables["reference"] = reference.sql_table("reference")
    if source == "none":
        raise TrainError(
            f"train.algorithm {algorithm} trains on preference pairs, but the reference stage found none "
            f"({reference.dir}: the training split has no chosen/rejected pairs and pairs were not built): "
            "set reference.pairs: built or auto"
        )
    tied = 0
    if source == "data":
        table = _query(DATA_PAIRS_SQL, **tables)
        broken = pc.or_(pc.not_equal(table["responses"], 2), pc.not_equal(table["chosen"], 1))
        if pc.any(broken).as_py():
            pair = table.filter(broken)["pair_id"][0].as_py()
            raise TrainError(
                f"{inputs['ingest'].table_glob('ingest')}: training pair_id {pair} does not have exactly one chosen "
                "and one rejected response; rerun the ingest stage"
            )
    else:
        table = _query(BUILT_PAIRS_SQL, pi_ref_responses=reference.sql_table(PI_REF_RESPONSES_TABLE), **tables)
        lone = pc.not_equal(table["responses"], 2)
        if pc.any(lone).as_py():
            row = table.filter(lone)["pair_id"][0].as_py()
            raise TrainError(
                f"{reference.table_glob(PI_REF_RESPONSES_TABLE)}: training row id {row} has no pi_ref response "
                "(or more than one); rerun the reference stage"
            )
        _check_complete(table, inputs)  # before the tie filter: a missing reward must not pass for a tie
        tied = (table.num_rows - pc.sum(table["ranked"]).as_py()) // 2
        table = table.filter(table["ranked"])
    _check_complete(table, inputs)
    pairs = table.num_rows // 2
    if pairs == 0:
        raise TrainError(
            f"{reference.dir}: no {source} preference pair to train {algorithm} on"
            + (f" ({tied} built pairs left out: both responses had the same reward)" if tied else "")
        )
    rows, positive = _counts(inputs["advantage"])
    return TrainRows(
        table=table.drop_columns(["responses", "chosen" if source == "data" else "ranked"]),
        weight=np.ones(pairs), train_rows=rows, positive_rows=positive, group_size=2,
        pair_source=source, tied_pairs_left_out=tied,
    )


def _check_complete(table: pa.Table, inputs: dict[str, StageReader]) -> None:
    for column, stage in (("reward", "score"), ("ref_logprob", "reference")):
        missing = table[column].is_null()
        if pc.any(missing).as_py():
            row_id = table.filter(missing)["id"][0].as_py()
            raise TrainError(f"{inputs[stage].dir}: training response id {row_id} of a preference pair is missing here")


def pair_table(rows: pa.Table) -> pa.Table:
    """The `pairs` table (schemas.train.PAIRS_SCHEMA) of two-rows-per-pair TrainRows, chosen first."""
    chosen, rejected = (rows.take(pa.array(range(k, rows.num_rows, 2))) for k in (0, 1))
    return pa.table(
        {
            "pair_id": chosen["pair_id"], "chosen_id": chosen["id"], "rejected_id": rejected["id"],
            "chosen_reward": chosen["reward"], "rejected_reward": rejected["reward"],
        }
    )
