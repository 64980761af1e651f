"""The train and validation rows of ingest, tokenised as the train stage will (stages.models.tokenize.encode_pair)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pyarrow.dataset as pads

from schemas.reference import ReferenceConfig
from stages.catalog import prompt_key
from stages.io import StageReader
from stages.models.tokenize import encode_pair, response_truncated, template_prefix

SPLITS = ("train", "validation")


@dataclass
class EncodedRows:
    """The train and validation rows of ingest, tokenised; validation prompts kept for the value targets, and
    the distinct prompts of the training rows trained on (`sft_rows`: unpaired or chosen) for built pairs."""

    ids: list[str] = field(default_factory=list)
    splits: list[str] = field(default_factory=list)
    preferences: list[str | None] = field(default_factory=list)
    prompt_ids: list[list[int]] = field(default_factory=list)
    response_ids: list[list[int]] = field(default_factory=list)
    truncated: list[bool] = field(default_factory=list)
    sft_rows: list[int] = field(default_factory=list)
    validation_prompts: dict[str, list[dict[str, str]]] = field(default_factory=dict)
    validation_first_row: dict[str, int] = field(default_factory=dict)
    sft_prompt_keys: list[str] = field(default_factory=list)  # prompt_key of each of sft_rows
    sft_prompts: dict[str, list[dict[str, str]]] = field(default_factory=dict)
    prompts_at_token_limit: int = 0
    responses_at_token_limit: int = 0
    shared_prefix: list[int] = field(default_factory=list)  # the tokenizer's template_prefix: computed once per batch


def encode_rows(ingest: StageReader, tokenizer: Any, ref: ReferenceConfig, batch_rows: int = 4096) -> EncodedRows:
    """Stream the train and validation rows of the `ingest` table and tokenise them (stages.models.tokenize.encode_pair)."""
    rows = EncodedRows(shared_prefix=template_prefix(tokenizer))
    wanted = pads.field("split").isin(list(SPLITS))
    columns = ["id", "split", "prompt", "response", "preference"]
    for batch in ingest.dataset("ingest").to_batches(columns=columns, filter=wanted, batch_size=batch_rows):
        for row in batch.to_pylist():
            prompt_ids, response_ids = encode_pair(
                tokenizer, row["prompt"], row["response"], ref.max_prompt_tokens, ref.max_response_tokens
            )
            truncated = response_truncated(tokenizer, response_ids)
            rows.prompts_at_token_limit += len(prompt_ids) == ref.max_prompt_tokens
            rows.responses_at_token_limit += truncated
            if row["split"] == "train" and row["preference"] in (None, "chosen"):
                rows.sft_rows.append(len(rows.ids))
                key = prompt_key(row["prompt"])
                rows.sft_prompt_keys.append(key)
                rows.sft_prompts.setdefault(key, row["prompt"])
            if row["split"] == "validation":
                key = prompt_key(row["prompt"])
                rows.validation_prompts.setdefault(key, row["prompt"])
                rows.validation_first_row.setdefault(key, len(rows.ids))
            rows.ids.append(row["id"])
            rows.splits.append(row["split"])
            rows.preferences.append(row["preference"])
            rows.prompt_ids.append(prompt_ids)
            rows.response_ids.append(response_ids)
            rows.truncated.append(truncated)
    return rows
