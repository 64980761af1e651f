"""Train stage: pi_theta, initialised from pi_ref, trained on the offline rows with one of the eight
losses of ../shared/method.md (stages.losses).

One optimiser step: draw batch_size x grad_accumulation rows with replacement (stages.sampler: in
proportion to A+ for the A-LoL family, so A <= 0 is never drawn; to R for wBC, R-GOLD and R-LoL;
uniformly for NLL) as grad_accumulation micro-batches, shared out over the processes; per
micro-batch one forward of pi_theta gives l_t^theta of the response tokens, pi_ref's l_t^ref and
L_ref come from the reference table (pi_ref is never loaded: the only model in memory is pi_theta),
backward of loss / (micro-batches of this process); the gradients are averaged over the processes,
so the step's gradient is the mean over all micro-batches whatever the number of processes; then
gradient-norm clip, AdamW, schedule.
The A-LoL family's step budget is int(steps x #(A > 0) / N).

Validation every `eval_every` steps and at the last: greedy decoding of the validation prompts,
scored by the score stage's components. pi_ref's validation reward is the reference stage's value
targets (pi_ref's greedy decodes of the same prompts with the same settings). The best checkpoint
becomes `policy/` (a transformers folder, LoRA merged) only if it beats pi_ref; else there is no
`policy/` and `policy_is_reference` is true.

Resume: the state (trainable weights, optimiser, scheduler, sampler, RNG, log) is saved every
`checkpoint_every` steps under <run.cache_dir>/train-resume/<key of config and inputs>/, which
outlives the stage's discarded partial output; a rerun after a crash continues from it and reaches
the same weights. The folder is deleted when the stage finishes.

Several processes: `torchrun --nproc_per_node N -m pipeline.launch --profile P [--set k=v ...]`
(pipeline/launch.py); grad_accumulation must be a multiple of N, each process runs grad_accumulation / N
micro-batches, and the result equals one process running all grad_accumulation of them.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from schemas.algorithms import ALGORITHM_REGISTRY
from schemas.base import canonical_json, sha256_text
from schemas.config import AlolConfig
from schemas.manifest import StageResult
from schemas.train import TRAIN_LOG_SCHEMA, TrainConfig, TrainMetrics
from stages.catalog import POLICY_FOLDER, load_scorer, reference_model_path
from stages.io import StageReader, StageWriter, atomic_write_text
from stages.losses import LossBatch, LossOutput, loss_function, pad_rows
from stages.models import encode_pair, generate, load_causal_lm, load_tokenizer, response_token_logprobs
from stages.sampler import PrioritySampler

log = logging.getLogger("alol.train")

RESUME_FOLDER = "train-resume"
TRAINING_SOURCES = ("train.py", "losses.py", "sampler.py", "models.py")

TRAIN_ROWS_SQL = """
SELECT a.id, i.prompt, i.response, a.reward, a.advantage, a.{weight} AS weight,
       r.ref_logprob, r.ref_token_logprobs, r.response_tokens
