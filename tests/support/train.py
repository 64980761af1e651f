"""Shared set-up of the train tests (tests/test_train*.py): a tiny random Llama as pi_ref and real upstream stages.

The data make the task learnable in a few steps: the reward is the fraction of the words "cats"
in a response (a `python` reward component, `cats_reward` below); half of the training responses
are all "cats", the other half other words. The value head predicts about the mean reward, so the
"cats" rows have A > 0 and the others A < 0. pi_ref (random) almost never says "cats"; a few steps
at a high learning rate make pi_theta say it, so its validation reward beats pi_ref's and the
stage writes `policy/` (whose weights the equivalence tests compare).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from pipeline.runner import STAGES, execute_stage
from pipeline.storage import RunStore
from schemas.config import AlolConfig, load_config
from schemas.manifest import StageOutput
from stages.io import StageReader
from tests.support.models import tiny_model_folder

WORDS = "hello there how are you today i am fine thank you what is your name tell me a joke about dogs music".split()
UPSTREAM = ("ingest", "score", "reference", "advantage")
"""Each upstream stage -> the stages it reads."""


WHOLE_PIPELINE = {
    "evaluate.max_new_tokens": 5, "evaluate.batch_size": 4, "evaluate.bootstrap_samples": 50,
    # A fitted component (the tf-idf vocabulary in scorer_state.json) at weight 0: the reward stays "cats".
    "score.components": [
        {"name": "cats", "kind": "python",
         "options": {"function": "tests.support.train:cats_reward", "lower": 0.0, "upper": 1.0}},
        {"name": "informative", "kind": "tfidf", "weight": 0.0},
    ],
}
"""Overrides that make every stage of the tiny pipeline quick, evaluate included, with two score
components (one of them fitted)."""


def cats_reward(prompts, responses):
    """Fraction of the whitespace-separated words that are "cats" (0 for an empty response)."""
    return [sum(w == "cats" for w in r.split()) / max(len(r.split()), 1) for r in responses]


def write_rows(path: Path, seed: int = 0) -> Path:
    """32 train rows (every other response "cats cats ..."), 10 validation and 4 test rows, distinct prompts."""
    rng = np.random.default_rng(seed)
    records = []
    for i in range(46):
        split = "train" if i < 32 else "validation" if i < 42 else "test"
        prompt = " ".join(WORDS[(i * 7 + k) % len(WORDS)] for k in range(2 + i % 7))
        n = int(rng.integers(2, 6))
        response = " ".join(["cats"] * n) if i % 2 == 0 else " ".join(rng.choice(WORDS, size=n))
        records.append({"prompt": prompt, "response": response, "split": split})
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def write_preference_rows(path: Path, seed: int = 0) -> Path:
    """prompt/chosen/rejected pairs with a split column: 16 train, 6 validation and 2 test pairs, distinct prompts.

    Two chosen responses in three are all "cats"; every other rejected response is "cats dogs cats" (reward
    2/3), so rejected rows too can have A > 0 and count in a positive fraction taken over every row.
    """
    rng = np.random.default_rng(seed)
    records = []
    for i in range(24):
        split = "train" if i < 16 else "validation" if i < 22 else "test"
        prompt = " ".join(WORDS[(i * 5 + k) % len(WORDS)] for k in range(2 + i % 6))
        n = int(rng.integers(2, 6))
        chosen = " ".join(["cats"] * n) if i % 3 != 2 else " ".join(rng.choice(WORDS, size=n))
        rejected = "cats dogs cats" if i % 2 else " ".join(rng.choice(WORDS, size=n + 1))
        records.append({"prompt": prompt, "chosen": chosen, "rejected": rejected, "split": split})
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def with_attention_dropout(folder: Path, probability: float) -> Path:
    """Set `attention_dropout` in the model folder's config.json (a Llama applies it in train mode only)."""
    settings = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    settings["attention_dropout"] = probability
    (folder / "config.json").write_text(json.dumps(settings), encoding="utf-8")
    return folder


def overrides(tmp: Path, model: Path, data: Path, **extra) -> dict:
    return {
        "run.root": str(tmp / "runs"),
        "run.name": "tiny",
        "run.cache_dir": str(tmp / "cache"),
        "data.source": "file",
        "data.path": str(data),
        "data.max_rows_per_split": None,
        "score.components": [
            {"name": "cats", "kind": "python",
             "options": {"function": "tests.support.train:cats_reward", "lower": 0.0, "upper": 1.0}},
        ],
        "reference.model": str(model),
        "reference.max_prompt_tokens": 24,
        "reference.max_response_tokens": 8,
        "reference.token_budget": 128,
        "reference.generate_max_new_tokens": 6,
        "reference.generate_batch_size": 10,
        "value.heads": 4,
        "value.epochs": 3,
        "value.batch_size": 4,
        "value.holdout_fraction": 0.3,
        "train.algorithm": "a_lol",
        "train.steps": 12,
        "train.batch_size": 2,
        "train.grad_accumulation": 2,
        "train.learning_rate": 3e-2,
        "train.schedule": "constant",
        "train.weight_decay": 0.0,
        "train.eval_every": 100,
        **extra,
    }


def tiny_setup(tmp: Path) -> tuple[Path, Path]:
    """The tiny model folder and the data file."""
    return tiny_model_folder(tmp / "tiny"), write_rows(tmp / "rows.jsonl")


def config(tmp: Path, model: Path, data: Path, **extra) -> AlolConfig:
    return load_config("smoke", overrides=overrides(tmp, model, data, **extra))


def run_stages(cfg: AlolConfig, stages: tuple[str, ...]) -> dict[str, StageOutput]:
    """Run `stages` in order through the runner (no Prefect), each on the outputs of the earlier ones,
    and record them in the run's run.json."""
    store = RunStore.of(cfg)
    outputs: dict[str, StageOutput] = {}
    for stage in stages:
        outputs[stage], cached = execute_stage(cfg, stage, {n: outputs[n] for n in STAGES[stage].upstream})
        store.record(outputs[stage], cached=cached, seconds=0.0)
    return outputs


def build_upstream(cfg: AlolConfig) -> dict[str, StageOutput]:
    """Run ingest, score, reference and advantage, and record them in the run's run.json."""
    return run_stages(cfg, UPSTREAM)


def readers(outputs: dict[str, StageOutput]) -> dict[str, StageReader]:
    return {name: StageReader(outputs[name].path) for name in UPSTREAM}
