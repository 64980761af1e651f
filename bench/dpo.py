"""Benchmark of our DPO training against TRL's DPOTrainer: train tokens/s and peak RSS, same model, pairs and batch.

The pairs are those the pipeline builds for the smoke profile (chatterbot: each training response against
pi_ref's greedy response, ranked by the reward; reference.pairs auto), from upstream outputs built once
under --root and reused by the stage cache. Each side runs in its own subprocess (its peak RSS is its own):

- alol: the train stage's DPO step (stages.train.step.Trainer.step: draw pairs, tokenise, one forward of
        pi_theta over both responses, DPO loss with pi_ref's log-probs from the reference table, backward,
        clip, AdamW); no validation.
- trl:  TRL's DPOTrainer (sigmoid loss, the same beta) on the same pairs as conversations, with
        precompute_ref_log_probs (its memory-light mode: pi_ref's log-probs computed once before training,
        no second model in memory), the same pairs per micro-batch, accumulation, learning rate and
        optimiser steps; no evaluation or checkpoints. TRL's DPOConfig turns gradient checkpointing on by
        default (kept here: it is what a TRL user gets): less activation memory, a recomputed forward.
- alol-gc: the alol side with train.gradient_checkpointing, like for like with TRL's default.

tokens/s counts prompt and response tokens of both responses per second of optimiser-step wall time (TRL:
its `num_tokens` count of attended tokens), the first step excluded. pi_theta is SmolLM2-135M-Instruct as
pi_ref (fp32, CPU, converted into data/cache once), or with --tiny a random Llama of about 100k parameters.

    .venv/bin/python bench/dpo.py [--steps 6] [--tiny] [--root data/bench-dpo]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.memory import peak_rss_mb  # noqa: E402

SIDES = ("alol", "alol-gc", "trl")


def bench_config(root: Path, steps: int, model: str | None, checkpointing: bool = False):
    from schemas.config import load_config

    extra = {"reference.model": model} if model else {}
    return load_config(
        "smoke",
        overrides={
            "run.root": str(root), "run.name": "bench-dpo", "run.cache_dir": str(ROOT / "data" / "cache"),
            "train.algorithm": "dpo", "train.batch_size": 4, "train.grad_accumulation": 2,
            "train.steps": steps, "train.eval_every": steps, "train.schedule": "constant", "reference.pairs": "auto",
            "train.gradient_checkpointing": checkpointing, **extra,
        },
    )


def upstream(cfg) -> dict:
    """ingest, score, reference and advantage of the smoke profile (reused from --root when present)."""
    from pipeline.runner import STAGES, execute_stage

    outputs = {}
    for stage in ("ingest", "score", "reference", "advantage"):
        outputs[stage], _ = execute_stage(cfg, stage, {d: outputs[d] for d in STAGES[stage].upstream})
    return outputs


def run_alol(cfg, inputs) -> list[tuple[int, float]]:
    from accelerate import Accelerator

    from stages.train.step import Trainer

    trainer = Trainer(cfg, inputs, Accelerator(cpu=True))
    timings = []
    for step in range(1, cfg.train.steps + 1):
        clock = time.perf_counter()
        row = trainer.step(step)
        timings.append((row["tokens"], time.perf_counter() - clock))
    return timings


def trl_dataset(cfg, inputs):
    """The pipeline's pairs (stages.train.pairs), chosen first, as TRL's conversational preference rows."""
    from datasets import Dataset

    from stages.train.pairs import load_pairs

    rows = load_pairs("dpo", inputs).table.to_pylist()
    return Dataset.from_list(
        [{"prompt": [{"role": m["role"], "content": m["content"]} for m in chosen["prompt"]],
          "chosen": [{"role": "assistant", "content": chosen["response"]}],
          "rejected": [{"role": "assistant", "content": rejected["response"]}]}
         for chosen, rejected in zip(rows[0::2], rows[1::2])]
    )


def run_trl(cfg, inputs, output_dir: Path) -> list[tuple[int, float]]:
    import trl
    from transformers import TrainerCallback

    from stages.catalog import reference_model_path
    from stages.models.store import load_causal_lm, load_tokenizer

    t = cfg.train
    path = reference_model_path(cfg, inputs["reference"])
    args = trl.DPOConfig(
        output_dir=str(output_dir), beta=t.dpo_beta, loss_type=["sigmoid"], precompute_ref_log_probs=True,
        per_device_train_batch_size=t.batch_size, gradient_accumulation_steps=t.grad_accumulation,
        max_steps=t.steps, learning_rate=t.learning_rate, weight_decay=t.weight_decay, lr_scheduler_type="constant",
        max_grad_norm=t.max_grad_norm, max_length=cfg.reference.max_prompt_tokens + cfg.reference.max_response_tokens,
        seed=cfg.run.seed, use_cpu=True, bf16=False, fp16=False, report_to=[], save_strategy="no",
        logging_strategy="no", eval_strategy="no", dataloader_num_workers=0, disable_tqdm=True,
    )
    trainer = trl.DPOTrainer(model=load_causal_lm(path), args=args, processing_class=load_tokenizer(path),
                             train_dataset=trl_dataset(cfg, inputs))
    timings: list[tuple[int, float]] = []

    class StepClock(TrainerCallback):
        def on_step_begin(self, *_args, **_kwargs):
            self.clock, self.tokens = time.perf_counter(), trainer._total_train_tokens

        def on_step_end(self, *_args, **_kwargs):
            timings.append((trainer._total_train_tokens - self.tokens, time.perf_counter() - self.clock))

    trainer.add_callback(StepClock())
    trainer.train()
    return timings


def child(side: str, root: Path, steps: int, model: str | None, folders: dict[str, str]) -> None:
    import tempfile

    import torch

    from stages.io import StageReader

    torch.set_num_threads(2)
    cfg = bench_config(root, steps, model, checkpointing=side == "alol-gc")
    inputs = {name: StageReader(folder) for name, folder in folders.items()}
    with tempfile.TemporaryDirectory() as tmp:
        timings = run_trl(cfg, inputs, Path(tmp)) if side == "trl" else run_alol(cfg, inputs)
    measured = timings[1:]
    print(json.dumps({
        "tokens_per_s": sum(n for n, _ in measured) / sum(s for _, s in measured),
        "steps": len(timings),
        "tokens": sum(n for n, _ in measured),
        "peak_rss_mb": peak_rss_mb(),
    }))


def measure(side: str, root: Path, steps: int, model: str | None, folders: dict[str, str]) -> dict:
    command = [sys.executable, __file__, "--child", side, "--root", str(root), "--steps", str(steps),
               "--inputs", json.dumps(folders)] + (["--model", model] if model else [])
    done = subprocess.run(
        command, capture_output=True, text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "2", "TQDM_DISABLE": "1"},
    )
    if done.returncode != 0:
        raise RuntimeError(f"{side} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def tiny_model(root: Path) -> str:
    from tests.support.models import tiny_model_folder

    folder = root / "tiny-model"
    if not (folder / "config.json").is_file():
        tiny_model_folder(folder)
    return str(folder)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=6, help="optimiser steps per side (the first is not timed)")
    parser.add_argument("--root", type=Path, default=ROOT / "data" / "bench-dpo", help="run root for the upstream stages")
    parser.add_argument("--tiny", action="store_true", help="a tiny random Llama instead of SmolLM2-135M")
    parser.add_argument("--child", choices=SIDES, help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--inputs", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.root, args.steps, args.model, json.loads(args.inputs))
        return
    model = tiny_model(args.root) if args.tiny else None
    # Built once here, so that no measured process runs an upstream stage.
    cfg = bench_config(args.root, args.steps, model)
    folders = {name: output.path for name, output in upstream(cfg).items()}
    t = cfg.train
    print(f"load average at start: {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores; model {cfg.reference.model}; "
          f"{args.steps} steps of {t.batch_size} x {t.grad_accumulation} pairs each")
    results = {side: measure(side, args.root, args.steps, model, folders) for side in SIDES}
    print(f"{'run':>7} {'tokens/s':>9} {'timed tokens':>13} {'peak RSS MB':>12}")
    for side, r in results.items():
        print(f"{side:>7} {r['tokens_per_s']:>9.1f} {r['tokens']:>13} {r['peak_rss_mb']:>12.0f}")
    trl = results["trl"]
    for side in ("alol", "alol-gc"):
        print(f"{side} / trl: tokens/s {results[side]['tokens_per_s'] / trl['tokens_per_s']:.3f} (target >= 1.0), "
              f"peak RSS {results[side]['peak_rss_mb'] / trl['peak_rss_mb']:.3f} (target <= 1.0)")


if __name__ == "__main__":
    main()
