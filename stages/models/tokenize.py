"""Tokenisation of a row: the rendered prompt (chat template, left-truncated) and the response
(EOS appended, then right-truncated, so T <= max_response_tokens; a response cut short loses its EOS,
as in the authors' code: pi_theta is not taught to stop where the data did not stop), and the digest
of both token id lists that lets the train stage check it tokenises a row as the reference stage did."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

import numpy as np

Messages = Sequence[dict[str, str]]


def render_prompt(tokenizer: Any, prompt_messages: Messages) -> str:
    """The prompt text ending where the assistant's reply starts.

    With a chat template: the template with the generation prompt. Without one (base models):
    `role: content` lines followed by `assistant:`.
    """
    messages = [{"role": m["role"], "content": m["content"]} for m in prompt_messages]
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    lines = [f"{m['role']}: {m['content']}" for m in messages]
    return "\n".join(lines + ["assistant:"])


def encode_prompt(tokenizer: Any, prompt_messages: Messages, max_prompt_tokens: int) -> list[int]:
    """Token ids of the rendered prompt, truncated from the left to `max_prompt_tokens`."""
    text = render_prompt(tokenizer, prompt_messages)
    # A chat template writes its own special tokens; a plain prompt gets the tokenizer's usual ones (e.g. BOS).
    ids = tokenizer(text, add_special_tokens=not getattr(tokenizer, "chat_template", None))["input_ids"]
    return list(ids[-max_prompt_tokens:])


# User messages of different first characters: the tokens before them in every rendering are the template's.
PROBE_MESSAGES = ("Hi", "what?", "0 1", " x", "\u00e9t\u00e9")


def template_prefix(tokenizer: Any) -> list[int]:
    """The token ids that every prompt of one user message starts with: with a chat template, its system
    prompt and the user's role header (24 tokens for SmolLM2-Instruct); without one, what the plain rendering
    puts first (`user:`, after a BOS token where the tokenizer adds one). The common start of encode_prompt over PROBE_MESSAGES; a prompt shares
    it only if its own ids start with it (a prompt truncated from the left, or with its own system message,
    does not)."""
    probes = [encode_prompt(tokenizer, [{"role": "user", "content": text}], 1 << 30) for text in PROBE_MESSAGES]
    common = 0
    while all(len(ids) > common and ids[common] == probes[0][common] for ids in probes):
        common += 1
    return probes[0][:common]


def encode_response(tokenizer: Any, response: str, max_response_tokens: int) -> list[int]:
    """Response ids with EOS appended, then truncated from the right to `max_response_tokens`: a response
    of max_response_tokens tokens or more keeps its first max_response_tokens tokens and no EOS."""
    ids = tokenizer(response, add_special_tokens=False)["input_ids"]
    return (list(ids) + [tokenizer.eos_token_id])[:max_response_tokens]


def response_truncated(tokenizer: Any, response_ids: Sequence[int]) -> bool:
    """Whether encode_response cut the response: its ids do not end with EOS."""
    return not response_ids or response_ids[-1] != tokenizer.eos_token_id


def encode_pair(
    tokenizer: Any, prompt_messages: Messages, response: str, max_prompt_tokens: int, max_response_tokens: int
) -> tuple[list[int], list[int]]:
    """(prompt ids, response ids): prompt left-truncated, response right-truncated with EOS appended."""
    return (
        encode_prompt(tokenizer, prompt_messages, max_prompt_tokens),
        encode_response(tokenizer, response, max_response_tokens),
    )


def token_digest(prompt_ids: Sequence[int], response_ids: Sequence[int]) -> str:
    """blake2b-64 (hex) of the prompt and response ids as int64, with the prompt length first so that
    moving a token across the boundary changes it."""
    digest = hashlib.blake2b(digest_size=8)
    digest.update(np.array([len(prompt_ids), *prompt_ids, *response_ids], dtype=np.int64).tobytes())
    return digest.hexdigest()
