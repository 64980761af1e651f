"""The log-prob pass: pi_ref's l_t of every response token (and the prompt states or V(x) from the same forward),
and the `reference` table.

`reference_logprobs` computes in this process; `logprob_pass` maps it over shards through the stage's
executor (stages.executor): the rows go in the pass's own batch order (stages.models.logprobs.length_batches)
and are cut at batch boundaries, so each shard's `reference_logprobs` forms the batches the whole pass
would, and the result is put back in row order.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import torch
from tqdm.auto import tqdm

from schemas.reference import REFERENCE_SCHEMA
from stages.faults import failpoint
from stages.executor import ShardFunction, ShardMapper
from stages.io import StageWriter
from stages.lm_shards import ShardModel
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
    shared_prefix: Sequence[int] = (),
) -> ReferencePass:
    """l_t of every response token in length-sorted batches under `token_budget`, no grad.

    With `head`, V(x) from the prompt positions of the same forward; with `keep_prompt_states`, those
    states themselves (P_i x hidden, float32, CPU). `shared_prefix`: computed once per packed sequence
    (stages.models.logprobs).
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
                rows = response_token_logprobs(model, prompts, responses, shared_prefix)
            else:
                rows, states = response_logprobs_and_prompt_states(model, prompts, responses, shared_prefix)
                if head is not None:
                    values[batch] = predict_values(head, states).cpu().numpy()
                if kept is not None:
                    for i, state in zip(batch, states):
                        kept[i] = state.float().cpu().clone()
            for i, lp in zip(batch, rows):
                token_logprobs[i] = lp.float().cpu().numpy()
            failpoint("reference.logprobs")
    return ReferencePass(token_logprobs, values, kept, sum(lengths), time.perf_counter() - started)  # type: ignore[arg-type]


@dataclass(frozen=True)
class LogprobShards:
    """Builds the per-shard function of a log-prob pass: (prompt_ids, response_ids) rows in batch order ->
    (token_logprobs, and value with a head, or prompt_states flattened (P_i x hidden) when kept)."""

    model: ShardModel
    token_budget: int
    head: AttentionPoolingValueHead | None = None
    keep_prompt_states: bool = False
    shared_prefix: tuple[int, ...] = ()

    def __call__(self) -> ShardFunction:
        model, _ = self.model.load()
        head = None if self.head is None else copy.deepcopy(self.head).to(model.device)

        def logprobs_shard(shard: pa.Table) -> pa.Table:
            result = reference_logprobs(
                model, shard.column("prompt_ids").to_pylist(), shard.column("response_ids").to_pylist(), self.token_budget,
                head=head, keep_prompt_states=self.keep_prompt_states, progress=False, shared_prefix=self.shared_prefix,
            )
            columns = {"token_logprobs": pa.array(result.token_logprobs, pa.list_(pa.float32()))}
            if result.values is not None:
                columns["value"] = pa.array(result.values, pa.float64())
            if result.prompt_states is not None:
                columns["prompt_states"] = pa.array([s.numpy().ravel() for s in result.prompt_states], pa.list_(pa.float32()))
            return pa.table(columns)

        return logprobs_shard


def _ragged(column: pa.ChunkedArray) -> list[np.ndarray]:
    """A list<float32> column as one numpy array per row."""
    values = pa.concat_arrays(column.chunks) if column.num_chunks else pa.array([], column.type)
    offsets = np.asarray(values.offsets)
    flat = values.flatten().to_numpy(zero_copy_only=False)
    return [flat[start:stop] for start, stop in zip(offsets[:-1] - offsets[0], offsets[1:] - offsets[0])]


def logprob_pass(
    mapper: ShardMapper, name: str, model: ShardModel, prompt_ids: Sequence[list[int]], response_ids: Sequence[list[int]],
    token_budget: int, head: AttentionPoolingValueHead | None = None, keep_prompt_states: bool = False,
    shared_prefix: Sequence[int] = (),
) -> ReferencePass:
    """`reference_logprobs` over the rows through `mapper`, in row order; `seconds` is the map's wall time."""
    lengths = [len(p) + len(r) for p, r in zip(prompt_ids, response_ids)]
    batches = length_batches(lengths, token_budget)
    order = [i for batch in batches for i in batch]
    table = pa.table({
        "prompt_ids": pa.array([prompt_ids[i] for i in order], pa.list_(pa.int64())),
        "response_ids": pa.array([response_ids[i] for i in order], pa.list_(pa.int64())),
    })
    started = time.perf_counter()
    output = mapper.map_shards(name, table, LogprobShards(model, token_budget, head, keep_prompt_states, tuple(shared_prefix)), [len(b) for b in batches])
    seconds = time.perf_counter() - started
    n = len(order)
    token_logprobs: list[np.ndarray] = [np.zeros(0, np.float32)] * n
    for i, lp in zip(order, _ragged(output.column("token_logprobs"))):
        token_logprobs[i] = lp
    values = None
    if head is not None:
        values = np.full(n, np.nan)
        values[order] = output.column("value").to_numpy()
    states = None
    if keep_prompt_states:
        states = [torch.empty(0)] * n
        for i, flat in zip(order, _ragged(output.column("prompt_states"))):
            states[i] = torch.from_numpy(flat.copy()).reshape(len(prompt_ids[i]), -1)
    return ReferencePass(token_logprobs, values, states, sum(lengths), seconds)


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
