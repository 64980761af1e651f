"""Train stage: algorithm, optimiser and schedule of pi_theta."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from schemas.base import Section

Algorithm = Literal["nll", "wbc", "r_gold", "r_lol", "a_lol", "a_lol_ref_free", "a_lol_seq", "a_lol_kl"]
ALGORITHMS: tuple[str, ...] = Algorithm.__args__  # type: ignore[attr-defined]


class TrainConfig(Section):
    """Offline training of pi_theta, initialised from pi_ref. Paper values are noted per field."""

    algorithm: Algorithm = Field("a_lol", description="Loss and sampler (method.md, Losses).")
    clip_epsilon: float = Field(0.9, gt=0, le=1, description="Two-sided clip of the detached importance weight (paper HHA: 0.9).")
    kl_beta: float | None = Field(None, gt=0, description="KL weight; required by a_lol_kl only.")
    steps: int = Field(64, gt=0, description="Optimiser steps before the A-LoL positive-fraction shrink.")
    batch_size: int = Field(4, gt=0, description="Rows per micro-batch.")
    grad_accumulation: int = Field(2, gt=0, description="Micro-batches per optimiser step (paper: 8 x 2 rows per update).")
    learning_rate: float = Field(2e-5, gt=0, description="AdamW learning rate (paper: 2e-5 full fine-tune, 2e-4 QLoRA).")
    weight_decay: float = Field(0.01, ge=0, description="AdamW weight decay (paper: 0.01).")
    schedule: Literal["constant", "linear"] = Field("linear", description="Learning-rate schedule after warm-up (paper: linear decay).")
    warmup_steps: int = Field(0, ge=0, description="Linear warm-up steps.")
    max_grad_norm: float = Field(1.0, gt=0, description="Gradient-norm clip (paper: 1.0; 0.3 for QLoRA).")
    lora_rank: int | None = Field(None, gt=0, description="LoRA rank through peft; full fine-tuning when unset.")
    eval_every: int = Field(16, gt=0, description="Validate (greedy decode, score) every this many steps (paper: a tenth of the run).")
    mixed_precision: Literal["no", "fp16", "bf16"] = Field("no", description="accelerate mixed precision, where the device supports it.")

    @model_validator(mode="after")
    def _combinations(self) -> TrainConfig:
        if self.algorithm == "a_lol_kl" and self.kl_beta is None:
            raise ValueError("train.algorithm a_lol_kl needs train.kl_beta (e.g. 0.1)")
        if self.algorithm != "a_lol_kl" and self.kl_beta is not None:
            raise ValueError(f"train.kl_beta is only used by a_lol_kl, not {self.algorithm}")
        return self
