"""Train stage: pi_theta, initialised from pi_ref, trained on the offline rows with one of the ten
losses of ../shared/method.md (stages.losses).

One optimiser step (stages.train.step): draw batch_size x grad_accumulation rows with replacement
(stages.sampler: in proportion to A+ for the A-LoL family, so A <= 0 is never drawn; to R for wBC,
R-GOLD and R-LoL; uniformly for NLL) as grad_accumulation micro-batches, shared out over the
processes; per micro-batch one forward of pi_theta gives l_t^theta of the response tokens, pi_ref's
l_t^ref and L_ref come from the reference table (pi_ref is never loaded: the only model in memory
is pi_theta; when it has dropout, the importance weights of the ratio losses come from a second,
dropout-free no-grad forward, like pi_ref's cached log-probs, and those losses refuse mixed
precision), backward of loss / (micro-batches of this process); the gradients are averaged over
the processes, so the step's gradient is the mean over all micro-batches whatever the number of
processes; then gradient-norm clip, AdamW, schedule (stages.train.policy).
The A-LoL family's step budget is int(steps x #(A > 0) / N) (stages.train.rows). DPO and PRO draw
preference pairs uniformly (stages.train.pairs: the data's, or built with pi_ref's responses) and write
them as the table `pairs`.

Validation (stages.train.validation) every `eval_every` steps and at the last: greedy decoding of
the validation prompts, scored by the score stage's components. pi_ref's validation reward is the
reference stage's value targets (pi_ref's greedy decodes of the same prompts with the same
settings). The best checkpoint becomes `policy/` (a transformers folder, LoRA merged) only if it
beats pi_ref; else there is no `policy/` and `policy_is_reference` is true.

Resume (stages.train.resume): the state (trainable weights, optimiser, scheduler, sampler, RNG, log,
timings) is saved every `checkpoint_every` steps under <run.cache_dir>/train-resume/<key of config
and inputs>/ (with an object store cache_dir: in its local mirror on the worker, stages.fs), which
outlives the stage's discarded partial output; a rerun after a crash continues from it and reaches
the same weights. The folder is deleted when the stage finishes.

The files (`train_log`, `policy/`) are a function of the inputs, config and code, so computing a key
again, or resuming it, gives the same content hash; the wall-clock figures (seconds, tokens per
second of each step) are in the metrics (schemas.train.TrainMetrics), which the hash does not cover.

Several processes: `torchrun --nproc_per_node N -m pipeline.launch --profile P [--set k=v ...]`
(pipeline/launch.py); grad_accumulation must be a multiple of N, each process runs grad_accumulation / N
micro-batches, and the result equals one process running all grad_accumulation of them.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch
from tqdm import tqdm

from schemas.config import AlolConfig
from schemas.manifest import StageResult
from schemas.train import PAIRS_SCHEMA, TRAIN_LOG_SCHEMA, TrainMetrics
from stages import fs
from stages.catalog import POLICY_FOLDER, load_scorer
from stages.faults import failpoint
from stages.io import StageReader, StageWriter
from stages.models.store import save_model_folder
from stages.torchrun import init_process_group
from stages.train.policy import resolve_mixed_precision
from stages.train.resume import RESUME_FOLDER, Progress, ResumeFolder, load_trainable, resume_key
from stages.train.pairs import pair_table
from stages.train.step import Trainer
from stages.train.validation import Validation, load_validation, should_validate

log = logging.getLogger("alol.train")


def run(cfg: AlolConfig, inputs: dict[str, StageReader], out: StageWriter) -> StageResult:
    """Train pi_theta; write `train_log` and, when a checkpoint beat pi_ref on validation, `policy/`."""
    from accelerate import Accelerator

    train = cfg.train
    torch.manual_seed(train.seed_or(cfg.run.seed))
    init_process_group()  # under torchrun: the group, its keys per life of the workers (stages.torchrun)
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
    resume = ResumeFolder(fs.local_mirror(fs.location(cfg.run.cache_dir)) / RESUME_FOLDER / resume_key(cfg, inputs), accelerator)
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
        clock = time.perf_counter()
        row = trainer.step(step)
        progress.step_tokens_per_s.append(round(row["tokens"] / max(time.perf_counter() - clock, 1e-9), 2))
        if should_validate(step, trainer.total_steps, train.eval_every):
            if main_process:
                clock = time.perf_counter()
                row["validation_reward"] = trainer.validate(validation, scorer)
                progress.validation_seconds += time.perf_counter() - clock
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
        failpoint("train.step")
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
        if trainer.rows.pair_source is not None:
            out.write_table("pairs", pair_table(trainer.rows.table), PAIRS_SCHEMA)
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
    save_model_folder(model, tokenizer, folder)


def _metrics(
    cfg: AlolConfig, trainer: Trainer, progress: Progress, validation: Validation, beat: bool, train_seconds: float,
    resumed_from: int,
) -> TrainMetrics:
    rows, accelerator = trainer.rows, trainer.accelerator
    speeds = progress.step_tokens_per_s
    return TrainMetrics(
        algorithm=cfg.train.algorithm,
        policy_is_reference=not beat,
        best_step=progress.best_step if beat else None,
        best_validation_reward=progress.best_reward,
        best_validation_step=progress.best_step,
        reference_validation_reward=validation.reference_reward,
        validation_prompts=len(validation.prompts),
        train_seconds=round(train_seconds, 3),
        validation_seconds=round(progress.validation_seconds, 3),
        steps=trainer.total_steps,
        steps_full=cfg.train.steps,
        train_rows=rows.train_rows,
        positive_rows=rows.positive_rows,
        drawable_rows=len(rows.weight),
        rows_per_step=cfg.train.batch_size * cfg.train.grad_accumulation,
        processes=accelerator.num_processes,
        device=accelerator.device.type,
        mixed_precision=accelerator.mixed_precision,
        step_tokens_per_s=speeds,
        tokens_per_s_median=float(np.median(speeds)) if speeds else None,
        final_loss=progress.log[-1]["loss"] if progress.log else None,
        resumed_from_step=resumed_from,
        pair_source=rows.pair_source,
        tied_pairs_left_out=rows.tied_pairs_left_out if rows.pair_source else None,
    )
