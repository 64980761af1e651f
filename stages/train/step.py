"""One optimiser step of pi_theta: micro-batches, the loss, the accumulated backward, clip, AdamW.

A step draws batch_size x grad_accumulation rows (stages.sampler) as grad_accumulation micro-batches,
shared out over the processes. Per micro-batch one forward of pi_theta gives l_t^theta of the
response tokens; l_t^ref and L_ref come from the reference table, so pi_ref is never loaded. The
losses with an importance weight (rho, rho_t: registry entries with a clip) compare pi_theta with
pi_ref's cached log-probs, which were taken in eval mode and fp32: when pi_theta has active dropout,
a second, no-grad eval-mode forward of the micro-batch gives the weight's log-probs (without
dropout there is no second forward), and they (and DPO, whose margin is a log-ratio to pi_ref) refuse
mixed precision at stage start. For the pair algorithms a drawn "row" is a pair (stages.train.pairs): its
two responses go into the micro-batch side by side, chosen first (LossBatch.group_size 2). Each
process backpropagates loss / (its micro-batches); the gradients are averaged over the processes at
the last micro-batch, so the step's gradient is the mean over all micro-batches whatever the number
of processes. Then gradient-norm clip, AdamW and the schedule (stages.train.policy).
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass, field, fields
from typing import Any

import torch

from schemas.algorithms import ALGORITHM_REGISTRY
from schemas.config import AlolConfig
from stages.catalog import reference_model_path
from stages.io import StageReader
from stages.losses import LossBatch, LossOutput, loss_function, pad_rows
from stages.models.logprobs import response_token_logprobs
from stages.models.store import load_tokenizer
from stages.models.tokenize import encode_pair, template_prefix, token_digest
from stages.sampler import PrioritySampler
from stages.train.errors import TrainError
from stages.train.pairs import load_pairs
from stages.train.policy import build_optimizer, build_policy, learning_rate_factor, trainable_parameters
from stages.train.rows import load_train_rows, step_budget
from stages.train.validation import Validation, validation_reward


@dataclass
class MicroBatch:
    """Tokenised rows with pi_ref's log-probs from the reference table."""

    prompt_ids: list[list[int]]
    response_ids: list[list[int]]
    ref_token_logprobs: list[torch.Tensor]
    ref_logprob: torch.Tensor
    reward: torch.Tensor
    advantage: torch.Tensor
    group_size: int = 1  # rows per ranked group (2 for pairs: chosen, rejected); LossBatch.group_size
    shared_prefix: list[int] = field(default_factory=list)  # the tokenizer's template_prefix: once per packed sequence

    @property
    def tokens(self) -> int:
        return sum(len(p) + len(r) for p, r in zip(self.prompt_ids, self.response_ids))


def encode_micro_batch(
    rows: list[dict[str, Any]], tokenizer: Any, cfg: AlolConfig, group_size: int = 1, shared_prefix: list[int] | None = None,
) -> MicroBatch:
    """Tokenise as the reference stage did (stages.models.tokenize.encode_pair): the prompt and response ids
    must hash to the reference table's `token_hash`, else pi_ref's cached log-probs are of other tokens.
    `shared_prefix`: the tokenizer's template_prefix (computed here when not given)."""
    prompt_ids, response_ids = [], []
    for row in rows:
        p, r = encode_pair(
            tokenizer, row["prompt"], row["response"], cfg.reference.max_prompt_tokens, cfg.reference.max_response_tokens
        )
        if token_digest(p, r) != row["token_hash"] or len(r) != len(row["ref_token_logprobs"]):
            raise TrainError(
                f"row id {row['id']}: its prompt and response tokenise to other ids here ({len(p)} prompt and "
                f"{len(r)} response tokens; {row['response_tokens']} response tokens in the reference table) than "
                "when the reference stage ran: the tokenizer, its chat template or reference.* changed; rerun the "
                "reference stage"
            )
        prompt_ids.append(p)
        response_ids.append(r)
    return MicroBatch(
        prompt_ids=prompt_ids,
        response_ids=response_ids,
        ref_token_logprobs=[torch.tensor(row["ref_token_logprobs"], dtype=torch.float32) for row in rows],
        ref_logprob=torch.tensor([row["ref_logprob"] for row in rows], dtype=torch.float32),
        reward=torch.tensor([row["reward"] for row in rows], dtype=torch.float32),
        advantage=torch.tensor([row["advantage"] for row in rows], dtype=torch.float32),
        group_size=group_size,
        shared_prefix=template_prefix(tokenizer) if shared_prefix is None else shared_prefix,
    )


