"""The responses of pi_ref and of the policy to the evaluation prompts.

pi_ref's generations are cached on their own in a stages.cache.ParquetCache of (id, response)
tables under `<run.cache_dir>/generations`, keyed by pi_ref's content, the prompts, the generation
settings, the device and the code that generates: evaluating a second algorithm over the same
upstream generates only with the new policy. When the train stage kept no checkpoint
(`policy_is_reference`), the policy's generations are pi_ref's. Decoding runs through `run.executor`
(stages.lm_shards.decode: in this process, or on the `run.workers.evaluate` Ray actors, each loading the
model once); the device in the cache key is where the decoding ran.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

import pyarrow as pa

from schemas.base import canonical_json, sha256_text
from schemas.config import AlolConfig
from stages.cache import ParquetCache
from stages.catalog import policy_is_reference, policy_model_path, reference_model_path
from stages.evaluate.prompts import Prompt
from stages.executor import ShardMapper
from stages.io import StageReader, file_sha256
from stages.lm_shards import ShardModel, decode, device_type
from stages.models import generate as generate_module, tokenize as tokenize_module
from stages.models.store import load_tokenizer

log = logging.getLogger("alol.evaluate")
GENERATIONS_SCHEMA = pa.schema([("id", pa.string()), ("response", pa.string())])


def generation_settings(cfg: AlolConfig) -> dict[str, Any]:
    """Everything that changes what `stages.models.generate.generate` returns for a given model and prompts."""
    e = cfg.evaluate
    return {
        "max_prompt_tokens": cfg.reference.max_prompt_tokens,
        "max_new_tokens": e.max_new_tokens,
        "batch_size": e.batch_size,
        "do_sample": e.do_sample,
        "temperature": e.temperature,
        "top_p": e.top_p,
        "seed": cfg.run.seed,
    }


def model_fingerprint(model_path: Path, reference: StageReader) -> str:
    """sha256 over (relative path, file sha256) of the model folder's files.

    A folder inside the reference output (the SFT pi_ref) takes the sha256 values its manifest
    already verified; any other folder (the base model) is hashed.
    """
    model_path = Path(model_path).resolve()
    root = reference.dir.resolve()
    if model_path.is_relative_to(root):
        prefix = model_path.relative_to(root).as_posix() + "/"
        files = sorted((f.path[len(prefix) :], f.sha256) for f in reference.manifest.outputs if f.path.startswith(prefix))
    else:
        files = sorted((p.relative_to(model_path).as_posix(), file_sha256(p)) for p in model_path.rglob("*") if p.is_file())
    if not files:
        raise FileNotFoundError(f"{model_path}: no model files to fingerprint")
    return sha256_text(canonical_json(files))


def generation_code_version() -> str:
    """sha256 of the code whose change changes what generation returns (stages/models/tokenize.py,
    which encodes the prompts, and stages/models/generate.py) and of the torch and transformers versions."""
    sources = {module.__name__: inspect.getsource(module) for module in (tokenize_module, generate_module)}
    libs = {pkg: metadata.version(pkg) for pkg in ("torch", "transformers")}
    return sha256_text(canonical_json({**sources, **libs}))


def generations_key(model_id: str, ids: Sequence[str], prompts: Sequence[Prompt], settings: dict[str, Any], device: str) -> str:
    """sha256 of (model content, the prompts with their ids, the generation settings, device, code)."""
    payload = {
        "model": model_id,
        "prompts": sha256_text(canonical_json(list(zip(ids, prompts)))),
        "settings": settings,
        "device": device,
        "code": generation_code_version(),
    }
    return sha256_text(canonical_json(payload))


def cached_generations(
    cache: ParquetCache, key: str, ids: Sequence[str], produce: Callable[[], list[str]]
) -> tuple[list[str], bool]:
    """The responses stored under `key` (one per id, in the order of `ids`), else `produce()` them and store.

    Returns (responses, whether they came from the cache).
    """
    entry = cache.load(key, list(ids))
    if entry is not None:
        return entry.table.column("response").to_pylist(), True
    responses = produce()
    if len(responses) != len(ids):
        raise RuntimeError(f"generation returned {len(responses)} responses for {len(ids)} prompts")
    cache.save(key, pa.table({"id": list(ids), "response": responses}, schema=GENERATIONS_SCHEMA))
    return responses, False


def generate_responses(mapper: ShardMapper, model_path: Path, prompts: Sequence[Prompt], settings: dict[str, Any]) -> list[str]:
    """Decode every prompt (batched, left padding) with the model folder and the given settings, through `mapper`."""
    log.info("generating %d responses with %s", len(prompts), model_path)
    return decode(
        mapper, f"evaluate decoding ({Path(model_path).name})", ShardModel(str(model_path)), load_tokenizer(model_path),
        list(prompts), settings, log.name,
    )


class Generations:
    """pi_ref's responses through the cache, the policy's fresh (or pi_ref's when they are the same model)."""

    def __init__(self, cfg: AlolConfig, inputs: dict[str, StageReader], mapper: ShardMapper):
        self.mapper = mapper
        self.settings = generation_settings(cfg)
        self.cache = ParquetCache.under(cfg.run.cache_dir, "generations")
        self.reference_path = reference_model_path(cfg, inputs["reference"])
        self.reference_id = model_fingerprint(self.reference_path, inputs["reference"])
        self.policy_is_reference = policy_is_reference(inputs["train"])
        self.policy_path = None if self.policy_is_reference else policy_model_path(cfg, inputs["train"], inputs["reference"])
        self.reference_cache_hits = 0

    def reference(self, ids: Sequence[str], prompts: Sequence[Prompt]) -> list[str]:
        key = generations_key(self.reference_id, ids, prompts, self.settings, device_type(self.mapper))
        responses, hit = cached_generations(
            self.cache, key, ids, lambda: generate_responses(self.mapper, self.reference_path, prompts, self.settings)
        )
        self.reference_cache_hits += int(hit)
        log.info("pi_ref generations for %d prompts %s", len(ids), "reused from the cache" if hit else "generated")
        return responses

    def policy(self, prompts: Sequence[Prompt], reference_responses: list[str]) -> list[str]:
        if self.policy_path is None:
            return reference_responses
        return generate_responses(self.mapper, self.policy_path, prompts, self.settings)
