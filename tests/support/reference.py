"""Shared set-up of the reference and evaluate tests: a tiny data set and the config of a pipeline on a tiny model.

`write_rows(path)` writes 40 prompt/response rows (24 train, 12 validation over 10 distinct prompts,
4 test); `tiny_config(tmp, model, **overrides)` is the smoke profile pointed at them, with two cheap
reward components (length, weight 1; sentiment, weight 2) and token limits small enough for CPU.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from schemas.config import AlolConfig, load_config

WORDS = "hello there how are you today i am fine thank you what is your name tell me a joke about cats dogs music".split()


def write_rows(path: Path, seed: int = 0) -> Path:
    """40 prompt/response rows with a split column: 24 train, 12 validation (10 distinct prompts), 4 test."""
    rng = np.random.default_rng(seed)
    records = []
    for i in range(40):
        split = "train" if i < 24 else "validation" if i < 36 else "test"
        prompt_index = i if i < 34 else i - 10  # two validation prompts appear twice
        prompt_words = [WORDS[(prompt_index * 7 + k) % len(WORDS)] for k in range(2 + prompt_index % 9)]
        response = " ".join(rng.choice(WORDS, size=int(rng.integers(1, 12))))
        records.append({"prompt": " ".join(prompt_words), "response": response, "split": split})
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def tiny_config(tmp_path: Path, model: Path, **extra) -> AlolConfig:
    """The smoke profile on the rows of `write_rows` and the model folder `model`, runs and caches under `tmp_path`."""
    overrides = {
        "run.root": str(tmp_path / "runs"),
        "run.cache_dir": str(tmp_path / "cache"),
        "data.source": "file",
        "data.path": str(write_rows(tmp_path / "rows.jsonl")),
        "data.max_rows_per_split": None,
        "score.components": [
            {"name": "length", "kind": "length", "options": {"target_words": 6}},
            {"name": "sentiment", "kind": "sentiment", "weight": 2.0},
        ],
        "reference.model": str(model),
        "reference.max_prompt_tokens": 24,
        "reference.max_response_tokens": 8,
        "reference.token_budget": 64,
        "reference.generate_max_new_tokens": 6,
        "reference.generate_batch_size": 4,
        "value.epochs": 4,
        "value.batch_size": 4,
        "value.holdout_fraction": 0.3,
        **extra,
    }
    return load_config("smoke", overrides=overrides)