class PolicyForward:
    """pi_theta as stages.models.logprobs sees a model (device, config, a forward call), calling through the
    accelerate-prepared wrapper so that several processes all-reduce their gradients."""

    def __init__(self, prepared: Any, unwrapped: Any):
        self.prepared = prepared
        self.unwrapped = unwrapped
        self.config = unwrapped.config
        self.device = unwrapped.device

    def __call__(self, **kwargs: Any) -> Any:
        return self.prepared(**kwargs)


def has_active_dropout(model: Any) -> bool:
    """Whether a forward of `model` in its current mode drops activations: an nn.Dropout with p > 0 (LoRA's
    included), or a positive `*dropout*` / `*pdrop*` probability in its config (transformers applies attention
    dropout as a function argument, not a module)."""
    if not model.training:
        return False
    if any(isinstance(m, torch.nn.Dropout) and m.p > 0 for m in model.modules()):
        return True
    settings = model.config.to_dict()
    return any(isinstance(v, float) and v > 0 for k, v in settings.items() if "dropout" in k or "pdrop" in k)


def dropout_free_logprobs(model: Any, batch: MicroBatch) -> list[torch.Tensor]:
    """l_t^theta of the micro-batch from a no-grad eval-mode forward (as the reference stage took l_t^ref);
    the model goes back to train mode after."""
    model.eval()
    try:
        with torch.no_grad():
            return response_token_logprobs(model, batch.prompt_ids, batch.response_ids, batch.shared_prefix)
    finally:
        model.train()


def micro_batch_loss(policy: Any, batch: MicroBatch, loss_fn: Any, weight_forward: bool = False) -> LossOutput:
    """One forward of pi_theta over the micro-batch, then the algorithm's loss. `weight_forward`: the
    importance weight's log-probs come from a second, dropout-free forward (dropout_free_logprobs)."""
    device = policy.device
    token_logprobs, mask = pad_rows(response_token_logprobs(policy, batch.prompt_ids, batch.response_ids, batch.shared_prefix))
    ref_token_logprobs, _ = pad_rows(batch.ref_token_logprobs, width=token_logprobs.shape[1])
    weight_token_logprobs = None
    if weight_forward:
        weight_token_logprobs, _ = pad_rows(dropout_free_logprobs(policy.unwrapped, batch), width=token_logprobs.shape[1])
    return loss_fn(
        LossBatch(
            token_logprobs=token_logprobs,
            ref_token_logprobs=ref_token_logprobs.to(device),
            mask=mask,
            ref_logprob=batch.ref_logprob.to(device),
            reward=batch.reward.to(device),
            advantage=batch.advantage.to(device),
            weight_token_logprobs=weight_token_logprobs,
            group_size=batch.group_size,
        )
    )


@dataclass
class StepSums:
    """Sums over the micro-batches of one step (then over processes) behind a train_log row."""

    loss: float = 0.0
    micro_batches: int = 0
    rows: int = 0
    advantage: float = 0.0
    reward: float = 0.0
    weights: float = 0.0
    weight_count: int = 0
    clipped: int = 0
    tokens: int = 0

    def add(self, out: LossOutput, batch: MicroBatch) -> None:
        self.loss += out.loss.item()
        self.micro_batches += 1
        self.rows += len(batch.response_ids)
        self.advantage += batch.advantage.sum().item()
        self.reward += batch.reward.sum().item()
        self.tokens += batch.tokens
        if out.weights is not None:
            self.weights += out.weights.double().sum().item()
            self.weight_count += out.weights.numel()
            self.clipped += int(out.clipped.sum().item())

    def reduced(self, accelerator: Any) -> StepSums:
        """The sums over all processes."""
        names = [f.name for f in fields(self)]
        values = torch.tensor([getattr(self, n) for n in names], dtype=torch.float64, device=accelerator.device)
        total = accelerator.reduce(values, reduction="sum").cpu().tolist()
        return StepSums(**{n: type(getattr(self, n))(v) for n, v in zip(names, total)})


def backward_micro_batches(
    accelerator: Any, model: Any, policy: Any, batches: list[MicroBatch], loss_fn: Any, weight_forward: bool = False
) -> StepSums:
    """Accumulate the gradient of mean over micro-batches of their batch-mean losses.

    Gradients are all-reduced (averaged over processes) only at the last micro-batch.
    """
    sums = StepSums()
    for k, batch in enumerate(batches):
        sync = k == len(batches) - 1
        with nullcontext() if sync else accelerator.no_sync(model):
            out = micro_batch_loss(policy, batch, loss_fn, weight_forward)
            accelerator.backward(out.loss / len(batches))
        sums.add(out, batch)
    return sums


