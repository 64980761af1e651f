"""A separate virtualenv with transformers 4.57, built once and kept under data/cache/venvs, for the
test that `alol export` folders load in the transformers 4.x that vLLM, TGI and older TRL set-ups run.

Built with `python3.11 -m venv` and pip (the torch CPU wheel is found locally through pip's own
configuration); about 35 s the first time on 2 cores, nothing afterwards.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from stages.models.store import build_once

VENVS = Path(__file__).resolve().parents[2] / "data" / "cache" / "venvs"
TRANSFORMERS_4 = ("transformers==4.57.*", "torch==2.13.0", "safetensors")


def transformers_4_python() -> Path:
    """The python of the transformers 4.57 virtualenv (built on first use)."""

    def build(folder: Path) -> None:
        subprocess.run([sys.executable, "-m", "venv", str(folder)], check=True)
        subprocess.run([str(folder / "bin" / "python"), "-m", "pip", "install", "--quiet", *TRANSFORMERS_4],
                       check=True, timeout=900)

    return build_once(VENVS / "transformers-4.57", build) / "bin" / "python"


LOAD_AND_RUN = """
import json, sys
import torch, transformers
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

folder, texts = sys.argv[1], json.loads(sys.argv[2])
config = AutoConfig.from_pretrained(folder)
tokenizer = AutoTokenizer.from_pretrained(folder)
model = AutoModelForCausalLM.from_pretrained(folder, torch_dtype=torch.float32).eval()
ids = [tokenizer(t)["input_ids"] for t in texts]
with torch.no_grad():
    logits = [model(torch.tensor([i])).logits[0].tolist() for i in ids]
chat = tokenizer.apply_chat_template([{"role": "user", "content": texts[0]}], tokenize=False, add_generation_prompt=True)
print(json.dumps({"version": transformers.__version__, "rope_theta": config.rope_theta,
                  "tokenizer_class": type(tokenizer).__name__, "ids": ids, "logits": logits, "chat": chat}))
"""


def load_with_transformers_4(folder: Path, texts: list[str]) -> dict:
    """Load `folder` in the transformers 4.57 virtualenv: its version, config.rope_theta, tokenizer class,
    the token ids and logits of each text, and the chat template applied to the first text."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH",)}
    env["HF_HUB_OFFLINE"] = "1"
    done = subprocess.run(
        [str(transformers_4_python()), "-c", LOAD_AND_RUN, str(folder), json.dumps(texts)],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert done.returncode == 0, f"transformers 4.57 could not load {folder}:\n{done.stderr[-3000:]}"
    return json.loads(done.stdout.strip().splitlines()[-1])
