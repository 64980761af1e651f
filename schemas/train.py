"""Train stage: algorithm, optimiser and schedule of pi_theta, and the `train_log` table."""

from __future__ import annotations

from typing import Literal

import pyarrow as pa
from pydantic import Field, model_validator

from schemas.algorithms import ALGORITHM_REGISTRY, ALGORITHMS, OPTIONAL_HYPERPARAMETERS
from schemas.base import Section, column
from schemas.manifest import StageMetrics

Algorithm = Literal[ALGORITHMS]  # type: ignore[valid-type]


class TrainConfig(Section):
    """Offline training of pi_theta, initialised from pi_ref. Paper values are noted per field."""

    algorithm: Algorithm = Field("a_lol", description="Loss and sampler (method.md, Losses).")
    clip_epsilon: float = Field(0.9, gt=0, le=1, description="Two-sided clip of the detached importance weight (paper HHA: 0.9).")
    kl_beta: float | None = Field(None, gt=0, description="KL weight; required by a_lol_kl only.")
    dpo_beta: float = Field(0.1, gt=0, description="DPO's beta, the scale of the log-ratio margin (paper: 0.1); dpo only.")
    pro_sft_weight: float = Field(
        0.05, ge=0, description="Weight of PRO's SFT term, the per-token NLL of the best response (paper: 0.05); pro only."
    )
    steps: int = Field(64, gt=0, description="Optimiser steps before the A-LoL positive-fraction shrink.")
    batch_size: int = Field(4, gt=0, description="Rows per micro-batch (pairs, of two responses each, for dpo and pro).")
    grad_accumulation: int = Field(
        2, gt=0, description="Micro-batches per optimiser step, shared out over the processes (a multiple of their "
        "number); batch_size x grad_accumulation rows per update (paper: 8 x 2).",
    )
    learning_rate: float = Field(2e-5, gt=0, description="AdamW learning rate (paper: 2e-5 full fine-tune, 2e-4 QLoRA).")
    weight_decay: float = Field(0.01, ge=0, description="AdamW weight decay (paper: 0.01).")
    schedule: Literal["constant", "linear"] = Field("linear", description="Learning-rate schedule after warm-up (paper: linear decay; constant for QLoRA).")
    warmup_steps: int = Field(0, ge=0, description="Linear warm-up steps.")
    max_grad_norm: float = Field(1.0, gt=0, description="Gradient-norm clip (paper: 1.0; 0.3 for QLoRA).")
    lora_rank: int | None = Field(None, gt=0, description="LoRA rank through peft; full fine-tuning when unset (paper HHA: QLoRA).")
    lora_alpha: float | None = Field(None, gt=0, description="LoRA scaling alpha; 2 x lora_rank when unset.")
    lora_dropout: float = Field(
        0.0, ge=0, lt=1,
        description="Dropout on the LoRA branch. 0 by default: with dropout the ratio losses (r_lol, a_lol, a_lol_seq) "
        "take their weights from a second, dropout-free forward (about 1.5x the step), and dpo refuses it; 0.05 is "
        "QLoRA's value.",
    )
    gradient_checkpointing: bool = Field(
        False, description="Recompute each decoder layer's activations in the backward pass (transformers' gradient "
        "checkpointing, non-reentrant): less activation memory for about one more forward per step; the gradients are "
        "the same. TRL's trainers turn it on by default.",
    )
    eval_every: int = Field(16, gt=0, description="Validate (greedy decode, score) every this many steps and at the last step (paper: a tenth of the run).")
    validation_prompts: int | None = Field(
        None, gt=0, description="Decode at most this many distinct validation prompts (the first by prompt id) per validation; all when unset."
    )
    checkpoint_every: int | None = Field(
        None, gt=0, description="Save the resume state (model, optimiser, scheduler, sampler, RNG) every this many steps; at every validation when unset."
    )
    processes: int = Field(
        1, ge=1,
        description="Processes the train stage trains on: above 1 the stage launches them itself on this machine "
        "(torchrun --standalone; gloo on CPU, NCCL on GPUs, one GPU each), each running grad_accumulation / processes "
        "micro-batches of every step; the result equals one process, so it is in no cache key.",
    )
    nodes: int = Field(
        1, ge=1,
        description="Machines the train stage trains on, train.processes processes each (torchrun --nnodes; "
        "grad_accumulation is shared out over all nodes x processes). Under run.executor ray the stage places one "
        "launcher per node itself (a Ray placement group, STRICT_SPREAD); under local every machine runs the same "
        "`alol run --stages train` with train.rendezvous set and a run.root they share. In no cache key.",
    )
    rendezvous: str | None = Field(
        None, pattern=r"^[^:\s]+:[0-9]+$",
        description="host:port on the first machine where the machines of train.nodes > 1 meet (torchrun's c10d "
        "rendezvous; the port must be free there and reachable from the others); run.executor local only (under "
        "ray the stage takes the first node's address and a free port). In no cache key.",
    )
    gpus_per_node: int = Field(
        0, ge=0,
        description="GPUs each node's launcher reserves in the placement group under run.executor ray and "
        "train.nodes > 1: train.processes on GPU nodes (one per process), 0 on CPU nodes. In no cache key.",
    )
    mixed_precision: Literal["no", "fp16", "bf16"] = Field("no", description="accelerate mixed precision, where the device supports it.")
    seed: int | None = Field(
        None, description="Seed of the train stage (row sampling, LoRA init, dropout, validation decoding); run.seed "
        "when unset. Only train and evaluate change with it, so `alol compare --seeds K` (train.seed = run.seed + "
        "0..K-1) trains K seeds over one cached upstream.",
    )

    def seed_or(self, run_seed: int) -> int:
        """The train stage's seed: train.seed, else `run_seed` (run.seed)."""
        return run_seed if self.seed is None else self.seed

    @model_validator(mode="after")
    def _combinations(self) -> TrainConfig:
        uses = ALGORITHM_REGISTRY[self.algorithm].hyperparameters
        for name in OPTIONAL_HYPERPARAMETERS:
            if name in uses and getattr(self, name) is None:
                example = next(s.compare_defaults[name] for s in ALGORITHM_REGISTRY.values() if name in s.compare_defaults)
                raise ValueError(f"train.algorithm {self.algorithm} needs train.{name} (e.g. {example})")
            if name not in uses and getattr(self, name) is not None:
                users = ", ".join(s.name for s in ALGORITHM_REGISTRY.values() if name in s.hyperparameters)
                raise ValueError(f"train.{name} is only used by {users}, not {self.algorithm}")
        if self.grad_accumulation % (self.processes * self.nodes):
            across = f"train.processes ({self.processes})" if self.nodes == 1 else (
                f"train.nodes x train.processes ({self.nodes} x {self.processes})"
            )
            raise ValueError(
                f"train.grad_accumulation ({self.grad_accumulation}) must be a multiple of {across}: each process "
                "runs an equal share of every step's micro-batches"
            )
        if self.rendezvous is not None and self.nodes == 1:
            raise ValueError("train.rendezvous is set but train.nodes is 1: set train.nodes, or clear train.rendezvous")
        if self.warmup_steps >= self.steps:
            raise ValueError(f"train.warmup_steps ({self.warmup_steps}) must be below train.steps ({self.steps})")
        if self.lora_rank is None and self.lora_alpha is not None:
            raise ValueError("train.lora_alpha is set but train.lora_rank is not; set lora_rank to train with LoRA")
        spec = ALGORITHM_REGISTRY[self.algorithm]
        if spec.reference_margin and self.lora_rank is not None and self.lora_dropout > 0:
            raise ValueError(
                f"train.algorithm {self.algorithm} compares log pi_theta with pi_ref's dropout-free cached log-probs: "
                f"set train.lora_dropout: 0 (got {self.lora_dropout})"
            )
        if spec.takes_ratio and self.mixed_precision != "no":
            raise ValueError(
                f"train.algorithm {self.algorithm} {'weights rows' if spec.clipped else 'scores pairs'} by a ratio to "
                "pi_ref's log-probs, which are cached "
                f"in fp32: set train.mixed_precision: no (got {self.mixed_precision})"
            )
        return self