def _log_row(step: int, sums: StepSums, lr: float, grad_norm: float) -> dict[str, Any]:
    """The train_log row of one step (schemas.train.TRAIN_LOG_SCHEMA); validation_reward is filled in by the stage.
    No timing: the row is part of the content hash (the stage times the step for its metrics)."""
    has_weights = sums.weight_count > 0
    return {
        "step": step,
        "loss": sums.loss / sums.micro_batches,
        "learning_rate": lr,
        "grad_norm": grad_norm,
        "importance_weight_mean": sums.weights / sums.weight_count if has_weights else None,
        "clipped_fraction": sums.clipped / sums.weight_count if has_weights else None,
        "advantage_mean": sums.advantage / sums.rows,
        "reward_mean": sums.reward / sums.rows,
        "tokens": sums.tokens,
        "validation_reward": None,
    }


class Trainer:
    """pi_theta, its optimiser and schedule, the sampler and the loss, prepared by accelerate."""

    def __init__(self, cfg: AlolConfig, inputs: dict[str, StageReader], accelerator: Any):
        train = cfg.train
        self.cfg, self.accelerator = cfg, accelerator
        if train.grad_accumulation % accelerator.num_processes:
            raise TrainError(
                f"train.grad_accumulation ({train.grad_accumulation}) must be a multiple of the number of "
                f"processes ({accelerator.num_processes}): each process runs an equal share of the micro-batches"
            )
        self.micro_batches = train.grad_accumulation // accelerator.num_processes
        spec = ALGORITHM_REGISTRY[train.algorithm]
        if spec.takes_ratio and accelerator.mixed_precision != "no":
            without = ", ".join(s.name for s in ALGORITHM_REGISTRY.values() if not s.takes_ratio)
            raise TrainError(
                f"train.algorithm {train.algorithm} {'weights rows' if spec.clipped else 'scores pairs'} by a ratio of "
                "pi_theta to pi_ref, whose log-probs "
                f"the reference stage cached in fp32; under train.mixed_precision {accelerator.mixed_precision} the "
                "ratio would compare two precisions. Set train.mixed_precision: no for this algorithm "
                f"({without} take no ratio and may use mixed precision)"
            )
        self.rows = (load_pairs if spec.needs_pairs else load_train_rows)(train.algorithm, inputs)
        self.sampler = PrioritySampler(self.rows.weight, seed=train.seed_or(cfg.run.seed))
        self.total_steps = step_budget(train, self.rows.positive_rows, self.rows.train_rows)
        path = reference_model_path(cfg, inputs["reference"])
        self.tokenizer = load_tokenizer(path)
        self.shared_prefix = template_prefix(self.tokenizer)
        self.model = build_policy(path, train, train.seed_or(cfg.run.seed))
        optimizer = build_optimizer(self.model, train)
        # Stepped here once per optimiser step (accelerate's prepared scheduler would step once per process).
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda s: learning_rate_factor(s, train, self.total_steps)
        )
        self.prepared, self.optimizer = accelerator.prepare(self.model, optimizer)
        self.policy = PolicyForward(self.prepared, accelerator.unwrap_model(self.prepared))
        self.loss_fn = loss_function(train)
        self.weight_forward = spec.clipped and has_active_dropout(self.model)
        if spec.reference_margin and has_active_dropout(self.model):
            raise TrainError(
                f"train.algorithm {train.algorithm} differentiates log pi_theta - log pi_ref, and pi_ref's log-probs were "
                f"cached without dropout, but pi_theta ({path}) has active dropout: the margin would not start at 0. "
                "Use a model whose config sets no dropout (or train.lora_dropout: 0 with LoRA)"
            )

    def step(self, step: int) -> dict[str, Any]:
        """One optimiser step on batch_size x grad_accumulation drawn rows; its train_log row.

        Process p of W takes micro-batches p x k/W .. (p + 1) x k/W - 1 of the k = grad_accumulation.
        """
        train, acc = self.cfg.train, self.accelerator
        drawn = self.sampler.draw(train.batch_size * train.grad_accumulation)
        mine = range(acc.process_index * self.micro_batches, (acc.process_index + 1) * self.micro_batches)
        batches = [
            encode_micro_batch(self.rows.take(drawn[k * train.batch_size : (k + 1) * train.batch_size]),
                               self.tokenizer, self.cfg, self.rows.group_size, self.shared_prefix)
            for k in mine
        ]
        sums = backward_micro_batches(
            acc, self.prepared, self.policy, batches, self.loss_fn, self.weight_forward
        ).reduced(acc)
        grad_norm = float(acc.clip_grad_norm_(trainable_parameters(self.model).values(), train.max_grad_norm))
        lr = self.scheduler.get_last_lr()[0]
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return _log_row(step, sums, lr, grad_norm)

    def validate(self, validation: Validation, scorer: Any) -> float:
        return validation_reward(self.accelerator.unwrap_model(self.prepared), self.tokenizer, validation, scorer, self.cfg)
