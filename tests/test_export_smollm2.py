"""Slow: the real default base model (SmolLM2-135M-Instruct from the GGUF) exported and loaded by
transformers 4.57: rope theta 100000, the same token ids, chat template and logits as in 5.x.

Uses the checkout's git-ignored `data/cache` (SmolLM2 converted once per checkout, the 4.57
virtualenv built once)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from stages.models.export import write_portable_folder
from stages.models.store import SMOLLM2, load_causal_lm, load_tokenizer, resolve_model
from tests.support.venvs import load_with_transformers_4

SHARED_CACHE = Path(__file__).resolve().parent.parent / "data" / "cache"
TEXTS = ["What is the capital of France?", "Tell me a joke about cats."]

pytestmark = pytest.mark.slow


def test_smollm2_export_loads_in_transformers_4_with_identical_logits(tmp_path):
    source = resolve_model(SMOLLM2, SHARED_CACHE)
    folder = tmp_path / "smollm2"
    folder.mkdir()
    write_portable_folder(source, folder, "fp32")
    assert json.loads((folder / "config.json").read_text())["rope_theta"] == 100000.0
    result = load_with_transformers_4(folder, TEXTS)
    assert result["rope_theta"] == 100000.0 and result["tokenizer_class"] == "PreTrainedTokenizerFast"
    model, tokenizer = load_causal_lm(source), load_tokenizer(source)
    assert result["ids"] == [tokenizer(t)["input_ids"] for t in TEXTS]
    chat = [{"role": "user", "content": TEXTS[0]}]
    assert result["chat"] == tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    with torch.no_grad():
        for got, text in zip(result["logits"], TEXTS):
            want = model(torch.tensor([tokenizer(text)["input_ids"]])).logits[0]
            torch.testing.assert_close(torch.tensor(got), want, atol=1e-4, rtol=0)
