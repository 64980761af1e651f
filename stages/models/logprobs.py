"""Per-token log-probs of responses, l_t = log pi(y_t | x, y_<t), in length-grouped batches.

One causal forward over the prompt+response rows of a batch gives l_t for every response token and,
when asked, the last layer's hidden states at the prompt positions (the value features). The rows go
end to end into a few packed sequences (pack_rows), position ids restarting at every row, so that no
position is computed for padding: with a batch drawn at random (the SFT of pi_ref, the train step) a
third of a right-padded batch's positions are padding. A model whose mask does not follow the position
ids (packs_rows checks it once) gets right-padded rows instead.

Given a `shared_prefix` (the tokens a chat template puts before every prompt, its system prompt and the user's
role header: stages.models.tokenize.template_prefix), every packed sequence starts with one copy of it, and each
row that starts with it lays out only the rest, at the positions after the prefix, attending to that copy through
an explicit mask (prefix_mask; shares_prefixes checks once that the model honours it: sdpa and eager attention).
SmolLM2-Instruct's template puts 24 tokens before each prompt, half of a chatterbot row: a forward and backward
of 4 such rows took 0.75 s instead of 1.1-1.3, of 8 rows 1.25 s instead of 2.0-2.1 (2-core AMD EPYC). The
l_t are the same in arithmetic and differ from those of the row alone in the last bits. Whether a row shares the
prefix does not depend on the other rows of its batch (a row alone gets a bin with the prefix too), so a row is
laid out alike in any batch or shard.
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

    `bins[b]` lists the rows of sequence b in their order there, `starts[i]` is the position in its bin of
    row i's first token laid out, `width` the longest bin (shorter bins are filled with a segment of padding).
    Position ids restart at 0 for every row, so a model whose causal mask follows them (transformers'
    packed-sequence masks) lets each token attend only to its own row, at the positions it would have on its own.
    With a shared prefix (`prefix` > 0 tokens) every bin starts with it; a row that `shares` it is laid out from
    its token `prefix` on, at positions from `prefix`, and attends to the bin's prefix as to its own first tokens.
    """

    bins: list[list[int]]
    starts: list[int]
    bin_of: list[int]
    width: int
    prefix: int = 0
    shares: tuple[bool, ...] = ()

    def skipped(self, i: int) -> int:
        """How many of row i's first tokens the bin's shared prefix stands for: `prefix` or 0."""
        return self.prefix if self.prefix and self.shares[i] else 0


def pack_rows(lengths: Sequence[int], context_cost: float, prefix: int = 0, shares: Sequence[bool] = ()) -> PackedRows:
    """First-fit decreasing into bins of a capacity chosen to minimise the estimated forward cost.

    A bin of width W costs W x (1 + W x context_cost) per row slot: the per-token work (the matmuls)
    plus attention, which a dense packed mask computes over the whole bin. The capacities tried are the
    longest row times powers of two, up to all rows in one bin; the longest row alone is the padded layout
    at worst, so packing never costs more than right padding does. With a shared `prefix` (its length), the
    rows that `shares` it are laid out without it, and every bin starts with it (its width counts it).
    """
    if not lengths:
        raise ValueError("no rows to pack")
    if prefix and (len(shares) != len(lengths) or not any(shares)
                   or any(s and n <= prefix for n, s in zip(lengths, shares))):
        raise ValueError(f"{len(shares)} shares flags for {len(lengths)} rows: none shares the prefix, or a row "
                         "sharing it ends within it")
    laid = [n - prefix if prefix and shares[i] else n for i, n in enumerate(lengths)]
    longest, total = max(laid), sum(laid)
    order = sorted(range(len(laid)), key=lambda i: (-laid[i], i))
    best: tuple[float, list[list[int]], list[int]] | None = None
    capacity = longest
    while True:
        bins: list[list[int]] = []
        fill: list[int] = []
        for i in order:
            for b, used in enumerate(fill):
                if used + laid[i] <= capacity:
                    bins[b].append(i)
                    fill[b] += laid[i]
                    break
            else:
                bins.append([i])
                fill.append(laid[i])
        width = prefix + max(fill)
        cost = len(bins) * width * (1.0 + width * context_cost)
        if best is None or cost < best[0]:
            best = (cost, bins, fill)
        if capacity >= total:
            break
        capacity = min(2 * capacity, total)
    _, bins, fill = best
    starts, bin_of = [0] * len(laid), [0] * len(laid)
    for b, members in enumerate(bins):
        offset = prefix
        for i in members:
            starts[i], bin_of[i] = offset, b
            offset += laid[i]
    return PackedRows(bins=bins, starts=starts, bin_of=bin_of, width=prefix + max(fill), prefix=prefix,
                      shares=tuple(bool(s) for s in shares) if prefix else ())


