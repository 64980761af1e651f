"""A model folder that `from_pretrained` loads alike in transformers 4.4x and 5.x, in a chosen dtype.

transformers 5 writes what only 5 reads well:
- config.json holds the rotary base only inside `rope_parameters`; 4.x reads the top-level
  `rope_theta` (and `rope_scaling`) and, finding none, silently uses its default 10000 (SmolLM2's is
  100000), so the model loads and generates garbage. Both spellings are written: 5 reads
  `rope_parameters` first, 4.x `rope_theta` / `rope_scaling`.
- tokenizer_config.json names the class `TokenizersBackend`, which 4.x does not have
  ("Tokenizer class TokenizersBackend does not exist"). `PreTrainedTokenizerFast` is the class
  both read from tokenizer.json alone (5 maps it back to its tokenizers backend).
- model.safetensors is written with mode 0600 (stages.models.store.readable_by_all).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Literal

import torch

from stages.models.store import load_causal_lm, load_tokenizer, save_model_folder

log = logging.getLogger("alol.export")

ExportDtype = Literal["fp32", "bf16", "fp16"]
DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
"""`alol export --dtype` -> the dtype the weights are saved in."""

PORTABLE_TOKENIZER_CLASS = "PreTrainedTokenizerFast"
"""The tokenizer class transformers 4.x and 5.x both load from tokenizer.json."""
VERSION_SPECIFIC_TOKENIZER_CLASSES = ("TokenizersBackend",)
"""Class names transformers 5 writes that 4.x cannot load."""
VERSION_SPECIFIC_TOKENIZER_KEYS = ("backend",)
"""tokenizer_config.json keys transformers 5 writes for itself (4.x would pass them to the tokenizer's __init__)."""


def portable_config(config: dict[str, Any]) -> dict[str, Any]:
    """config.json with the rotary settings also spelled as transformers 4.x reads them.

    A flat `rope_parameters` ({rope_type, rope_theta, ...}) gives `rope_theta` and, for a rope_type
    other than `default`, `rope_scaling` (4.x's name for the same dict); a config without rotary
    embeddings is returned as it is. Per-layer-type parameters (Gemma-3 style) have no 4.x spelling
    that covers every model, so they are left alone with a warning.
    """
    rope = config.get("rope_parameters")
    if not isinstance(rope, dict):
        return config
    if "rope_theta" not in rope:
        log.warning("config.json: rope_parameters %s has no rope_theta (nested per layer type?); left as it is", sorted(rope))
        return config
    out = dict(config)
    out["rope_theta"] = rope["rope_theta"]
    out["rope_scaling"] = None if rope.get("rope_type", "default") == "default" else dict(rope)
    return out


def portable_tokenizer_config(config: dict[str, Any]) -> dict[str, Any]:
    """tokenizer_config.json with a tokenizer class both 4.x and 5.x load, without 5's own keys."""
    out = {k: v for k, v in config.items() if k not in VERSION_SPECIFIC_TOKENIZER_KEYS}
    if out.get("tokenizer_class") in (None, *VERSION_SPECIFIC_TOKENIZER_CLASSES):
        out["tokenizer_class"] = PORTABLE_TOKENIZER_CLASS
    return out


def _rewrite_json(path: Path, change) -> None:
    data = json.loads(path.read_text(encoding="utf-8"))
    path.write_text(json.dumps(change(data), indent=2, sort_keys=True) + "\n", encoding="utf-8")


def write_portable_folder(source: Path, target: Path, dtype: ExportDtype) -> None:
    """Save the model and tokenizer of the transformers folder `source` into the empty folder `target`:
    weights in `dtype`, config.json and tokenizer_config.json readable by transformers 4.4x and 5.x,
    every file mode 0644."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r}: choose one of {', '.join(DTYPES)}")
    if not (source / "tokenizer.json").is_file():
        raise FileNotFoundError(
            f"{source}: no tokenizer.json; the portable export needs a fast (tokenizers) tokenizer, which both "
            "transformers 4.x and 5.x load"
        )
    model = load_causal_lm(source, dtype=DTYPES[dtype])
    save_model_folder(model, load_tokenizer(source), target)
    _rewrite_json(target / "config.json", portable_config)
    _rewrite_json(target / "tokenizer_config.json", portable_tokenizer_config)
