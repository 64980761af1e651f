"""Batched generation: prompts encoded as in training (stages.models.tokenize), left padding,
batches of similar prompt length, greedy or seeded sampling.

Greedy decoding is our own loop (`greedy_decode`), not transformers' `generate`: continuous
batching (a row that has produced EOS frees its slot for the next prompt, so steps run on full
batches), keys and values in preallocated buffers written in place (no copy of the cache per
step), the prompts' shared prefix (a chat template's system prompt and role header) computed once,
logits at the last position only, and no logits-processor or stopping-criteria machinery
per step. Each row's tokens are those `generate(do_sample=False)` gives it (tests/test_generate.py
checks it on a tiny model, bench/decode.py on SmolLM2). Sampling goes through `generate`. On the
CPU, `generate` below runs either path with the linear layers' weights packed once for MKL's GEMM
(stages.models.packed), whose sums round differently in the last bits.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Sequence
from typing import Any

import torch
from tqdm.auto import tqdm

from stages.models.packed import packed_linears
from stages.models.tokenize import Messages, encode_prompt

PROGRESS_LOG_SECONDS = 10.0


def _left_padded(rows: Sequence[Sequence[int]], pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, width - len(row) :] = torch.tensor(row, dtype=torch.long)
        mask[i, width - len(row) :] = 1
    return ids.to(device), mask.to(device)


@functools.cache
def _slot_classes() -> tuple[type, type]:
    """(the slot layer, the cache over such layers): transformers' classes, imported when decoding starts."""
    from transformers.cache_utils import Cache, DynamicLayer

    class SlotLayer(DynamicLayer):
        """One attention layer's keys and values for the decoding slots, in preallocated buffers
        [slots, kv heads, capacity, head dim]: a decode step writes its column in place, where
        DynamicLayer concatenates and so copies the whole cache at every step (42% of a step of
        32 rows of SmolLM2 on the CPU). `keys`/`values` are views of the columns in use."""

        is_croppable = False

        def __init__(self, keys: torch.Tensor, values: torch.Tensor):
            super().__init__()
            self.device, self.is_initialized = keys.device, True
            self.apply(keys, values, 0)

        def apply(self, kbuf: torch.Tensor, vbuf: torch.Tensor, length: int) -> None:
            self.kbuf, self.vbuf, self.length = kbuf, vbuf, length
            self.view()

        def view(self) -> None:
            self.keys, self.values = self.kbuf[:, :, : self.length], self.vbuf[:, :, : self.length]

        def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any):
            n = key_states.shape[-2]
            self.kbuf[:, :, self.length : self.length + n] = key_states
            self.vbuf[:, :, self.length : self.length + n] = value_states
            self.length += n
            self.view()
            return self.keys, self.values

        def get_seq_length(self) -> int:
            return self.length

    class SlotCache(Cache):
        def __init__(self, layers: list[SlotLayer]):
            super().__init__(layers=layers)

    return SlotLayer, SlotCache


def slots_supported(model: Any) -> bool:
    """Continuous batching needs full attention in every layer (no sliding window, no linear attention):
    the layers transformers' DynamicCache would build for this model are all plain DynamicLayers."""
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer

    layers = DynamicCache(config=model.config).layers
    return bool(layers) and all(type(layer) is DynamicLayer for layer in layers)