def context_cost(config: Any) -> float:
    """Attention's work per token and per token of context in its bin, relative to the rest of a token's work:
    1 / (4 x hidden). Counting FLOPs gives about 1 / (6 x hidden) (4 x hidden per layer against 2 x 12 x hidden^2);
    measured on SmolLM2 (fp32, CPU), attention over a packed mask runs at a lower rate than the matmuls, so it is
    costed higher. With hidden 576 a bin of 2,304 tokens costs twice its matmuls."""
    hidden = getattr(config, "hidden_size", None) or getattr(config, "n_embd", None) or 1024
    return 1.0 / (4.0 * hidden)


PREFIX, PADDING = -1, -2  # segment labels of a bin's shared prefix and of its unused tail


def _packed_inputs(
    rows: Sequence[Sequence[int]], layout: PackedRows, pad_id: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(input_ids, position_ids, segments) of the packed layout: segments labels each position with its row, PREFIX
    (the bin's shared prefix) or PADDING (a bin's unused tail, one more segment with positions from 0)."""
    ids = torch.full((len(layout.bins), layout.width), pad_id, dtype=torch.long)
    positions = torch.zeros((len(layout.bins), layout.width), dtype=torch.long)
    segments = torch.full((len(layout.bins), layout.width), PADDING, dtype=torch.long)
    ramp = torch.arange(layout.width)
    if layout.prefix:
        shared = next(rows[i] for i in range(len(rows)) if layout.shares[i])
        ids[:, : layout.prefix] = torch.tensor(shared[: layout.prefix], dtype=torch.long)
        positions[:, : layout.prefix] = ramp[: layout.prefix]
        segments[:, : layout.prefix] = PREFIX
    for b, members in enumerate(layout.bins):
        end = layout.prefix
        for i in members:
            skip = layout.skipped(i)
            start, end = layout.starts[i], layout.starts[i] + len(rows[i]) - skip
            ids[b, start:end] = torch.tensor(rows[i][skip:], dtype=torch.long)
            positions[b, start:end] = ramp[skip : len(rows[i])]
            segments[b, start:end] = i
        positions[b, end:] = ramp[: layout.width - end]
    return ids.to(device), positions.to(device), segments.to(device)


def prefix_mask(segments: torch.Tensor, shares: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The (bins, 1, width, width) attention mask of a layout with a shared prefix: a position attends to the
    positions up to itself in its own segment and, when its row `shares` the prefix, to the bin's prefix.
    Boolean (True: attend) for sdpa; with `dtype`, eager attention's additive form (0 or the dtype's minimum)."""
    width = segments.shape[1]
    causal = torch.ones(width, width, dtype=torch.bool, device=segments.device).tril()
    sees_prefix = (shares[segments.clamp(min=0)] & (segments >= 0))[:, :, None] & (segments == PREFIX)[:, None, :]
    mask = ((segments[:, :, None] == segments[:, None, :]) | sees_prefix) & causal
    if dtype is None:
        return mask[:, None]
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, torch.finfo(dtype).min)[:, None]