FROM {advantage} AS a
LEFT JOIN {reference} AS r USING (id)
LEFT JOIN {ingest} AS i USING (id)
WHERE a.split = 'train' AND a.{weight} > 0
ORDER BY a.id
"""

ROW_COUNTS_SQL = """
SELECT count(*) AS rows, count(*) FILTER (WHERE positive) AS positive_rows
FROM {advantage} WHERE split = 'train'
"""


class TrainError(RuntimeError):
    """Inputs or state the train stage cannot use."""


# --------------------------------------------------------------------------- training rows


@dataclass
class TrainRows:
    """The rows the sampler can draw (sampling weight > 0), ordered by id, and the counts of the step budget."""

    table: pa.Table
    weight: np.ndarray
    train_rows: int
    positive_rows: int

    def take(self, indices: Sequence[int]) -> list[dict[str, Any]]:
        return self.table.take(pa.array(indices, type=pa.int64())).to_pylist()


def load_train_rows(algorithm: str, inputs: dict[str, StageReader]) -> TrainRows:
    """The training rows of the advantage table with their prompt, response and pi_ref log-probs."""
    weight = ALGORITHM_REGISTRY[algorithm].weight_column
    globs = {
        "advantage": inputs["advantage"].table_glob("advantage"),
        "reference": inputs["reference"].table_glob("reference"),
        "ingest": inputs["ingest"].table_glob("ingest"),
    }
    con = duckdb.connect(":memory:")
    try:
        tables = {name: inputs[name].sql_table(name) for name in globs}
        table = con.sql(TRAIN_ROWS_SQL.format(weight=weight, **tables)).to_arrow_table()
        rows, positive = con.execute(ROW_COUNTS_SQL.format(advantage=tables["advantage"])).fetchone()
    finally:
        con.close()
    if table.num_rows == 0:
        raise TrainError(
            f"{globs['advantage']}: none of the {rows} training rows has a positive `{weight}` "
            f"({positive} with A > 0); {algorithm} has nothing to train on"
        )
    for column, stage in (("ref_logprob", "reference"), ("prompt", "ingest")):
        missing = table[column].is_null()
        if pc.any(missing).as_py():
            row_id = table.filter(missing)["id"][0].as_py()
            raise TrainError(f"{globs[stage]}: training row id {row_id} of the advantage table is missing here")
    return TrainRows(table=table, weight=table["weight"].to_numpy(), train_rows=rows, positive_rows=positive)


def step_budget(train: TrainConfig, positive_rows: int, rows: int) -> int:
    """Optimiser steps: int(steps x #(A > 0) / N) for the A-LoL family (at least 1), `steps` otherwise."""
    if not ALGORITHM_REGISTRY[train.algorithm].shrinks_steps:
        return train.steps
    return max(1, int(train.steps * positive_rows / rows))


# --------------------------------------------------------------------------- micro-batches and the loss


@dataclass
class MicroBatch:
    """Tokenised rows with pi_ref's log-probs from the reference table."""

    prompt_ids: list[list[int]]
    response_ids: list[list[int]]
    ref_token_logprobs: list[torch.Tensor]
    ref_logprob: torch.Tensor
    reward: torch.Tensor
    advantage: torch.Tensor

    @property
    def tokens(self) -> int:
        return sum(len(p) + len(r) for p, r in zip(self.prompt_ids, self.response_ids))


def encode_micro_batch(rows: list[dict[str, Any]], tokenizer: Any, cfg: AlolConfig) -> MicroBatch:
    """Tokenise as the reference stage did (stages.models.encode_pair); T must equal the reference table's."""
    prompt_ids, response_ids = [], []
    for row in rows:
        p, r = encode_pair(
            tokenizer, row["prompt"], row["response"], cfg.reference.max_prompt_tokens, cfg.reference.max_response_tokens
        )
        if len(r) != row["response_tokens"] or len(r) != len(row["ref_token_logprobs"]):
            raise TrainError(
                f"row id {row['id']}: the response has {len(r)} tokens here but {row['response_tokens']} in the "
                "reference table; the tokenizer or reference.* settings changed since the reference stage ran"
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
    )


class PolicyForward:
    """pi_theta as stages.models sees a model (device, config, a forward call), calling through the
    accelerate-prepared wrapper so that several processes all-reduce their gradients."""

    def __init__(self, prepared: Any, unwrapped: Any):
        self.prepared = prepared
        self.config = unwrapped.config
        self.device = unwrapped.device

    def __call__(self, **kwargs: Any) -> Any:
        return self.prepared(**kwargs)


def micro_batch_loss(policy: Any, batch: MicroBatch, loss_fn: Any) -> LossOutput:
    """One forward of pi_theta over the micro-batch, then the algorithm's loss."""
    device = policy.device
    token_logprobs, mask = pad_rows(response_token_logprobs(policy, batch.prompt_ids, batch.response_ids))
    ref_token_logprobs, _ = pad_rows(batch.ref_token_logprobs, width=token_logprobs.shape[1])
    return loss_fn(
        LossBatch(
            token_logprobs=token_logprobs,
            ref_token_logprobs=ref_token_logprobs.to(device),
            mask=mask,
            ref_logprob=batch.ref_logprob.to(device),
            reward=batch.reward.to(device),
            advantage=batch.advantage.to(device),
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


def backward_micro_batches(accelerator: Any, model: Any, policy: Any, batches: list[MicroBatch], loss_fn: Any) -> StepSums:
    """Accumulate the gradient of mean over micro-batches of their batch-mean losses.

    Gradients are all-reduced (averaged over processes) only at the last micro-batch.
    """
    sums = StepSums()
    for k, batch in enumerate(batches):
        sync = k == len(batches) - 1
        with nullcontext() if sync else accelerator.no_sync(model):
            out = micro_batch_loss(policy, batch, loss_fn)
            accelerator.backward(out.loss / len(batches))
        sums.add(out, batch)
    return sums


# --------------------------------------------------------------------------- model, optimiser, schedule


def build_policy(path: Path, train: TrainConfig, seed: int) -> Any:
    """pi_theta = a copy of pi_ref, with LoRA adapters (peft, all linear layers but the head) when `lora_rank` is set."""
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
    model.train()
    return model


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


# --------------------------------------------------------------------------- validation


@dataclass
class Validation:
    """The validation prompts and pi_ref's mean reward on them (reference stage's value targets)."""

    prompt_ids: list[str]
    prompts: list[list[dict[str, str]]]
    reference_reward: float


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
            seed=cfg.run.seed,
        )
    finally:
        model.train()
    scores = scorer.score(validation.prompts, responses, ids=validation.prompt_ids, progress=False)
    return float(np.mean(scores["reward"]))


# --------------------------------------------------------------------------- resume state


@dataclass
class Progress:
    """Everything of a run that is not a tensor: the last finished step, the log, the best checkpoint."""

    step: int = 0
    log: list[dict[str, Any]] = field(default_factory=list)
    best_step: int | None = None
    best_reward: float | None = None
    sampler: dict[str, Any] | None = None
    seconds: float = 0.0


def resume_key(cfg: AlolConfig, inputs: dict[str, StageReader]) -> str:
    """Hash of what determines the training: train/reference/score config, seed, inputs, training code."""
    code = Path(__file__).resolve().parent
    payload = {
        "config": {s: getattr(cfg, s).model_dump(mode="json") for s in ("train", "reference", "score")},
        "seed": cfg.run.seed,
        "inputs": {name: reader.content_hash for name, reader in sorted(inputs.items())},
        "code": [sha256_text((code / name).read_text(encoding="utf-8")) for name in TRAINING_SOURCES],
    }
    return sha256_text(canonical_json(payload))[:24]


class ResumeFolder:
    """<cache>/train-resume/<key>/: `state-<step>/` folders, a `latest` pointer, `best-<step>.safetensors`."""

    def __init__(self, folder: Path, accelerator: Any):
        self.folder = folder
        self.accelerator = accelerator

    def best_path(self, step: int) -> Path:
        return self.folder / f"best-{step:08d}.safetensors"

    def latest(self) -> Path | None:
        pointer = self.folder / "latest"
        if not pointer.is_file():
            return None
        state = self.folder / pointer.read_text(encoding="utf-8").strip()
        return state if (state / "progress.json").is_file() else None

    def save_best(self, model: Any, step: int) -> None:
        """Trainable weights of the best checkpoint so far (main process)."""
        self.folder.mkdir(parents=True, exist_ok=True)
        tmp = self.best_path(step).with_suffix(".tmp")
        save_file({k: v.detach().cpu().contiguous() for k, v in trainable_parameters(model).items()}, tmp)
        os.replace(tmp, self.best_path(step))

    def save(self, model: Any, optimizer: Any, scheduler: Any, progress: Progress) -> None:
        """Every process writes its RNG state; the main process the rest, then moves `latest` (atomic)."""
        acc = self.accelerator
        state = self.folder / f"state-{progress.step:08d}"
        if acc.is_main_process:
            shutil.rmtree(state, ignore_errors=True)
            state.mkdir(parents=True)
        acc.wait_for_everyone()
        torch.save(_rng_state(), state / f"rng-{acc.process_index}.pt")
        if acc.is_main_process:
            save_file({k: v.detach().cpu().contiguous() for k, v in trainable_parameters(model).items()}, state / "trainable.safetensors")
            torch.save(optimizer.state_dict(), state / "optimizer.pt")
            torch.save(scheduler.state_dict(), state / "scheduler.pt")
            (state / "progress.json").write_text(json.dumps(asdict(progress)), encoding="utf-8")
        acc.wait_for_everyone()
        if acc.is_main_process:
            atomic_write_text(self.folder / "latest", state.name)
            self._remove_stale(keep_state=state.name, keep_best=progress.best_step)
        acc.wait_for_everyone()

    def load(self, model: Any, optimizer: Any, scheduler: Any, progress: Progress) -> bool:
        state = self.latest()
        if state is None:
            return False
        saved = json.loads((state / "progress.json").read_text(encoding="utf-8"))
        load_trainable(model, state / "trainable.safetensors")
        optimizer.load_state_dict(torch.load(state / "optimizer.pt", weights_only=True))
        scheduler.load_state_dict(torch.load(state / "scheduler.pt", weights_only=True))
        rng = state / f"rng-{self.accelerator.process_index}.pt"
        if rng.is_file():
            _set_rng_state(torch.load(rng, weights_only=True))
        for key, value in saved.items():
            setattr(progress, key, value)
        return True

    def _remove_stale(self, keep_state: str, keep_best: int | None) -> None:
        for path in self.folder.glob("state-*"):
            if path.name != keep_state:
                shutil.rmtree(path, ignore_errors=True)
        for path in self.folder.glob("best-*.safetensors"):
            if keep_best is None or path != self.best_path(keep_best):
                path.unlink(missing_ok=True)

    def remove(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


def load_trainable(model: Any, path: Path) -> None:
    """Load saved trainable weights; every trainable parameter must be in the file, nothing else."""
    tensors = load_file(path)
    expected = set(trainable_parameters(model))
    if set(tensors) != expected:
        raise TrainError(
            f"{path}: holds {len(tensors)} tensors but the model has {len(expected)} trainable parameters "
            f"(e.g. {sorted(set(tensors) ^ expected)[:3]}); delete {path.parent} to start over"
        )
    model.load_state_dict(tensors, strict=False)


def _rng_state() -> dict[str, Any]:
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# --------------------------------------------------------------------------- the stage


def _log_row(step: int, sums: StepSums, lr: float, grad_norm: float, seconds: float) -> dict[str, Any]:
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
        "tokens_per_s": sums.tokens / max(seconds, 1e-9),
        "validation_reward": None,
    }


def _should_validate(step: int, total: int, every: int) -> bool:
    return step % every == 0 or step == total


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
        self.rows = load_train_rows(train.algorithm, inputs)
        self.sampler = PrioritySampler(self.rows.weight, seed=cfg.run.seed)
        self.total_steps = step_budget(train, self.rows.positive_rows, self.rows.train_rows)
        path = reference_model_path(cfg, inputs["reference"])
        self.tokenizer = load_tokenizer(path)
        self.model = build_policy(path, train, cfg.run.seed)
        optimizer = torch.optim.AdamW(
            trainable_parameters(self.model).values(), lr=train.learning_rate, weight_decay=train.weight_decay
        )
        # Stepped here once per optimiser step (accelerate's prepared scheduler would step once per process).
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda s: learning_rate_factor(s, train, self.total_steps)
        )
        self.prepared, self.optimizer = accelerator.prepare(self.model, optimizer)
        self.policy = PolicyForward(self.prepared, accelerator.unwrap_model(self.prepared))
        self.loss_fn = loss_function(train)

    def step(self, step: int) -> dict[str, Any]:
        """One optimiser step on batch_size x grad_accumulation drawn rows; its train_log row.

        Process p of W takes micro-batches p x k/W .. (p + 1) x k/W - 1 of the k = grad_accumulation.
        """
        train, acc = self.cfg.train, self.accelerator
        clock = time.perf_counter()
        drawn = self.sampler.draw(train.batch_size * train.grad_accumulation)
        mine = range(acc.process_index * self.micro_batches, (acc.process_index + 1) * self.micro_batches)
        batches = [
            encode_micro_batch(self.rows.take(drawn[k * train.batch_size : (k + 1) * train.batch_size]),
                               self.tokenizer, self.cfg)
            for k in mine
        ]
        sums = backward_micro_batches(acc, self.prepared, self.policy, batches, self.loss_fn).reduced(acc)
        grad_norm = float(acc.clip_grad_norm_(trainable_parameters(self.model).values(), train.max_grad_norm))
        lr = self.scheduler.get_last_lr()[0]
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return _log_row(step, sums, lr, grad_norm, time.perf_counter() - clock)

    def validate(self, validation: Validation, scorer: Any) -> float:
        return validation_reward(self.accelerator.unwrap_model(self.prepared), self.tokenizer, validation, scorer, self.cfg)


def run(cfg: AlolConfig, inputs: dict[str, StageReader], out: StageWriter) -> StageResult:
    """Train pi_theta; write `train_log` and, when a checkpoint beat pi_ref on validation, `policy/`."""
    from accelerate import Accelerator

    train = cfg.train
    torch.manual_seed(cfg.run.seed)
    # cpu=True on a machine without a GPU is what makes accelerate run several CPU processes (gloo).
    accelerator = Accelerator(
        mixed_precision=resolve_mixed_precision(train.mixed_precision), cpu=not torch.cuda.is_available()
    )
    main_process = accelerator.is_main_process
    trainer = Trainer(cfg, inputs, accelerator)
    log.info(
        "%s: %d of %d training rows drawable, %d steps (of %d), %d process(es)", train.algorithm,
        len(trainer.rows.weight), trainer.rows.train_rows, trainer.total_steps, train.steps, accelerator.num_processes,
    )
    validation = load_validation(inputs["reference"], train.validation_prompts)
    scorer = load_scorer(cfg, inputs["score"]) if main_process else None
    resume = ResumeFolder(Path(cfg.run.cache_dir).resolve() / RESUME_FOLDER / resume_key(cfg, inputs), accelerator)
    progress = Progress()
    if resume.load(trainer.model, trainer.optimizer, trainer.scheduler, progress):
        trainer.sampler.load_state_dict(progress.sampler)
        log.info("resuming from step %d (%s)", progress.step, resume.folder)
    resumed_from = progress.step
    checkpoint_every = train.checkpoint_every or train.eval_every
    started = time.perf_counter() - progress.seconds

    bar = tqdm(total=trainer.total_steps, initial=progress.step, desc=f"train {train.algorithm}", unit="step",
               disable=not main_process)
    for step in range(progress.step + 1, trainer.total_steps + 1):
        row = trainer.step(step)
        if _should_validate(step, trainer.total_steps, train.eval_every):
            if main_process:
                row["validation_reward"] = trainer.validate(validation, scorer)
                log.info("step %d: validation reward %.4f (pi_ref %.4f)", step, row["validation_reward"],
                         validation.reference_reward)
                if progress.best_reward is None or row["validation_reward"] > progress.best_reward:
                    resume.save_best(trainer.model, step)
                    progress.best_step, progress.best_reward = step, row["validation_reward"]
            accelerator.wait_for_everyone()
        progress.log.append(row)
        progress.step = step
        bar.update(1)
        bar.set_postfix(loss=f"{row['loss']:.4g}")
        if step % checkpoint_every == 0 and step < trainer.total_steps:
            progress.sampler = trainer.sampler.state_dict()
            progress.seconds = time.perf_counter() - started
            resume.save(trainer.model, trainer.optimizer, trainer.scheduler, progress)
    bar.close()
    train_seconds = time.perf_counter() - started

    beat = progress.best_reward is not None and progress.best_reward > validation.reference_reward
    if main_process:
        if beat:
            _write_policy(trainer.model, trainer.tokenizer, resume.best_path(progress.best_step), out.path(POLICY_FOLDER))
        else:
            log.warning("no checkpoint beat pi_ref on validation (best %.4f vs pi_ref %.4f): keeping pi_ref",
                        progress.best_reward, validation.reference_reward)
        out.write_table("train_log", pa.Table.from_pylist(progress.log, schema=TRAIN_LOG_SCHEMA))
    accelerator.wait_for_everyone()
    if main_process:
        resume.remove()
    metrics = _metrics(cfg, trainer, progress, validation, beat, train_seconds, resumed_from)
    return StageResult(rows_in=trainer.rows.train_rows, rows_out=len(progress.log), metrics=metrics)


def _write_policy(model: Any, tokenizer: Any, best: Path, folder: Path) -> None:
    """The best checkpoint as a transformers folder (safetensors): LoRA adapters merged into the weights."""
    load_trainable(model, best)
    if hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def _metrics(
    cfg: AlolConfig, trainer: Trainer, progress: Progress, validation: Validation, beat: bool, train_seconds: float,
    resumed_from: int,
) -> TrainMetrics:
    rows, accelerator = trainer.rows, trainer.accelerator
    speeds = [r["tokens_per_s"] for r in progress.log]
    return TrainMetrics(
        algorithm=cfg.train.algorithm,
        policy_is_reference=not beat,
        best_step=progress.best_step if beat else None,
        best_validation_reward=progress.best_reward,
        best_validation_step=progress.best_step,
        reference_validation_reward=validation.reference_reward,
        validation_prompts=len(validation.prompts),
        train_seconds=round(train_seconds, 3),
        steps=trainer.total_steps,
        steps_full=cfg.train.steps,
        train_rows=rows.train_rows,
        positive_rows=rows.positive_rows,
        drawable_rows=len(rows.weight),
        rows_per_step=cfg.train.batch_size * cfg.train.grad_accumulation,
        processes=accelerator.num_processes,
        device=accelerator.device.type,
        mixed_precision=accelerator.mixed_precision,
        tokens_per_s_median=float(np.median(speeds)) if speeds else None,
        final_loss=progress.log[-1]["loss"] if progress.log else None,
        resumed_from_step=resumed_from,
    )
