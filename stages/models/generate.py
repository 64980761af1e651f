"""Batched generation: prompts encoded as in training (stages.models.tokenize), left padding,
batches of similar prompt length, greedy or seeded sampling."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from stages.models.tokenize import Messages, encode_prompt


def _left_padded(rows: Sequence[Sequence[int]], pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, width - len(row) :] = torch.tensor(row, dtype=torch.long)
        mask[i, width - len(row) :] = 1
    return ids.to(device), mask.to(device)


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
) -> list[str]:
    """Responses to `prompts`, in order: batches of similar prompt length, left padding, stop at EOS.

    Greedy by default; sampling uses `seed` (the global RNG is restored afterwards). The decoded
    text drops special tokens and surrounding whitespace.
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
    with torch.random.fork_rng(devices=devices), torch.no_grad():
        torch.manual_seed(seed)
        for start in range(0, len(order), batch_size):
            batch = order[start : start + batch_size]
            input_ids, attention_mask = _left_padded([encoded[i] for i in batch], tokenizer.pad_token_id, model.device)
            output = model.generate(input_ids=input_ids, attention_mask=attention_mask, generation_config=config)
            decoded = tokenizer.batch_decode(output[:, input_ids.shape[1] :], skip_special_tokens=True)
            for i, text in zip(batch, decoded):
                texts[i] = text.strip()
    return texts