TRAIN_LOG_SCHEMA = pa.schema(
    [
        column("step", pa.int64(), "Optimiser step, from 1."),
        column("loss", pa.float64(), "The algorithm's loss, batch mean over all processes."),
        column("learning_rate", pa.float64(), "Learning rate of the step."),
        column("grad_norm", pa.float64(), "Gradient norm before clipping."),
        column("importance_weight_mean", pa.float64(), "Mean importance weight (rows: r_lol, a_lol; tokens: a_lol_seq, r_gold); null otherwise."),
        column("clipped_fraction", pa.float64(), "Share of those weights that were clipped; null otherwise."),
        column("advantage_mean", pa.float64(), "Mean advantage A of the step's rows."),
        column("reward_mean", pa.float64(), "Mean reward R of the step's rows."),
        column("tokens", pa.int64(), "Prompt and response tokens of the step."),
        column("validation_reward", pa.float64(), "Mean reward of greedy decodes of the validation prompts; null when not measured."),
    ]
)
"""One row per optimiser step. `loss` is the batch mean over all processes; `grad_norm` is before
clipping; `importance_weight_mean` / `clipped_fraction` are over rows (r_lol, a_lol), response
tokens (a_lol_seq: rho_t; r_gold: pi_theta(y_t), "clipped" when below 0.1), null for the other
losses; `tokens` counts prompt and response tokens of the step; `validation_reward` is the mean
reward of greedy decodes of the validation prompts, null when not measured at that step.
No wall-clock column: the table is part of the content hash, so it must be the same whenever the
same cache key is computed (again, or resumed after a crash); timings are in TrainMetrics."""