def _pad_id(model: Any) -> int:
    pad = getattr(model.config, "pad_token_id", None)
    return 0 if pad is None else int(pad)


MASK_FORMS = {"sdpa": None, "eager": "additive"}  # attention implementations that take prefix_mask


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
    input_ids, position_ids, segments = _packed_inputs(rows, layout, _pad_id(model), device)
    if padded:
        layout_inputs = {"attention_mask": (segments >= 0).long()}
    elif layout.prefix:  # the rows attend to the bin's prefix too: a mask of our own, with the positions
        form = MASK_FORMS[_attention_implementation(model)]
        shares = torch.tensor(layout.shares, dtype=torch.bool, device=device)
        mask = prefix_mask(segments, shares, model.dtype if form == "additive" else None)
        layout_inputs = {"attention_mask": mask, "position_ids": position_ids}
    else:  # no attention mask: transformers builds the packed-sequence mask from the position ids
        layout_inputs = {"position_ids": position_ids}
    keep = torch.zeros_like(input_ids, dtype=torch.bool)
    for i, (p, r) in enumerate(zip(prompt_ids, response_ids)):
        start = layout.starts[i] - layout.skipped(i) + len(p) - 1
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
        for i, p in enumerate(prompt_ids):
            skip, b, start = layout.skipped(i), layout.bin_of[i], layout.starts[i]
            own = last[b, start : start + len(p) - skip]
            states.append(torch.cat([last[b, :skip], own]) if skip else own)
    return per_row, states


def _attention_implementation(model: Any) -> str:
    return getattr(model.config, "_attn_implementation", None) or "eager"


def _checked_once(model: Any, attribute: str, check: Any) -> bool:
    """`check(model)` run once per model, in eval mode without grad, its answer kept on the model as `attribute`.
    A stages.train.step.PolicyForward is answered for the module it calls through to."""
    known = getattr(model, attribute, None)
    if known is not None:
        return known
    if hasattr(model, "unwrapped"):
        answer = _checked_once(model.unwrapped, attribute, check)
    else:
        training = model.training
        model.eval()
        try:
            with torch.no_grad():
                answer = check(model)
        finally:
            model.train(training)
    setattr(model, attribute, answer)
    return answer


def _agrees_with_padding(model: Any, prompts: list[list[int]], responses: list[list[int]], layout: PackedRows) -> bool:
    padded, _ = _forward(model, prompts, responses, None, False)
    laid, _ = _forward(model, prompts, responses, layout, False)
    return all(torch.allclose(a, b, atol=1e-3, rtol=0) for a, b in zip(padded, laid))


def _check_packing(model: Any) -> bool:
    try:
        layout = PackedRows(bins=[[0, 1]], starts=[0, 4], bin_of=[0, 0], width=8)
        ok = _agrees_with_padding(model, [[1, 2, 3], [4, 5]], [[6], [7, 8]], layout)
        if not ok:
            log.warning("%s does not keep packed rows apart (its mask ignores position ids): its batches are "
                        "right-padded", type(model).__name__)
    except Exception as exc:  # noqa: BLE001 (a model whose forward does not take position_ids pads)
        log.warning("%s failed the packed-rows check (%s: %s): its batches are right-padded",
                    type(model).__name__, type(exc).__name__, exc)
        ok = False
    return ok


def _check_prefix_sharing(model: Any) -> bool:
    implementation = _attention_implementation(model)
    if implementation not in MASK_FORMS:
        log.info("%s attention takes no mask of ours: a shared prompt prefix is computed once per row", implementation)
        return False
    try:
        # Two rows share the prefix [1, 2], the third does not; with padding (a neighbour seeing the prefix, or
        # a sharing row not seeing it, or wrong positions) the l_t would differ.
        layout = pack_rows([4, 6, 3], 0.0, prefix=2, shares=[True, True, False])
        ok = _agrees_with_padding(model, [[1, 2, 3], [1, 2, 4, 5], [6, 7]], [[8], [9, 10], [11]], layout)
        if not ok:
            log.warning("%s does not follow an explicit attention mask: a shared prompt prefix is computed once per "
                        "row", type(model).__name__)
    except Exception as exc:  # noqa: BLE001 (a model whose forward takes no 4D mask computes the prefix per row)
        log.warning("%s failed the shared-prefix check (%s: %s): a shared prompt prefix is computed once per row",
                    type(model).__name__, type(exc).__name__, exc)
        ok = False
    return ok


