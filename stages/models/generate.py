"""Batched generation: prompts encoded as in training (stages.models.tokenize), left padding,
batches of similar prompt length, greedy or seeded sampling.

Greedy decoding is our own loop (`greedy_batch`), not transformers' `generate`: a row that has
produced EOS leaves the batch (its KV cache rows are dropped), only the last position's logits
are computed, and there is no logits-processor or stopping-criteria machinery per step. Its
tokens are those of `generate(do_sample=False)` with the same padding (tests/test_generate.py
checks it on a tiny model, bench/decode.py on SmolLM2). Sampling goes through `generate`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Any

import torch
from tqdm.auto import tqdm

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


def greedy_batch(
    model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor, *, eos_id: int, max_new_tokens: int
) -> list[list[int]]:
    """The greedy continuation of each left-padded row, up to and including its first EOS (at most
    `max_new_tokens` tokens). Positions follow transformers' generate: cumsum(mask) - 1, pads at 0."""
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    positions = (attention_mask.cumsum(-1) - 1).masked_fill(attention_mask == 0, 0)
    logits = model(
        input_ids=input_ids, attention_mask=attention_mask, position_ids=positions, cache=cache, use_cache=True,
        logits_to_keep=1,
    ).logits
    rows = list(range(input_ids.shape[0]))  # batch row of each live row
    tokens: list[list[int]] = [[] for _ in rows]
    last = positions[:, -1:]
    for step in range(max_new_tokens):
        chosen = logits[:, -1].argmax(-1)
        finished = []
        for live, token in enumerate(chosen.tolist()):  # the one host sync per step
            tokens[rows[live]].append(token)
            finished.append(token == eos_id)
        if step == max_new_tokens - 1 or all(finished):
            break
        if any(finished):
            keep = [i for i, done in enumerate(finished) if not done]
            index = torch.tensor(keep, device=chosen.device)
            cache.batch_select_indices(index)
            rows = [rows[i] for i in keep]
            chosen, attention_mask, last = chosen[index], attention_mask[index], last[index]
        attention_mask = torch.cat([attention_mask, attention_mask.new_ones((attention_mask.shape[0], 1))], dim=-1)
        last = last + 1
        logits = model(
            input_ids=chosen[:, None], attention_mask=attention_mask, position_ids=last, cache=cache, use_cache=True,
            logits_to_keep=1,
        ).logits
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
) -> list[str]:
    """Responses to `prompts`, in order: batches of similar prompt length, left padding, stop at EOS.

    Greedy by default (`greedy_batch`); sampling uses `seed` (the global RNG is restored afterwards).
    The decoded text drops special tokens and surrounding whitespace. `progress`: the stage's logger,
    for a progress bar and a log line every few seconds (rows, tokens, tokens/s, ETA); None for quiet.
    """
    from transformers import GenerationConfig

    encoded = [encode_prompt(tokenizer, p, max_prompt_tokens) for p in prompts]
    sampling = {"temperature": temperature, "top_p": top_p} if do_sample else {}
    config = GenerationConfig(
        max_new_tokens=max_new_tokens,
        do_sample=do_sample,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        **sampling,
    )
    order = sorted(range(len(encoded)), key=lambda i: (-len(encoded[i]), i))
    texts: list[str] = [""] * len(encoded)
    devices = [] if model.device.type == "cpu" else None
    bar = _Progress(progress, len(encoded))
    try:
        with torch.random.fork_rng(devices=devices), torch.no_grad():
            torch.manual_seed(seed)
            for start in range(0, len(order), batch_size):
                batch = order[start : start + batch_size]
                input_ids, attention_mask = _left_padded([encoded[i] for i in batch], tokenizer.pad_token_id, model.device)
                if do_sample:
                    output = model.generate(input_ids=input_ids, attention_mask=attention_mask, generation_config=config)
                    new_tokens = output[:, input_ids.shape[1] :].tolist()
                else:
                    new_tokens = greedy_batch(
                        model, input_ids, attention_mask, eos_id=tokenizer.eos_token_id, max_new_tokens=max_new_tokens
                    )
                decoded = tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
                for i, text in zip(batch, decoded):
                    texts[i] = text.strip()
                bar.update(len(batch), sum(len(t) for t in new_tokens))
    finally:
        bar.close()
    return texts
