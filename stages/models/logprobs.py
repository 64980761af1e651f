"""Per-token log-probs of responses, l_t = log pi(y_t | x, y_<t), in length-grouped batches.

One causal forward over the prompt+response rows of a batch gives l_t for every response token and,
when asked, the last layer's hidden states at the prompt positions (the value features). The rows go
end to end into a few packed sequences (pack_rows), position ids restarting at every row, so that no
position is computed for padding: with a batch drawn at random (the SFT of pi_ref, the train step) a
third of a right-padded batch's positions are padding. A model whose mask does not follow the position
ids (packs_rows checks it once) gets right-padded rows instead.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

log = logging.getLogger("alol.models")


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


@dataclass(frozen=True)
class PackedRows:
    """Rows laid out end to end in a few sequences (bins) instead of one padded row each.

    `bins[b]` lists the rows of sequence b in their order there, `starts[i]` is row i's first position in
    its bin, `width` the longest bin (shorter bins are filled with a segment of padding). Position ids
    restart at 0 for every row, so a model whose causal mask follows them (transformers' packed-sequence
    masks) lets each token attend only to its own row, at the positions it would have on its own.
    """

    bins: list[list[int]]
    starts: list[int]
    bin_of: list[int]
    width: int


def pack_rows(lengths: Sequence[int], context_cost: float) -> PackedRows:
    """First-fit decreasing into bins of a capacity chosen to minimise the estimated forward cost.

    A bin of width W costs W x (1 + W x context_cost) per row slot: the per-token work (the matmuls)
    plus attention, which a dense packed mask computes over the whole bin. The capacities tried are the
    longest row times powers of two, up to all rows in one bin; the longest row alone is the padded layout
    at worst, so packing never costs more than right padding does.
    """
    if not lengths:
        raise ValueError("no rows to pack")
    longest, total = max(lengths), sum(lengths)
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    best: tuple[float, list[list[int]], list[int]] | None = None
    capacity = longest
    while True:
        bins: list[list[int]] = []
        fill: list[int] = []
        for i in order:
            for b, used in enumerate(fill):
                if used + lengths[i] <= capacity:
                    bins[b].append(i)
                    fill[b] += lengths[i]
                    break
            else:
                bins.append([i])
                fill.append(lengths[i])
        width = max(fill)
        cost = len(bins) * width * (1.0 + width * context_cost)
        if best is None or cost < best[0]:
            best = (cost, bins, fill)
        if capacity >= total:
            break
        capacity = min(2 * capacity, total)
    _, bins, fill = best
    starts, bin_of = [0] * len(lengths), [0] * len(lengths)
    for b, members in enumerate(bins):
        offset = 0
        for i in members:
            starts[i], bin_of[i] = offset, b
            offset += lengths[i]
    return PackedRows(bins=bins, starts=starts, bin_of=bin_of, width=max(fill))


def context_cost(config: Any) -> float:
    """Attention's work per token and per token of context in its bin, relative to the rest of a token's work:
    1 / (4 x hidden). Counting FLOPs gives about 1 / (6 x hidden) (4 x hidden per layer against 2 x 12 x hidden^2);
    measured on SmolLM2 (fp32, CPU), attention over a packed mask runs at a lower rate than the matmuls, so it is
    costed higher. With hidden 576 a bin of 2,304 tokens costs twice its matmuls."""
    hidden = getattr(config, "hidden_size", None) or getattr(config, "n_embd", None) or 1024
    return 1.0 / (4.0 * hidden)


def _packed_inputs(
    rows: Sequence[Sequence[int]], layout: PackedRows, pad_id: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, position_ids) of the packed layout; a bin's unused tail is one more segment of padding."""
    ids = torch.full((len(layout.bins), layout.width), pad_id, dtype=torch.long)
    positions = torch.zeros((len(layout.bins), layout.width), dtype=torch.long)
    ramp = torch.arange(layout.width)
    for b, members in enumerate(layout.bins):
        end = 0
        for i in members:
            start, end = layout.starts[i], layout.starts[i] + len(rows[i])
            ids[b, start:end] = torch.tensor(rows[i], dtype=torch.long)
            positions[b, start:end] = ramp[: len(rows[i])]
        positions[b, end:] = ramp[: layout.width - end]
    return ids.to(device), positions.to(device)


def _pad_id(model: Any) -> int:
    pad = getattr(model.config, "pad_token_id", None)
    return 0 if pad is None else int(pad)


