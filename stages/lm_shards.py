"""A causal LM's work as per-shard functions (stages.executor): the model each function computes with, and decoding.

    pi_ref = ShardModel.of(mapper, path, model, tokenizer)
    responses = decode(mapper, "reference value-target decoding", pi_ref, tokenizer, prompts, settings, "alol.reference")

`ShardModel` is the model a per-shard function uses: with the local executor the model the stage has
already loaded (no second copy, so the numbers are those of that model), on Ray its folder, loaded
once per actor on the actor's device. A folder must be readable where the actors run (a base model
is resolved the same way on every node; an SFT pi_ref in the stage's output folder needs a shared
file system on a multi-node cluster).

`decode` gives `stages.models.generate.generate`'s responses, in input order: the prompts are put in
generate's own order (longest encoded prompt first) and cut into shards of whole decoding batches,
so each shard decodes the batches the whole list would (left padding depends on the batch). A
sampled decode is one shard: its random stream runs over the whole prompt list.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import torch

from stages.executor import ShardFunction, ShardMapper
from stages.models.generate import generate, shared_prefix
from stages.models.store import load_causal_lm, load_tokenizer
from stages.models.tokenize import Messages, encode_prompt


def torch_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def device_type(mapper: ShardMapper) -> str:
    """Where the mapper's per-shard functions compute: this process's device, or a GPU when Ray actors get one."""
    if mapper.in_process:
        return torch_device().type
    return "cuda" if mapper.resources.gpus_per_actor > 0 else "cpu"


@dataclass(frozen=True)
class ShardModel:
    """A causal LM for per-shard functions: `loaded` (model, tokenizer) in this process, or the `path` of its folder."""

    path: str
    loaded: tuple[Any, Any] | None = None

    @classmethod
    def of(cls, mapper: ShardMapper, path: Any, model: Any = None, tokenizer: Any = None) -> ShardModel:
        """The stage's own `model` when the mapper computes in this process and it is loaded, else its folder."""
        here = mapper.in_process and model is not None
        return cls(str(path), (model, tokenizer) if here else None)

    def load(self) -> tuple[Any, Any]:
        if self.loaded is not None:
            return self.loaded
        return load_causal_lm(self.path).to(torch_device()), load_tokenizer(self.path)


@dataclass(frozen=True)
class DecodeShards:
    """Builds the per-shard function of one decode: (prompt: JSON messages) rows -> (response)."""

    model: ShardModel
    settings: dict[str, Any]
    logger: str

    def __call__(self) -> ShardFunction:
        model, tokenizer = self.model.load()
        progress = logging.getLogger(self.logger)

        def decode_shard(shard: pa.Table) -> pa.Table:
            prompts = [json.loads(p) for p in shard.column("prompt").to_pylist()]
            return pa.table({"response": generate(model, tokenizer, prompts, **self.settings, progress=progress)})

        return decode_shard


def decode(
    mapper: ShardMapper, name: str, model: ShardModel, tokenizer: Any, prompts: Sequence[Messages], settings: dict[str, Any],
    logger: str,
) -> list[str]:
    """generate(model, tokenizer, prompts, **settings) through `mapper`: the responses in the order of `prompts`.

    `settings` are generate's keyword arguments (max_prompt_tokens, max_new_tokens, batch_size, and
    do_sample, temperature, top_p, seed when given); `tokenizer` encodes the prompts to order them."""
    encoded = [encode_prompt(tokenizer, p, settings["max_prompt_tokens"]) for p in prompts]
    order = sorted(range(len(prompts)), key=lambda i: (-len(encoded[i]), i))
    table = pa.table({"prompt": pa.array([json.dumps(prompts[i]) for i in order], pa.string())})
    model_batch = [len(prompts)] if settings.get("do_sample") and prompts else settings["batch_size"]
    # Every shard computes the prefix all the prompts share, so that a row decodes the same in any shard.
    settings = {**settings, "prefix_length": len(shared_prefix(encoded))}
    responses = mapper.map_shards(name, table, DecodeShards(model, settings, logger), model_batch).column("response")
    texts = [""] * len(prompts)
    for i, text in zip(order, responses.to_pylist()):
        texts[i] = text
    return texts
