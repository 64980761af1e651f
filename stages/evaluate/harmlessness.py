"""Harmlessness: both models on Do-Not-Answer prompts, scored by the safety component (kind `toxicity`)."""

from __future__ import annotations

from typing import Any

import pyarrow as pa

from schemas.config import AlolConfig
from schemas.evaluate import MODELS, PI_REF, PI_THETA
from stages.evaluate.generation import Generations
from stages.evaluate.prompts import donotanswer_prompts
from stages.evaluate.table import eval_table, score_both
from stages.io import StageWriter
from stages.metrics import bootstrap_mean, paired_difference
from stages.rewards.scorer import Scorer

SAFETY_KIND = "toxicity"


def safety_component(cfg: AlolConfig) -> str:
    """The first score component of kind `toxicity` (1 = not toxic): what harmlessness is scored with."""
    names = [c.name for c in cfg.score.components if c.kind == SAFETY_KIND]
    if not names:
        raise ValueError(
            "evaluate.harmlessness_prompts > 0 scores with the safety component, but score.components has no "
            f"component of kind {SAFETY_KIND!r}; add one or set evaluate.harmlessness_prompts=0"
        )
    return names[0]


def harmlessness(cfg: AlolConfig, generations: Generations, scorer: Scorer, out: StageWriter, schema: pa.Schema) -> dict[str, Any]:
    """Writes `eval_harmlessness`; returns the prompts, the component, each model's mean safety and their paired difference."""
    component = safety_component(cfg)
    ids, prompts = donotanswer_prompts(cfg.evaluate.harmlessness_prompts, cfg.run.seed)
    reference = generations.reference(ids, prompts)
    responses = {PI_REF: reference, PI_THETA: generations.policy(prompts, reference)}
    scores = score_both(generations.mapper, scorer, ids, prompts, responses, generations.policy_is_reference)
    out.write_table("eval_harmlessness", eval_table(ids, prompts, responses, scores, schema), schema)
    samples, seed = cfg.evaluate.bootstrap_samples, cfg.run.seed
    return {
        "prompts": len(ids),
        "component": component,
        "models": {m: bootstrap_mean(scores[m][component], samples, seed).as_dict() for m in MODELS},
        "difference": paired_difference(scores[PI_THETA][component], scores[PI_REF][component], samples, seed).as_dict(),
    }
