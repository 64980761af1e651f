"""Validation: when it runs, its prompts, and the mean reward of greedy decodes of them.

Validation runs every `eval_every` steps and at the last. The prompts are the distinct validation
prompts of the reference stage's value targets, the first `train.validation_prompts` by prompt id;
pi_ref's validation reward is their stored mean reward (pi_ref's greedy decodes with the same
settings), so pi_ref is never decoded here. pi_theta's is the mean reward, by the score stage's
components, of its greedy decodes of the same prompts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from schemas.config import AlolConfig
from stages.io import StageReader
from stages.models.generate import generate
from stages.train.errors import TrainError


@dataclass
class Validation:
    """The validation prompts and pi_ref's mean reward on them (reference stage's value targets)."""

    prompt_ids: list[str]
    prompts: list[list[dict[str, str]]]
    reference_reward: float


def should_validate(step: int, total: int, every: int) -> bool:
    return step % every == 0 or step == total


def load_validation(reference: StageReader, limit: int | None) -> Validation:
    table = reference.read("value_targets", columns=["prompt_id", "prompt", "reward"]).sort_by("prompt_id")
    if limit is not None:
        table = table.slice(0, limit)
    if table.num_rows == 0:
        raise TrainError(f"{reference.table_glob('value_targets')}: no validation prompts to choose checkpoints with")
    return Validation(
        prompt_ids=table["prompt_id"].to_pylist(),
        prompts=table["prompt"].to_pylist(),
        reference_reward=float(np.mean(table["reward"].to_numpy())),
    )


def validation_reward(model: Any, tokenizer: Any, validation: Validation, scorer: Any, cfg: AlolConfig) -> float:
    """Mean reward of pi_theta's greedy decodes of the validation prompts (the value targets' settings)."""
    model.eval()
    try:
        responses = generate(
            model, tokenizer, validation.prompts, max_prompt_tokens=cfg.reference.max_prompt_tokens,
            max_new_tokens=cfg.reference.generate_max_new_tokens, batch_size=cfg.reference.generate_batch_size,
            seed=cfg.train.seed_or(cfg.run.seed),
        )
    finally:
        model.train()
    scores = scorer.score(validation.prompts, responses, ids=validation.prompt_ids, progress=False)
    return float(np.mean(scores["reward"]))
