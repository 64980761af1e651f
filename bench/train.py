"""Benchmark of the train stage on SmolLM2-135M (full fine-tuning, fp32, CPU), all on the same rows.

Each measurement runs in its own subprocess (its peak RSS is its own), on the upstream outputs of a
smoke-profile run (built once under --root and reused by the stage cache), with the same draws of the
priority sampler (A+ weights, same seed), batch size and accumulation:

- stage:     the A-LoL train stage (`stages.train.run`, algorithm a_lol, validation only at the end);
             tokens/s from its train_log.
- nll-loop:  a plain NLL fine-tuning loop written with transformers (labels with -100 on prompt and
             padding, `model(...).loss`, AdamW): the throughput baseline.
- alol-loop: the stage's own training step (tokenise, one forward of pi_theta, A-LoL loss with pi_ref's
             log-probs from the reference table, backward, clip, AdamW) with no validation or scorer.
- ref-loop:  the same step, but as the authors' code does it: pi_ref loaded as a second model and run
             (no grad) every step for its log-probs: the memory baseline.

tokens/s counts prompt and response tokens per second of optimiser-step wall time, first step excluded.

    .venv/bin/python bench/train.py [--steps 6] [--root data/bench-train]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.memory import peak_rss_mb  # noqa: E402

MODES = ("stage", "nll-loop", "alol-loop", "ref-loop")


def bench_config(root: Path, steps: int):
    from schemas.config import load_config

    return load_config(
        "smoke",
        overrides={
            "run.root": str(root), "run.name": "bench", "run.cache_dir": str(ROOT / "data" / "cache"),
            "train.algorithm": "a_lol", "train.batch_size": 4, "train.grad_accumulation": 2,
            # steps x positive fraction = the A-LoL budget; steps is large enough that the budget covers --steps
            "train.steps": steps * 8, "train.eval_every": steps * 8, "train.schedule": "constant",
        },
    )


def upstream(cfg) -> dict:
    """ingest, score, reference and advantage of the smoke profile (reused from --root when present)."""
    from pipeline.runner import execute_stage

    outputs = {}
    needs = {"ingest": (), "score": ("ingest",), "reference": ("ingest", "score"), "advantage": ("score", "reference")}
    for stage, deps in needs.items():
        outputs[stage], _ = execute_stage(cfg, stage, {d: outputs[d] for d in deps})
    return outputs


def run_stage(cfg, inputs, steps: int) -> list[tuple[int, float]]:
    import tempfile

    from stages import train
    from stages.io import StageWriter
    from stages.train.rows import step_budget

    advantage = inputs["advantage"].metrics
    positive, rows = advantage.positive_rows, advantage.rows
    cfg.train.steps = math.ceil(steps * rows / positive)  # the A-LoL budget int(steps_full x positive / rows) = steps
    assert step_budget(cfg.train, positive, rows) == steps
    with tempfile.TemporaryDirectory() as tmp:
        out = StageWriter(Path(tmp) / "train")
        try:
            result = train.run(cfg, inputs, out)
            log = _read_log(out.dir / "train_log")
        finally:
            out.abort()
    # Wall-clock figures are in the metrics, not in the train_log table (the output stays reproducible).
    return [(r["tokens"], r["tokens"] / speed) for r, speed in zip(log, result.metrics.step_tokens_per_s, strict=True)]


def _read_log(folder: Path) -> list[dict]:
    import pyarrow.parquet as pq

    return pq.read_table(folder).to_pylist()


def run_loop(mode: str, cfg, inputs, steps: int) -> list[tuple[int, float]]:
    import torch
    from accelerate import Accelerator

    from stages.catalog import reference_model_path
    from stages.losses import loss_function
    from stages.models.logprobs import response_token_logprobs
    from stages.models.store import load_causal_lm, load_tokenizer
    from stages.sampler import PrioritySampler
    from stages.train.rows import load_train_rows
    from stages.train.step import PolicyForward, backward_micro_batches, encode_micro_batch

    t = cfg.train
    rows = load_train_rows("a_lol", inputs)
    sampler = PrioritySampler(rows.weight, seed=cfg.run.seed)
    path = reference_model_path(cfg, inputs["reference"])
    tokenizer, model = load_tokenizer(path), load_causal_lm(path)
    model.train()
    pi_ref = load_causal_lm(path) if mode == "ref-loop" else None
    optimizer = torch.optim.AdamW(model.parameters(), lr=t.learning_rate, weight_decay=t.weight_decay)
    accelerator = Accelerator(cpu=True)
    policy, loss_fn = PolicyForward(model, model), loss_function(t)
    timings = []
    for _ in range(steps):
        clock = time.perf_counter()
        drawn = rows.take(sampler.draw(t.batch_size * t.grad_accumulation))
        batches = [encode_micro_batch(drawn[k * t.batch_size : (k + 1) * t.batch_size], tokenizer, cfg)
                   for k in range(t.grad_accumulation)]
        if mode == "nll-loop":
            for batch in batches:
                nll_backward(model, batch, tokenizer.pad_token_id, t.grad_accumulation)
        else:
            if pi_ref is not None:
                for batch in batches:
                    with torch.no_grad():
                        ref = response_token_logprobs(pi_ref, batch.prompt_ids, batch.response_ids)
                    batch.ref_token_logprobs = ref
                    batch.ref_logprob = torch.stack([r.sum() for r in ref])
            backward_micro_batches(accelerator, model, policy, batches, loss_fn)
        torch.nn.utils.clip_grad_norm_(model.parameters(), t.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        timings.append((sum(b.tokens for b in batches), time.perf_counter() - clock))
    return timings


def nll_backward(model, batch, pad_id: int, accumulation: int) -> None:
    """The textbook transformers recipe: right-padded prompt+response, labels -100 outside the response."""
    import torch

    sequences = [p + r for p, r in zip(batch.prompt_ids, batch.response_ids)]
    width = max(len(s) for s in sequences)
    input_ids = torch.full((len(sequences), width), pad_id)
    attention_mask = torch.zeros_like(input_ids)
    labels = torch.full_like(input_ids, -100)
    for i, (p, r) in enumerate(zip(batch.prompt_ids, batch.response_ids)):
        input_ids[i, : len(p) + len(r)] = torch.tensor(p + r)
        attention_mask[i, : len(p) + len(r)] = 1
        labels[i, len(p) : len(p) + len(r)] = torch.tensor(r)
    loss = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss
    (loss / accumulation).backward()


def child(mode: str, root: Path, steps: int, folders: dict[str, str]) -> None:
    import torch

    from stages.io import StageReader

    torch.set_num_threads(2)
    cfg = bench_config(root, steps)
    inputs = {name: StageReader(folder) for name, folder in folders.items()}
    timings = run_stage(cfg, inputs, steps) if mode == "stage" else run_loop(mode, cfg, inputs, steps)
    measured = timings[1:]
    print(json.dumps({
        "tokens_per_s": sum(n for n, _ in measured) / sum(s for _, s in measured),
        "steps": len(timings),
        "tokens": sum(n for n, _ in measured),
        "peak_rss_mb": peak_rss_mb(),
    }))


def measure(mode: str, root: Path, steps: int, folders: dict[str, str]) -> dict:
    done = subprocess.run(
        [sys.executable, __file__, "--child", mode, "--root", str(root), "--steps", str(steps),
         "--inputs", json.dumps(folders)],
        capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "2"},
    )
    if done.returncode != 0:
        raise RuntimeError(f"{mode} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=6, help="optimiser steps per measurement (the first is not timed)")
    parser.add_argument("--root", type=Path, default=ROOT / "data" / "bench-train", help="run root for the upstream stages")
    parser.add_argument("--child", choices=MODES, help=argparse.SUPPRESS)
    parser.add_argument("--inputs", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.root, args.steps, json.loads(args.inputs))
        return
    # Built once here, so that no measured process runs an upstream stage.
    folders = {name: output.path for name, output in upstream(bench_config(args.root, args.steps)).items()}
    print(f"load average at start: {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores; {args.steps} steps of 8 rows each")
    results = {mode: measure(mode, args.root, args.steps, folders) for mode in MODES}
    print(f"{'run':>10} {'tokens/s':>9} {'timed tokens':>13} {'peak RSS MB':>12}")
    for mode, r in results.items():
        print(f"{mode:>10} {r['tokens_per_s']:>9.1f} {r['tokens']:>13} {r['peak_rss_mb']:>12.0f}")
    print(f"tokens/s, stage / nll-loop:   {results['stage']['tokens_per_s'] / results['nll-loop']['tokens_per_s']:.3f} (target >= 0.95)")
    print(f"tokens/s, alol-loop / nll-loop: {results['alol-loop']['tokens_per_s'] / results['nll-loop']['tokens_per_s']:.3f}")
    print(f"peak RSS, alol-loop / ref-loop: {results['alol-loop']['peak_rss_mb'] / results['ref-loop']['peak_rss_mb']:.3f} (target <= 0.6)")
    print(f"peak RSS, stage / ref-loop:     {results['stage']['peak_rss_mb'] / results['ref-loop']['peak_rss_mb']:.3f}")


if __name__ == "__main__":
    main()
