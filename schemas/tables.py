"""Every table the stages write, and the `joined` view: what one row is, and the columns with their
descriptions (Arrow field metadata, schemas.base.column). `alol sql --describe` prints this; the
schemas themselves live with their stage (schemas/<stage>.py).

Tables whose columns depend on the reward components (score, value_targets, eval) take the
component names.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import pyarrow as pa

from schemas.advantage import ADVANTAGE_SCHEMA
from schemas.base import column, column_description
from schemas.evaluate import eval_schema
from schemas.ingest import INGEST_SCHEMA, REJECTED_SCHEMA
from schemas.reference import REFERENCE_SCHEMA, pi_ref_responses_schema, value_targets_schema
from schemas.score import score_schema
from schemas.train import PAIRS_SCHEMA, TRAIN_LOG_SCHEMA


@dataclass(frozen=True)
class TableDoc:
    """A table: the stage that writes it, what one row is, and its schema for the given component names."""

    stage: str
    row: str
    schema: Callable[[Sequence[str]], pa.Schema]


TABLES: dict[str, TableDoc] = {
    "ingest": TableDoc("ingest", "one prompt/response row of the data (a preference pair is two rows)", lambda c: INGEST_SCHEMA),
    "ingest_rejected": TableDoc("ingest", "one source row that failed a check, and why", lambda c: REJECTED_SCHEMA),
    "score": TableDoc("score", "the reward of one ingest row: each component and their weighted sum", lambda c: score_schema(list(c))),
    "reference": TableDoc("reference", "pi_ref's log-probs and V(x) of one train or validation row", lambda c: REFERENCE_SCHEMA),
    "value_targets": TableDoc(
        "reference", "one distinct validation prompt: pi_ref's greedy response, its reward, the fitted V(x)",
        lambda c: value_targets_schema(list(c)),
    ),
    "pi_ref_responses": TableDoc(
        "reference", "pi_ref's greedy response to one training row's prompt (reference.pairs built; empty otherwise)",
        lambda c: pi_ref_responses_schema(list(c)),
    ),
    "advantage": TableDoc("advantage", "one training row trained on: A = R - V and the sampling weights", lambda c: ADVANTAGE_SCHEMA),
    "train_log": TableDoc("train", "one optimiser step", lambda c: TRAIN_LOG_SCHEMA),
    "pairs": TableDoc("train", "one preference pair a pair algorithm (DPO, PRO) drew from (only their runs)", lambda c: PAIRS_SCHEMA),
    "eval": TableDoc("evaluate", "one (test prompt, model) pair: the generation and its reward", lambda c: eval_schema(c)),
    "eval_harmlessness": TableDoc(
        "evaluate", "one (Do-Not-Answer prompt, model) pair (evaluate.harmlessness_prompts > 0)", lambda c: eval_schema(c)
    ),
}
"""Table name (the view name in `alol sql`) -> its documentation."""


JOINED_VIEW = "joined"
"""The view over ingest, score, reference and advantage: one row per ingest row, the common questions' columns."""

JOINED_SOURCES = ("ingest", "score", "reference", "advantage")
"""Its tables, in join order (ingest LEFT JOIN the others on id)."""

SCORE_COLUMNS = "*"
"""In JOINED_COLUMNS: every column of the score table but id (the components and reward)."""

PROMPT_TEXT = column("prompt_text", pa.string(), "The content of the prompt's last message (the turn the response answers).")

JOINED_COLUMNS: tuple[tuple[str, str], ...] = (
    ("ingest", "id"), ("ingest", "split"), ("ingest", PROMPT_TEXT.name), ("ingest", "response"), ("ingest", "prompt"),
    ("ingest", "preference"), ("ingest", "pair_id"), ("ingest", "source"),
    ("score", SCORE_COLUMNS),
    ("reference", "prompt_tokens"), ("reference", "response_tokens"), ("reference", "response_truncated"),
    ("reference", "ref_logprob"), ("reference", "value"),
    ("advantage", "advantage"), ("advantage", "positive"),
)
"""(table, column) of each column of the joined view, in order; `prompt_text` is computed from ingest's prompt."""

JOINED_ROW = ("one ingest row (every split) with its reward, pi_ref's numbers (train and validation rows) and its "
              "advantage (training rows trained on); null where a stage has no row for it")


def joined_schema(component_names: Sequence[str]) -> pa.Schema:
    """The joined view's columns with the descriptions of the table columns they come from."""
    fields: list[pa.Field] = []
    for table, name in JOINED_COLUMNS:
        schema = TABLES[table].schema(component_names)
        if name == PROMPT_TEXT.name:
            fields.append(PROMPT_TEXT)
        elif name == SCORE_COLUMNS:
            fields += [f for f in schema if f.name != "id"]
        else:
            field = schema.field(name)
            fields.append(column(name, field.type, f"{column_description(field)} ({table})"))
    return pa.schema(fields)