class _Slots:
    """Continuous batching for greedy decoding: `slots` rows decode side by side; a row that produced EOS
    (or its last token) frees its slot, and prompts still waiting are prefilled into the free slots, so
    every step runs on a full batch where static batches wait for their longest row.

    All slots share the KV columns: a step appends column `length`; a prompt of p tokens admitted when
    `length` columns are in use occupies columns [length - p, length) of its slot (the columns before
    it are masked, as left padding is). Positions are per row (prompt tokens 0..p-1, then one more per
    step), as in transformers' generate with left padding. When the buffers are full, the columns no
    live row uses are dropped (they all lie before the oldest live row's first column)."""

    def __init__(self, model: Any, slots: int, capacity: int):
        self.model = model
        config = model.config
        heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        dtype = next(model.parameters()).dtype
        self.shape = (slots, heads, capacity, head_dim)
        slot_layer, slot_cache = _slot_classes()
        self.layers = [
            slot_layer(torch.zeros(self.shape, dtype=dtype, device=model.device), torch.zeros(self.shape, dtype=dtype, device=model.device))
            for _ in range(config.num_hidden_layers)
        ]
        self.cache = slot_cache(self.layers)
        self.mask = torch.zeros((slots, 0), dtype=torch.long, device=model.device)
        self.position = torch.zeros((slots, 1), dtype=torch.long, device=model.device)
        self.row: list[int | None] = [None] * slots  # the prompt decoded in each slot, None when free
        self.prefix, self.prefix_length = None, 0  # share_prefix

    @property
    def length(self) -> int:
        """Columns in use (each layer's; a step's forward pass appends one to every layer)."""
        return self.layers[0].length

    @property
    def capacity(self) -> int:
        return self.shape[2]

    def free(self) -> list[int]:
        return [s for s, row in enumerate(self.row) if row is None]

    def live(self) -> list[int]:
        return [s for s, row in enumerate(self.row) if row is not None]

    def _set_columns(self, kbufs: list[torch.Tensor], vbufs: list[torch.Tensor], length: int) -> None:
        for layer, k, v in zip(self.layers, kbufs, vbufs):
            layer.apply(k, v, length)
        self.shape = tuple(kbufs[0].shape)

    def _prompt_columns(self, width: int) -> None:
        """At least `width` columns in use, so a prompt of `width` tokens can end at the current column:
        every row moves right when the new prompt is longer (rare: prompts come longest first)."""
        if self.length < width:
            self._relayout(start=0, shift=width - self.length)

    def _step_column(self) -> None:
        """A free column at the end for the next step: when the buffers are full, the columns before the
        oldest live row's first one are dropped (the buffers grow only if that frees none)."""
        if self.length < self.capacity:
            return
        live = self.live()
        used = self.mask[live].sum(0).nonzero() if live else None
        self._relayout(start=int(used[0]) if used is not None and len(used) else self.length, shift=0)

    def _relayout(self, start: int, shift: int) -> None:
        """Columns [start, length) moved to [shift, shift + length - start), in buffers at least twice that wide."""
        kept = self.length - start
        capacity = max(self.capacity, 2 * (shift + kept))
        shape = (self.shape[0], self.shape[1], capacity, self.shape[3])
        kbufs, vbufs = [], []
        for layer in self.layers:
            k, v = layer.kbuf.new_zeros(shape), layer.vbuf.new_zeros(shape)
            k[:, :, shift : shift + kept] = layer.kbuf[:, :, start : self.length]
            v[:, :, shift : shift + kept] = layer.vbuf[:, :, start : self.length]
            kbufs.append(k)
            vbufs.append(v)
        mask = self.mask.new_zeros((self.shape[0], shift + kept))
        mask[:, shift:] = self.mask[:, start:]
        self.mask = mask
        self._set_columns(kbufs, vbufs, shift + kept)

    def _adopt_dtypes(self, keys: torch.dtype, values: torch.dtype) -> None:
        """Buffers in the dtypes the model's keys and values come in: the weights' dtype, or under autocast
        (train.mixed_precision bf16: accelerate runs the model's forward in it, validation decoding included)
        bf16 values and keys in the rotary embedding's precision."""
        if (self.layers[0].kbuf.dtype, self.layers[0].vbuf.dtype) != (keys, values):
            self._set_columns([layer.kbuf.to(keys) for layer in self.layers], [layer.vbuf.to(values) for layer in self.layers],
                              self.length)

    def share_prefix(self, prefix: list[int]) -> None:
        """Keys and values of `prefix`, the tokens every prompt to come starts with (a chat template's system
        prompt and role header), computed once here; `admit` then prefills only what follows it."""
        from transformers import DynamicCache

        self.prefix, self.prefix_length = None, len(prefix)
        if prefix:
            self.prefix = DynamicCache(config=self.model.config)
            ids = torch.tensor([prefix], dtype=torch.long, device=self.model.device)
            self.model(input_ids=ids, position_ids=torch.arange(len(prefix), device=self.model.device)[None],
                       cache=self.prefix, use_cache=True, logits_to_keep=1)

    def _prefill_cache(self, rows: int) -> Any:
        """A cache holding the shared prefix for `rows` prompts, which the prefill appends to."""
        from transformers import DynamicCache

        cache = DynamicCache(config=self.model.config)
        for index, layer in enumerate(self.prefix.layers if self.prefix is not None else []):
            cache.update(layer.keys.expand(rows, -1, -1, -1), layer.values.expand(rows, -1, -1, -1), index)
        return cache

    def admit(self, slots: list[int], rows: list[int], prompts: list[list[int]], pad_id: int) -> torch.Tensor:
        """Prefill `prompts` (of prompt `rows`) into free `slots`; their first greedy tokens. Each prompt starts
        with the shared prefix (`share_prefix`): only the rest is prefilled, left-padded, after the prefix's
        columns, so a row's columns are its prefix, the padding (masked), then the rest of its prompt."""
        skip = self.prefix_length
        input_ids, suffix_mask = _left_padded([p[skip:] for p in prompts], pad_id, self.model.device)
        positions = (skip + suffix_mask.cumsum(-1) - 1).masked_fill(suffix_mask == 0, 0)
        attention_mask = torch.cat([suffix_mask.new_ones((len(prompts), skip)), suffix_mask], dim=-1)
        prefill = self._prefill_cache(len(prompts))
        logits = self.model(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=positions, cache=prefill, use_cache=True,
            logits_to_keep=1,
        ).logits
        width = attention_mask.shape[1]
        self._adopt_dtypes(prefill.layers[0].keys.dtype, prefill.layers[0].values.dtype)
        self._prompt_columns(width)
        index = torch.tensor(slots, device=self.model.device)
        for layer, new in zip(self.layers, prefill.layers):
            layer.kbuf[index, :, self.length - width : self.length] = new.keys
            layer.vbuf[index, :, self.length - width : self.length] = new.values
            layer.view()
        self.mask[index] = 0
        self.mask[index, self.length - width :] = attention_mask
        self.position[index] = positions[:, -1:]
        for slot, row in zip(slots, rows):
            self.row[slot] = row
        return logits[:, -1].argmax(-1)

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """One decode step of every slot (free slots decode a pad, attending to themselves only); the next tokens."""
        self._step_column()
        self.mask = torch.cat([self.mask, self.mask.new_ones((self.shape[0], 1))], dim=-1)
        self.position = self.position + 1
        logits = self.model(
            input_ids=tokens[:, None], attention_mask=self.mask, position_ids=self.position, cache=self.cache,
            use_cache=True, logits_to_keep=1,
        ).logits
        return logits[:, -1].argmax(-1)

    def release(self, slot: int) -> None:
        self.row[slot] = None
        self.mask[slot] = 0

    def shrink(self) -> None:
        """Keep only the live slots (the tail of a decode, when no prompt waits for a free slot)."""
        keep = self.live()
        index = torch.tensor(keep, device=self.model.device)
        kbufs = [layer.kbuf[index] for layer in self.layers]
        vbufs = [layer.vbuf[index] for layer in self.layers]
        self.mask, self.position = self.mask[index], self.position[index]
        self.row = [self.row[s] for s in keep]
        self._set_columns(kbufs, vbufs, self.length)


