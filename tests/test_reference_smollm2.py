"""Slow tests on the real SmolLM2: the GGUF conversion resumes after a killed run; the reference stage end to end.

The end-to-end test uses the checkout's git-ignored `data/cache`, so SmolLM2 is converted once per
checkout; the conversion test converts into a temporary cache on purpose.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.runner import execute_stage
from stages.io import StageReader
from schemas.config import load_config
from stages.models.generate import generate
from stages.models.store import SMOLLM2, load_causal_lm, load_tokenizer, resolve_model

REPO = Path(__file__).resolve().parent.parent
SHARED_CACHE = REPO / "data" / "cache"

pytestmark = pytest.mark.slow


def test_smollm2_conversion_resumes_after_the_converting_process_is_killed(tmp_path):
    cache = tmp_path / "cache"
    models = cache / "models"
    script = f"from stages.models.store import resolve_model; resolve_model({SMOLLM2!r}, {str(cache)!r})"
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=REPO)
    try:
        deadline = time.monotonic() + 120
        while not list(models.glob(f".{SMOLLM2}.tmp-*")):
            assert proc.poll() is None and time.monotonic() < deadline, "the conversion never started"
            time.sleep(0.2)
        time.sleep(2)  # in the middle of reading the GGUF
    finally:
        proc.kill()
        proc.wait()
    assert not (models / SMOLLM2).exists()
    assert list(models.glob(f".{SMOLLM2}.tmp-*")) and (models / f".{SMOLLM2}.lock").exists()

    folder = resolve_model(SMOLLM2, cache)
    assert folder == (models / SMOLLM2).resolve()
    assert not list(models.glob(f".{SMOLLM2}.tmp-*"))
    config = json.loads((folder / "config.json").read_text())
    assert "quantization_config" not in config and config["hidden_size"] == 576
    assert (folder / "model.safetensors").is_file()
    torch.set_num_threads(2)
    model, tokenizer = load_causal_lm(folder), load_tokenizer(folder)
    assert tokenizer.chat_template and tokenizer.eos_token == "<|im_end|>"
    answer = generate(model, tokenizer, [[{"role": "user", "content": "What is the capital of France?"}]],
                      max_prompt_tokens=64, max_new_tokens=12, batch_size=1)
    assert "Paris" in answer[0]


def test_reference_stage_end_to_end_on_smollm2_smoke(tmp_path):
    torch.set_num_threads(2)
    cfg = load_config("smoke", overrides={"run.root": str(tmp_path / "runs"), "run.cache_dir": str(SHARED_CACHE)})
    ingest, _ = execute_stage(cfg, "ingest", {})
    score, _ = execute_stage(cfg, "score", {"ingest": ingest})
    output, reused = execute_stage(cfg, "reference", {"ingest": ingest, "score": score})
    assert not reused
    reference = StageReader(output.path)
    metrics = reference.metrics
    table = reference.read("reference").to_pandas()
    ingest_rows = StageReader(ingest.path).read("ingest", columns=["id", "split"]).to_pandas()
    expected = ingest_rows[ingest_rows.split.isin(["train", "validation"])]
    assert sorted(table.id) == sorted(expected.id)
    assert (table.response_tokens == table.ref_token_logprobs.map(len)).all()
    assert (table.response_tokens <= cfg.reference.max_response_tokens).all()
    np.testing.assert_allclose(table.ref_logprob, table.ref_token_logprobs.map(np.sum), atol=1e-3)
    # A real instruction model: its log-probs of human chat replies are finite and far from uniform.
    per_token = table.ref_logprob / table.response_tokens
    assert np.isfinite(per_token).all() and per_token.mean() > -8 > np.log(1 / 49152)
    assert ((table.value > 0) & (table.value < metrics.r_max)).all()
    targets = reference.read("value_targets").to_pandas()
    assert len(targets) == metrics.value_target_prompts >= 2
    assert targets.response.str.len().gt(0).mean() > 0.8
    assert 0 <= metrics.value_chosen_epoch <= cfg.value.epochs
    assert metrics.value_holdout_mse == min(metrics.value_holdout_mse_by_epoch)
    # Rerunning with the same inputs and config reuses the output instead of recomputing.
    again, reused = execute_stage(cfg, "reference", {"ingest": ingest, "score": score})
    assert reused and again.content_hash == output.content_hash
