"""Ingest stage: its configuration section (`data`) and the tables it writes."""

from __future__ import annotations

from typing import Literal

import pyarrow as pa
from pydantic import Field, PositiveInt, model_validator

from schemas.base import Section, column
from schemas.manifest import StageMetrics

SPLITS = ("train", "validation", "test")
PAIRLESS_FORMATS = ("prompt_response", "messages")
"""Row formats without preference pairs (the chatterbot source is one of them)."""
FINAL = "final"
"""The locked final test split (data.final_fraction > 0): evaluate reads it only when asked (evaluate.split)."""


class ColumnMapping(Section):
    """Which source columns hold which field. Unmapped source columns are kept as JSON in `meta`."""

    prompt: str = Field("prompt", description="Column holding the prompt (text or a list of chat messages).")
    response: str = Field(
        "response", description="Column holding the response; `completion` is accepted when this column is absent."
    )
    messages: str = Field("messages", description="Column holding a conversation as a list of {role, content}.")
    chosen: str = Field("chosen", description="Column holding the preferred response (or HH-RLHF transcript).")
    rejected: str = Field("rejected", description="Column holding the dispreferred response (or HH-RLHF transcript).")
    split: str = Field("split", description="Column naming the split of a row, when the source has one.")


class SplitFractions(Section):
    """Fractions used when the source has no split column: a hash of the prompt picks the split."""

    train: float = Field(0.8, ge=0, le=1, description="Share of prompts in the training split.")
    validation: float = Field(0.1, ge=0, le=1, description="Share of prompts in the validation split (value targets, checkpoint choice).")
    test: float = Field(0.1, ge=0, le=1, description="Share of prompts in the test split (evaluation only).")

    @model_validator(mode="after")
    def _sum_to_one(self) -> SplitFractions:
        total = self.train + self.validation + self.test
        if abs(total - 1.0) > 1e-6:
            raise ValueError(f"split fractions must sum to 1, got {total:g}")
        return self


class DataConfig(Section):
    """Where the offline data comes from and how each row is read and checked."""

    source: Literal["chatterbot", "file", "datasets"] = Field(
        "chatterbot",
        description="`chatterbot`: the English chatterbot-corpus (embedded default); `file`: a local JSONL, "
        "JSON, CSV or Parquet file; `datasets`: anything `datasets.load_dataset` accepts (hub name or saved folder).",
    )
    path: str | None = Field(
        None, description="File path (source=file), or hub name / saved dataset folder (source=datasets)."
    )
    dataset_config: str | None = Field(None, description="Dataset configuration name for `datasets.load_dataset`.")
    dataset_split: str | None = Field(
        None,
        description="Only this split of a `datasets` source (all splits when unset). A single split is divided by "
        "prompt hash (split_fractions) unless it has a split column; with all splits, a source without a "
        "validation split gives validation a prompt-hash share of its train split.",
    )
    format: Literal["auto", "prompt_response", "messages", "hh", "preference"] = Field(
        "auto",
        description="Row format: prompt/response pairs, chat `messages` lists, Anthropic HH-RLHF transcripts, "
        "or prompt/chosen/rejected preference pairs. `auto` picks from the columns present.",
    )
    columns: ColumnMapping = Field(default_factory=ColumnMapping, description="Source column names.")
    split_fractions: SplitFractions = Field(default_factory=SplitFractions, description="Used when the source has no splits.")
    final_fraction: float = Field(
        0.0, ge=0, lt=1,
        description="Share of the test prompts locked away as the `final` split, chosen by a hash of the prompt "
        "independent of the split hash (train and validation rows are unchanged). Evaluate reads it only with "
        "evaluate.split: final (`alol run --final`); profiles are tuned on validation and test. 0: no final split.",
    )
    max_rows_per_split: PositiveInt | dict[Literal["train", "validation", "test", "final"], PositiveInt] | None = Field(
        None,
        description="Keep at most this many rows per split (one number for every split, or per split as "
        "{train: 400, validation: 64}; splits not named are not capped), the first by id order; a preference pair "
        "is ordered by its pair_id and kept or cut whole. For small runs. The rest go to `ingest_rejected` as "
        "`over_max_rows_per_split`.",
    )

    def splits(self) -> tuple[str, ...]:
        """The splits ingest writes: train, validation, test, and final when data.final_fraction > 0."""
        return (*SPLITS, FINAL) if self.final_fraction > 0 else SPLITS

    def split_cap(self, split: str) -> int | None:
        """The row cap of one split, or None."""
        if isinstance(self.max_rows_per_split, dict):
            return self.max_rows_per_split.get(split)
        return self.max_rows_per_split

    max_prompt_chars: int = Field(20_000, gt=0, description="Rows whose prompt text is longer are rejected.")
    max_response_chars: int = Field(8_000, gt=0, description="Rows whose response is longer are rejected.")
    on_invalid: Literal["quarantine", "fail"] = Field(
        "quarantine",
        description="`quarantine`: invalid rows go to the `ingest_rejected` table and the stage goes on; "
        "`fail`: the first invalid row stops the stage with an error naming file, row and field.",
    )
    batch_rows: int = Field(8192, gt=0, description="Rows per Arrow record batch while reading and writing.")

    @model_validator(mode="after")
    def _path_needed(self) -> DataConfig:
        if self.source in ("file", "datasets") and not self.path:
            raise ValueError(f"data.path is required when data.source is {self.source!r}")
        return self


