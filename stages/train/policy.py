"""pi_theta and what updates it: the model (a copy of pi_ref, optionally with LoRA adapters), its
trainable parameters, the learning-rate schedule and the mixed precision the device allows."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from schemas.train import TrainConfig
from stages.models.store import load_causal_lm

log = logging.getLogger("alol.train")


def build_policy(path: Path, train: TrainConfig, seed: int) -> Any:
    """pi_theta = a copy of pi_ref, with LoRA adapters (peft, all linear layers but the head) when `lora_rank` is set,
    and gradient checkpointing when `gradient_checkpointing` is."""
    model = load_causal_lm(path)
    if train.lora_rank is not None:
        from peft import LoraConfig, get_peft_model

        torch.manual_seed(seed)
        model = get_peft_model(
            model,
            LoraConfig(
                r=train.lora_rank,
                lora_alpha=train.lora_alpha or 2 * train.lora_rank,
                lora_dropout=train.lora_dropout,
                target_modules="all-linear",
                task_type="CAUSAL_LM",
            ),
        )
    if train.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    return model


def build_optimizer(model: Any, train: TrainConfig) -> torch.optim.AdamW:
    """AdamW over the trainable parameters with torch's fused kernel: one pass per tensor instead of the default
    foreach implementation's model-sized temporaries (SmolLM2-135M on CPU: a step about 3x faster, peak
    memory about 200 MB lower; bench/dpo.py)."""
    return torch.optim.AdamW(
        trainable_parameters(model).values(), lr=train.learning_rate, weight_decay=train.weight_decay, fused=True
    )


def trainable_parameters(model: Any) -> dict[str, torch.Tensor]:
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def learning_rate_factor(step: int, train: TrainConfig, total_steps: int) -> float:
    """Multiplier of train.learning_rate for optimiser step `step` + 1 (0-based `step`):
    (step + 1) / (warmup + 1) during warm-up; then 1 (constant) or (total - step) / (total - warmup) (linear)."""
    warmup = min(train.warmup_steps, total_steps - 1)
    if step < warmup:
        return (step + 1) / (warmup + 1)
    if train.schedule == "constant":
        return 1.0
    return (total_steps - step) / (total_steps - warmup)


def resolve_mixed_precision(requested: str) -> str:
    """accelerate's mixed precision, or "no" where the device lacks it (fp16 on CPU)."""
    if requested == "fp16" and not torch.cuda.is_available():
        log.warning("train.mixed_precision fp16 needs a GPU; training in fp32")
        return "no"
    if requested == "bf16" and torch.cuda.is_available() and not torch.cuda.is_bf16_supported():
        log.warning("this GPU has no bf16; training in fp32")
        return "no"
    return requested