def packs_rows(model: Any) -> bool:
    """Whether `model` keeps packed rows apart (its causal mask follows restarting position ids): checked
    once per model on two short rows, packed against right-padded."""
    return _checked_once(model, "_alol_packs_rows", _check_packing)


def shares_prefixes(model: Any) -> bool:
    """Whether `model` computes rows against a bin's shared prefix as it computes them alone (its attention takes
    prefix_mask and the position ids): checked once per model on three short rows, two of them sharing a
    prefix, against right-padded."""
    return _checked_once(model, "_alol_shares_prefixes", _check_prefix_sharing)


def _response_forward(
    model: Any, prompt_ids: Sequence[Sequence[int]], response_ids: Sequence[Sequence[int]], keep_prompt_states: bool,
    shared_prefix: Sequence[int] = (),
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """One causal forward over the rows: packed end to end (pack_rows) when the model keeps packed rows
    apart (packs_rows), so no position is spent on padding, else right-padded. Either way every real
    token has the positions and attention of an unpadded forward of its row alone. The rows that start with
    `shared_prefix` and go on after it share one copy of it per packed sequence when the model allows
    (shares_prefixes), a single row too, so that how a row is laid out does not depend on what else is in its batch."""
    if len(prompt_ids) != len(response_ids):
        raise ValueError(f"{len(prompt_ids)} prompts but {len(response_ids)} responses")
    for i, (p, r) in enumerate(zip(prompt_ids, response_ids)):
        if not p or not r:
            raise ValueError(f"row {i} of the batch has {len(p)} prompt and {len(r)} response tokens; both must be > 0")
    lengths = [len(p) + len(r) for p, r in zip(prompt_ids, response_ids)]
    prefix = list(shared_prefix)
    shares = [len(p) > len(prefix) and list(p[: len(prefix)]) == prefix for p in prompt_ids] if prefix else []
    layout = None
    if any(shares) and shares_prefixes(model):
        layout = pack_rows(lengths, context_cost(model.config), len(prefix), shares)
    elif len(prompt_ids) > 1 and packs_rows(model):
        layout = pack_rows(lengths, context_cost(model.config))
    return _forward(model, prompt_ids, response_ids, layout, keep_prompt_states)


def response_token_logprobs(
    model: Any, prompt_ids: Sequence[Sequence[int]], response_ids: Sequence[Sequence[int]],
    shared_prefix: Sequence[int] = (),
) -> list[torch.Tensor]:
    """Per-row tensors of l_t for t = 1..T (float32); differentiable when grad is enabled.

    L = sum_t l_t is `logprobs[i].sum()`. The caller chooses the batch (see `length_batches`). `shared_prefix`:
    tokens that prompts may start with (stages.models.tokenize.template_prefix), computed once per packed sequence.
    """
    return _response_forward(model, prompt_ids, response_ids, False, shared_prefix)[0]


def response_logprobs_and_prompt_states(
    model: Any, prompt_ids: Sequence[Sequence[int]], response_ids: Sequence[Sequence[int]],
    shared_prefix: Sequence[int] = (),
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """(per-row l_t, per-row last-layer hidden states over the prompt tokens (P_i x hidden)) from one forward.

    The model is causal, so the prompt positions of the prompt+response forward equal a prompt-only forward
    (those of a shared prefix are its bin's copy's).
    """
    return _response_forward(model, prompt_ids, response_ids, True, shared_prefix)
