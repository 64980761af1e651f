"""Per-token log-probs of responses, l_t = log pi(y_t | x, y_<t), in length-grouped batches.

One causal forward over right-padded prompt+response rows gives l_t for every response token and,
when asked, the last layer's hidden states at the prompt positions (the value features).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch


def length_batches(lengths: Sequence[int], token_budget: int) -> list[list[int]]:
    """Indices grouped into batches of similar length with rows x longest row <= token_budget.

    Rows are sorted longest first (so the largest batch comes first and memory problems show at
    once); a row longer than the budget gets a batch of its own.
    """
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    batches: list[list[int]] = []
    current: list[int] = []
    width = 0
    for i in order:
        if current and max(width, lengths[i]) * (len(current) + 1) > token_budget:
            batches.append(current)
            current, width = [], 0
        current.append(i)
        width = max(width, lengths[i])
    if current:
        batches.append(current)
    return batches


def _right_padded(rows: Sequence[Sequence[int]], pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        mask[i, : len(row)] = 1
    return ids.to(device), mask.to(device)


def _pad_id(model: Any) -> int:
    pad = getattr(model.config, "pad_token_id", None)
    return 0 if pad is None else int(pad)


def _response_forward(
    model: Any, prompt_ids: Sequence[Sequence[int]], response_ids: Sequence[Sequence[int]], keep_prompt_states: bool
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """One causal forward over right-padded prompt+response rows.

    Logits are computed only at the positions P_i-1 .. P_i+T_i-2 that predict the response tokens;
    l_t = logit[y_t] - logsumexp(logit). Right padding keeps every real token's positions and
    attention identical to an unpadded forward. With `keep_prompt_states`, the last layer's hidden
    states at the prompt positions (the value features) are captured from the same forward.
    """
    if len(prompt_ids) != len(response_ids):
        raise ValueError(f"{len(prompt_ids)} prompts but {len(response_ids)} responses")
    for i, (p, r) in enumerate(zip(prompt_ids, response_ids)):
        if not p or not r:
            raise ValueError(f"row {i} of the batch has {len(p)} prompt and {len(r)} response tokens; both must be > 0")
    device = model.device
    rows = [list(p) + list(r) for p, r in zip(prompt_ids, response_ids)]
    input_ids, attention_mask = _right_padded(rows, _pad_id(model), device)
    keep = torch.zeros_like(input_ids, dtype=torch.bool)
    for i, (p, r) in enumerate(zip(prompt_ids, response_ids)):
        keep[i, len(p) - 1 : len(p) + len(r) - 1] = True
    targets = torch.tensor([t for r in response_ids for t in r], dtype=torch.long, device=device)

    captured: dict[str, torch.Tensor] = {}
    handle = None
    if keep_prompt_states:

        def _capture(_module: Any, _args: Any, output: Any) -> None:
            captured["last"] = output.last_hidden_state if hasattr(output, "last_hidden_state") else output[0]

        handle = model.get_decoder().register_forward_hook(_capture)
    try:
        logits = model(input_ids=input_ids, attention_mask=attention_mask, logits_to_keep=keep, use_cache=False).logits
    finally:
        if handle is not None:
            handle.remove()
    logits = logits.float()
    token_logprobs = logits.gather(-1, targets[:, None]).squeeze(-1) - torch.logsumexp(logits, dim=-1)
    per_row = list(torch.split(token_logprobs, [len(r) for r in response_ids]))
    states = [captured["last"][i, : len(p)] for i, p in enumerate(prompt_ids)] if keep_prompt_states else []
    return per_row, states


def response_token_logprobs(
    model: Any, prompt_ids: Sequence[Sequence[int]], response_ids: Sequence[Sequence[int]]
) -> list[torch.Tensor]:
    """Per-row tensors of l_t for t = 1..T (float32); differentiable when grad is enabled.

    L = sum_t l_t is `logprobs[i].sum()`. The caller chooses the batch (see `length_batches`).
    """
    return _response_forward(model, prompt_ids, response_ids, keep_prompt_states=False)[0]


def response_logprobs_and_prompt_states(
    model: Any, prompt_ids: Sequence[Sequence[int]], response_ids: Sequence[Sequence[int]]
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """(per-row l_t, per-row last-layer hidden states over the prompt tokens (P_i x hidden)) from one forward.

    The model is causal, so the prompt positions of the prompt+response forward equal a prompt-only forward.
    """
    return _response_forward(model, prompt_ids, response_ids, keep_prompt_states=True)