def _forward(
    model: Any, prompt_ids: Sequence[Sequence[int]], response_ids: Sequence[Sequence[int]], layout: PackedRows | None,
    keep_prompt_states: bool,
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """One causal forward over the rows, packed (`layout`) or right-padded (None): per-row l_t and, with
    `keep_prompt_states`, the last layer's hidden states at each row's prompt positions.

    Logits are computed only at the positions P_i-1 .. P_i+T_i-2 that predict the response tokens;
    l_t = logit[y_t] - logsumexp(logit).
    """
    device = model.device
    rows = [list(p) + list(r) for p, r in zip(prompt_ids, response_ids)]
    padded = layout is None
    if padded:  # one row per bin, from its start: right padding, the padding masked out
        layout = PackedRows(bins=[[i] for i in range(len(rows))], starts=[0] * len(rows),
                            bin_of=list(range(len(rows))), width=max(len(r) for r in rows))
    input_ids, position_ids = _packed_inputs(rows, layout, _pad_id(model), device)
    if padded:
        attention_mask = torch.zeros_like(input_ids)
        for i, row in enumerate(rows):
            attention_mask[i, : len(row)] = 1
        layout_inputs = {"attention_mask": attention_mask}
    else:  # no attention mask: transformers builds the packed-sequence mask from the position ids
        layout_inputs = {"position_ids": position_ids}
    keep = torch.zeros_like(input_ids, dtype=torch.bool)
    for i, (p, r) in enumerate(zip(prompt_ids, response_ids)):
        start = layout.starts[i] + len(p) - 1
        keep[layout.bin_of[i], start : start + len(r)] = True
    # Kept logits come out in position order within each bin, bin after bin.
    kept_order = [i for members in layout.bins for i in sorted(members, key=lambda i: layout.starts[i])]
    targets = torch.tensor([t for i in kept_order for t in response_ids[i]], dtype=torch.long, device=device)

    captured: dict[str, torch.Tensor] = {}
    handle = None
    if keep_prompt_states:

        def _capture(_module: Any, _args: Any, output: Any) -> None:
            captured["last"] = output.last_hidden_state if hasattr(output, "last_hidden_state") else output[0]

        handle = model.get_decoder().register_forward_hook(_capture)
    try:
        logits = model(input_ids=input_ids, logits_to_keep=keep, use_cache=False, **layout_inputs).logits
    finally:
        if handle is not None:
            handle.remove()
    logits = logits.float()
    token_logprobs = logits.gather(-1, targets[:, None]).squeeze(-1) - torch.logsumexp(logits, dim=-1)
    per_row: list[torch.Tensor] = [torch.empty(0)] * len(rows)
    for i, values in zip(kept_order, torch.split(token_logprobs, [len(response_ids[i]) for i in kept_order])):
        per_row[i] = values
    states = []
    if keep_prompt_states:
        last = captured["last"]
        states = [last[layout.bin_of[i], layout.starts[i] : layout.starts[i] + len(p)] for i, p in enumerate(prompt_ids)]
    return per_row, states


def packs_rows(model: Any) -> bool:
    """Whether `model` keeps packed rows apart (its causal mask follows restarting position ids): checked
    once per model on two short rows, packed against right-padded, in eval mode without grad."""
    known = getattr(model, "_alol_packs_rows", None)
    if known is not None:
        return known
    if hasattr(model, "unwrapped"):  # stages.train.step.PolicyForward: the module it calls through to decides
        model._alol_packs_rows = packs_rows(model.unwrapped)
        return model._alol_packs_rows
    prompts, responses = [[1, 2, 3], [4, 5]], [[6], [7, 8]]
    training = model.training
    model.eval()
    try:
        with torch.no_grad():
            padded, _ = _forward(model, prompts, responses, None, False)
            layout = PackedRows(bins=[[0, 1]], starts=[0, 4], bin_of=[0, 0], width=8)
            packed, _ = _forward(model, prompts, responses, layout, False)
        ok = all(torch.allclose(a, b, atol=1e-3, rtol=0) for a, b in zip(padded, packed))
        if not ok:
            log.warning("%s does not keep packed rows apart (its mask ignores position ids): its batches are "
                        "right-padded", type(model).__name__)
    except Exception as exc:  # noqa: BLE001 (a model whose forward does not take position_ids pads)
        log.warning("%s failed the packed-rows check (%s: %s): its batches are right-padded",
                    type(model).__name__, type(exc).__name__, exc)
        ok = False
    finally:
        model.train(training)
    model._alol_packs_rows = ok
    return ok


def _response_forward(
    model: Any, prompt_ids: Sequence[Sequence[int]], response_ids: Sequence[Sequence[int]], keep_prompt_states: bool
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """One causal forward over the rows: packed end to end (pack_rows) when the model keeps packed rows
    apart (packs_rows), so no position is spent on padding, else right-padded. Either way every real
    token has the positions and attention of an unpadded forward of its row alone."""
    if len(prompt_ids) != len(response_ids):
        raise ValueError(f"{len(prompt_ids)} prompts but {len(response_ids)} responses")
    for i, (p, r) in enumerate(zip(prompt_ids, response_ids)):
        if not p or not r:
            raise ValueError(f"row {i} of the batch has {len(p)} prompt and {len(r)} response tokens; both must be > 0")
    layout = None
    if len(prompt_ids) > 1 and packs_rows(model):
        layout = pack_rows([len(p) + len(r) for p, r in zip(prompt_ids, response_ids)], context_cost(model.config))
    return _forward(model, prompt_ids, response_ids, layout, keep_prompt_states)


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