PAIRS_SCHEMA = pa.schema(
    [
        column("pair_id", pa.string(), "The pair: the data's pair_id, or the training row's id for a built pair."),
        column("chosen_id", pa.string(), "The preferred response: an ingest row id, or a `pi_ref_responses` id."),
        column("rejected_id", pa.string(), "The other response: an ingest row id, or a `pi_ref_responses` id."),
        column("chosen_reward", pa.float64(), "R of the chosen response."),
        column("rejected_reward", pa.float64(), "R of the rejected response."),
    ]
)
"""The pair algorithms' training pairs (dpo, pro), one row per pair drawable: the chosen and rejected response
ids (an ingest row id, or a `pi_ref_responses` id of the reference stage for built pairs) and their rewards.
Only written by the pair algorithms."""


class TrainMetrics(StageMetrics):
    """The training run: step budget, validation, the kept checkpoint, and the run's wall-clock figures
    (`*_seconds`, `*_per_s`; the manifest only, so not in the content hash). A resumed run's figures
    cover the interrupted attempts too, as far as their last checkpoint."""

    algorithm: str
    policy_is_reference: bool = Field(..., description="No checkpoint beat pi_ref on validation: the policy is pi_ref.")
    best_step: int | None = Field(..., description="Step of the kept checkpoint (None when the policy is pi_ref).")
    best_validation_reward: float | None
    best_validation_step: int | None
    reference_validation_reward: float = Field(..., description="pi_ref's mean reward on the same validation prompts.")
    validation_prompts: int
    train_seconds: float = Field(..., description="Wall-clock seconds of the training loop: steps, validations, checkpoints.")
    validation_seconds: float = Field(..., description="Wall-clock seconds of the validations (greedy decoding and scoring).")
    steps: int = Field(..., description="Optimiser steps run (after the A-LoL shrink).")
    steps_full: int = Field(..., description="train.steps.")
    train_rows: int
    positive_rows: int
    drawable_rows: int = Field(..., description="Rows with a positive sampling weight.")
    rows_per_step: int
    processes: int
    device: str
    mixed_precision: str
    step_tokens_per_s: list[float] = Field(
        ..., description="Wall-clock prompt and response tokens per second of each optimiser step (train_log's `tokens` "
        "over the step's seconds, validation excluded), in step order."
    )
    tokens_per_s_median: float | None = Field(..., description="Median of step_tokens_per_s (None without steps).")
    final_loss: float | None
    resumed_from_step: int = Field(..., description="Step the run resumed from (0: a fresh start).")
    pair_source: Literal["data", "built"] | None = Field(
        None, description="Where the pair algorithms' pairs came from (reference.pairs as resolved); None for the others."
    )
    tied_pairs_left_out: int | None = Field(
        None, description="Built pairs left out because both responses had the same reward (None for the others)."
    )