MESSAGE_TYPE = pa.struct([("role", pa.string()), ("content", pa.string())])

INGEST_SCHEMA = pa.schema(
    [
        column("id", pa.string(), "Row id: a hash of the source name, the prompt and the response (the key every later table joins on)."),
        column("split", pa.string(), "train, validation or test (the source's split column, else a hash of the prompt)."),
        column("prompt", pa.list_(MESSAGE_TYPE), "The prompt as chat messages {role, content}; a text prompt is one user message."),
        column("response", pa.string(), "The response y from the data (never generated)."),
        column("pair_id", pa.string(), "Shared by the chosen and rejected row of one preference pair; null outside pairs."),
        column("preference", pa.string(), "chosen or rejected within a preference pair; null outside pairs."),
        column("source", pa.string(), "The source name (chatterbot, or the data file's or dataset's name)."),
        column("meta", pa.string(), "The row's unmapped source columns as JSON."),
    ]
)

# One row per rejected candidate row (a preference pair rejects both its rows). `source_row` is 1-based:
# the line number for JSONL and CSV, the element / row position for JSON arrays, Parquet and `datasets`
# splits, the pair position in its file for chatterbot. `reason` is a short code (`missing`, `empty`,
# `wrong_type`, `too_long`, `undecodable`, `invalid_json`, `duplicate_id`, `over_max_rows_per_split`, ...),
# `detail` says it in words, `raw` is the source row as text (JSON for structured sources).
REJECTED_SCHEMA = pa.schema(
    [
        column("source_file", pa.string(), "The file (or dataset split) the rejected row came from."),
        column("source_row", pa.int64(), "1-based row in that file: line for JSONL and CSV, position for JSON, Parquet, datasets."),
        column("field", pa.string(), "The field that failed its check (prompt, response, chosen, ...)."),
        column("reason", pa.string(), "Short code: missing, empty, wrong_type, too_long, duplicate_id, over_max_rows_per_split, ..."),
        column("detail", pa.string(), "The reason in words."),
        column("raw", pa.string(), "The source row as text (JSON for structured sources)."),
    ]
)


class IngestMetrics(StageMetrics):
    """What the ingest stage read and kept: every candidate row is in `ingest` or `ingest_rejected`."""

    source: str = Field(..., description="Source name (part of every row id).")
    format: str | None = Field(..., description="Row format detected or configured; None when no row fitted one.")
    source_rows: int = Field(..., description="Rows read from the source (a preference pair is one source row).")
    rows_per_split: dict[str, int] = Field(..., description="Rows of `ingest` per split.")
    pairs_out: int = Field(..., description="Preference pairs kept (two rows each).")
    rejected_by_reason: dict[str, int] = Field(..., description="Rows of `ingest_rejected` per reason.")
    rows_invalid: int = Field(..., description="Rejected rows other than those cut by data.max_rows_per_split.")
    rows_in_equals_out_plus_rejected: bool = Field(..., description="The accounting check (always true: the stage fails otherwise).")
