"""The log-prob pass: pi_ref's l_t of every response token (and the prompt states or V(x) from the same forward),
and the `reference` table."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from schemas.reference import REFERENCE_SCHEMA
from stages.faults import failpoint
from stages.io import StageWriter
from stages.models.logprobs import length_batches, response_logprobs_and_prompt_states, response_token_logprobs
from stages.models.tokenize import token_digest
from stages.reference.rows import EncodedRows
from stages.value_head import AttentionPoolingValueHead, predict_values

WRITE_ROWS = 8192


@dataclass
class ReferencePass:
    """Per row: l_t (float32), and V(x) when a head was given or the prompt states when asked for."""

    token_logprobs: list[np.ndarray]
    values: np.ndarray | None
    prompt_states: list[torch.Tensor] | None
    tokens: int
    seconds: float


def reference_logprobs(
    model: Any,
    prompt_ids: Sequence[list[int]],
    response_ids: Sequence[list[int]],
    token_budget: int,
    head: AttentionPoolingValueHead | None = None,
    keep_prompt_states: bool = False,
    progress: bool = True,
) -> ReferencePass:
    """l_t of every response token in length-sorted batches under `token_budget`, no grad.

    With `head`, V(x) from the prompt positions of the same forward; with `keep_prompt_states`, those
    states themselves (P_i x hidden, float32, CPU).
    """
    n = len(prompt_ids)
    token_logprobs: list[np.ndarray | None] = [None] * n
    values = np.full(n, np.nan) if head is not None else None
    kept: list[torch.Tensor | None] | None = [None] * n if keep_prompt_states else None
    lengths = [len(p) + len(r) for p, r in zip(prompt_ids, response_ids)]
    started = time.perf_counter()
    with torch.inference_mode():
        for batch in tqdm(length_batches(lengths, token_budget), desc="reference log-probs", unit="batch", disable=not progress):
            prompts, responses = [prompt_ids[i] for i in batch], [response_ids[i] for i in batch]
            if head is None and kept is None:
                rows = response_token_logprobs(model, prompts, responses)
            else:
                rows, states = response_logprobs_and_prompt_states(model, prompts, responses)
                if head is not None:
                    values[batch] = predict_values(head, states).cpu().numpy()
                if kept is not None:
                    for i, state in zip(batch, states):
                        kept[i] = state.float().cpu().clone()
            for i, lp in zip(batch, rows):
                token_logprobs[i] = lp.float().cpu().numpy()
            failpoint("reference.logprobs")
    return ReferencePass(token_logprobs, values, kept, sum(lengths), time.perf_counter() - started)  # type: ignore[arg-type]


def write_reference(out: StageWriter, rows: EncodedRows, token_logprobs: list[np.ndarray], values: np.ndarray) -> None:
    with out.table("reference", REFERENCE_SCHEMA) as table:
        for start in range(0, len(rows.ids), WRITE_ROWS):
            stop = min(start + WRITE_ROWS, len(rows.ids))
            token_lps = token_logprobs[start:stop]
            table.write(
                {
                    "id": rows.ids[start:stop],
                    "split": rows.splits[start:stop],
                    "preference": rows.preferences[start:stop],
                    "prompt_tokens": [len(p) for p in rows.prompt_ids[start:stop]],
                    "ref_logprob": [float(lp.astype(np.float64).sum()) for lp in token_lps],
                    "ref_token_logprobs": [lp.tolist() for lp in token_lps],
                    "response_tokens": [len(lp) for lp in token_lps],
                    "response_truncated": rows.truncated[start:stop],
                    "token_hash": [
                        token_digest(p, r) for p, r in zip(rows.prompt_ids[start:stop], rows.response_ids[start:stop])
                    ],
                    "value": values[start:stop].tolist(),
                }
            )