def shared_prefix(prompts: Sequence[Sequence[int]]) -> list[int]:
    """The tokens every prompt starts with (with a chat template: its system prompt and role header), short of
    the shortest prompt's last token, whose logits each row's first token comes from."""
    if not prompts:
        return []
    first, shortest = prompts[0], min(len(p) for p in prompts)
    length = 0
    while length < shortest - 1 and all(p[length] == first[length] for p in prompts):
        length += 1
    return list(first[:length])


def greedy_decode(
    model: Any, prompts: Sequence[Sequence[int]], *, eos_id: int, pad_id: int, max_new_tokens: int, slots: int,
    on_finished: Any = None, prefix_length: int | None = None,
) -> list[list[int]]:
    """The greedy continuation of each prompt (token ids), up to and including its first EOS (at most
    `max_new_tokens` tokens), by continuous batching over `slots` rows (`_Slots`), prompts admitted in
    the order given. Prompts wait until a quarter of the slots is free (a prefill per freed row would
    cost a forward pass each). `on_finished(tokens)` is called as each row ends.

    The first `prefix_length` tokens, the same in every prompt, are computed once (default: the
    `shared_prefix` of `prompts`). A row's logits differ in the last bits with the prefix's length (its
    keys and values come from a forward of that length), so a decode split in shards passes the length
    shared by all its prompts, and every shard decodes each row as the whole would."""
    waiting = list(range(len(prompts)))[::-1]  # popped from the end: the order given
    tokens: list[list[int]] = [[] for _ in prompts]
    longest = max((len(p) for p in prompts), default=0)
    state = _Slots(model, min(slots, len(prompts)), capacity=2 * (longest + max_new_tokens))
    if prefix_length is None:
        prefix = shared_prefix(prompts)
    else:
        prefix = list(prompts[0][:prefix_length]) if prompts else []
        if any(len(p) <= prefix_length or list(p[:prefix_length]) != prefix for p in prompts):
            raise ValueError(f"prefix_length {prefix_length}: not a prefix that every prompt has and goes on after")
    state.share_prefix(prefix)
    batch_tokens = torch.full((state.shape[0],), pad_id, dtype=torch.long, device=model.device)
    admit_at = max(1, state.shape[0] // 4)

    def record(slot_tokens: list[tuple[int, int]]) -> None:
        for slot, token in slot_tokens:
            row = state.row[slot]
            tokens[row].append(token)
            if token == eos_id or len(tokens[row]) >= max_new_tokens:
                state.release(slot)
                if on_finished is not None:
                    on_finished(tokens[row])

    while waiting or state.live():
        free = state.free()
        if waiting and (len(free) >= admit_at or len(free) >= len(waiting) or not state.live()):
            rows = [waiting.pop() for _ in range(min(len(free), len(waiting)))]
            chosen = state.admit(free[: len(rows)], rows, [prompts[r] for r in rows], pad_id)
            batch_tokens[free[: len(rows)]] = chosen
            record(list(zip(free, chosen.tolist())))
            continue
        if not waiting and len(state.live()) <= state.shape[0] // 2:
            keep = state.live()
            batch_tokens = batch_tokens[keep]
            state.shrink()
        live = state.live()
        batch_tokens = state.step(batch_tokens)
        chosen = batch_tokens.tolist()  # the one host sync per step
        record([(slot, chosen[slot]) for slot in live])
    return tokens


class _Progress:
    """A tqdm bar over rows and, every PROGRESS_LOG_SECONDS, a log line with rows, tokens, tokens/s and an ETA."""

    def __init__(self, log: logging.Logger | None, total_rows: int):
        self.log, self.total, self.rows, self.tokens = log, total_rows, 0, 0
        self.start = self.last_log = time.monotonic()
        self.bar = tqdm(total=total_rows, desc="greedy decoding", unit="rows", disable=log is None)

    def update(self, rows: int, tokens: int) -> None:
        self.rows, self.tokens = self.rows + rows, self.tokens + tokens
        now = time.monotonic()
        elapsed = max(now - self.start, 1e-9)
        self.bar.update(rows)
        self.bar.set_postfix(tokens=self.tokens, tokens_per_s=f"{self.tokens / elapsed:.1f}", refresh=False)
        if self.log is not None and (now - self.last_log >= PROGRESS_LOG_SECONDS or self.rows == self.total):
            self.last_log = now
            eta = elapsed / self.rows * (self.total - self.rows)
            self.log.info(
                "greedy decoding: %d/%d rows, %d tokens, %.1f tokens/s, ETA %.0f s",
                self.rows, self.total, self.tokens, self.tokens / elapsed, eta,
            )

    def close(self) -> None:
        self.bar.close()


def generate(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[Messages],
    *,
    max_prompt_tokens: int,
    max_new_tokens: int,
    batch_size: int,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_p: float = 1.0,
    seed: int = 0,
    progress: logging.Logger | None = None,
    prefix_length: int | None = None,
) -> list[str]:
    """Responses to `prompts`, in order, longest prompts first, left padding, stop at EOS.

    Greedy by default: continuous batching over `batch_size` slots (`greedy_decode`) for models with
    full attention in every layer, else transformers' `generate` on static batches of similar prompt
    length; sampling goes through `generate` and uses `seed` (the global RNG is restored afterwards).
    The decoded text drops special tokens and surrounding whitespace. `progress`: the stage's logger,
    for a progress bar and a log line every few seconds (rows, tokens, tokens/s, ETA); None for quiet.
    `prefix_length`: greedy_decode's (a decode split in shards: the prefix all its prompts share).
    """
    from transformers import GenerationConfig

    encoded = [encode_prompt(tokenizer, p, max_prompt_tokens) for p in prompts]
    order = sorted(range(len(encoded)), key=lambda i: (-len(encoded[i]), i))
    new_tokens: list[list[int]] = [[] for _ in encoded]
    devices = [] if model.device.type == "cpu" else None
    bar = _Progress(progress, len(encoded))
    try:
        with torch.random.fork_rng(devices=devices), torch.inference_mode(), packed_linears(model, rows=batch_size):
            torch.manual_seed(seed)
            if not do_sample and slots_supported(model):
                decoded = greedy_decode(
                    model, [encoded[i] for i in order], eos_id=tokenizer.eos_token_id, pad_id=tokenizer.pad_token_id,
                    max_new_tokens=max_new_tokens, slots=batch_size, on_finished=lambda row: bar.update(1, len(row)),
                    prefix_length=prefix_length,
                )
                for i, row in zip(order, decoded):
                    new_tokens[i] = row
            else:
                sampling = {"temperature": temperature, "top_p": top_p} if do_sample else {}
                config = GenerationConfig(
                    max_new_tokens=max_new_tokens, do_sample=do_sample, pad_token_id=tokenizer.pad_token_id,
                    eos_token_id=tokenizer.eos_token_id, **sampling,
                )
                for start in range(0, len(order), batch_size):
                    batch = order[start : start + batch_size]
                    input_ids, attention_mask = _left_padded([encoded[i] for i in batch], tokenizer.pad_token_id, model.device)
                    output = model.generate(input_ids=input_ids, attention_mask=attention_mask, generation_config=config)
                    for i, row in zip(batch, output[:, input_ids.shape[1] :].tolist()):
                        new_tokens[i] = row
                    bar.update(len(batch), sum(len(new_tokens[i]) for i in batch))
    finally:
        bar.close()
    return [text.strip() for text in tokenizer.batch_decode(new_tokens, skip_special_tokens=True)]
