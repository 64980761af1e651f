"""Benchmark of the train stage on SmolLM2-135M (full fine-tuning; fp32 on CPU by default), all on the same rows.

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
- trl-sft:   TRL's SFTTrainer on the rows the sampler drew for the loops (the same steps x batch rows, one
             epoch, as TRL's own shuffled order), given already tokenised as the loops tokenise them
             (input_ids and completion_mask: loss on the response tokens only), the same batch, accumulation,
             learning rate, clip and precision; no checkpoints, logging or evaluation, and gradient
             checkpointing off (SFTConfig's default is on: a recomputed forward per step, which would make
             the ratio below flatter us). The peer throughput baseline.

With --lora-rank the stage and the three loops train LoRA adapters (the stage's build_policy; ref-loop then holds
pi_ref as a second model next to the adapted pi_theta, nll-loop is the plain LoRA loop); trl-sft stays full
fine-tuning.

With --shape 1.7b the loops and TRL train a model of SmolLM2-1.7B's architecture instead of pi_ref (random weights
from a fixed seed, SmolLM2's tokenizer and vocabulary, so the rows tokenise as the reference table's; built once
under --root): a size where the weights, not the interpreter, torch and the activations, are most of a process's
memory, as they are for the 7B models the LoRA memory target is about. The loss values mean nothing there (the
cached pi_ref log-probs are SmolLM2-135M's); the work and the memory per step are those of that model.

Each process runs under alol's memory allocator (pipeline/allocator.py: mimalloc keeping freed pages), as the
`alol` command does; `--allocators mimalloc system` measures every mode under both (rows `<mode>/system`: glibc's
malloc, what a plain Python process gets) and prints the ratio. On an AMD CPU every process, TRL's too, also
runs with MKL's kernels chosen by the CPU's features (pipeline/mkl_dispatch.py; ALOL_MKL_DISPATCH=vendor: MKL's own choice).

tokens/s counts the rows' prompt and response tokens per second of optimiser-step wall time, the first --warmup
steps excluded (default 1; the warm-up column gives their seconds: the first steps fault in the optimiser state and
the step's working set, which on a VM costs seconds of kernel time);
with --rounds N all modes run N times, interleaved, and each figure is the median over the rounds.
The matmul peak (bench.matmul, in the run's precision) is measured before each process and its best is
kept; the share of it is 6 x parameters x positions/s (forward and backward) over that peak, counting the positions
pi_theta's forwards computed: padding included, and a chat template's prompt prefix once per packed sequence where
our step shares it (stages.models.logprobs), so that the share measures how well the work done uses the machine
and tokens/s how fast the rows are trained on.

    .venv/bin/python bench/train.py [--steps 6] [--rounds 1] [--root data/bench-train] [--modes ...]
                                    [--device cpu|cuda] [--mixed-precision no|bf16] [--algorithm a_lol]
                                    [--lora-rank 16] [--lora-dropout 0] [--allocators mimalloc system]
                                    [--warmup 1] [--shape 1.7b]
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

from bench.matmul import count_positions  # noqa: E402
from bench.memory import peak_rss_mb  # noqa: E402

MODES = ("stage", "nll-loop", "alol-loop", "ref-loop", "trl-sft")
# Config fields of a larger model of pi_ref's family (Llama blocks, tied embeddings, SmolLM2's vocabulary).
SHAPES = {
    "1.7b": {"hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 24, "num_attention_heads": 32,
             "num_key_value_heads": 32, "head_dim": 64},
}


def bench_config(root: Path, steps: int, algorithm: str = "a_lol", mixed_precision: str = "no", lora_rank: int | None = None,
                 lora_dropout: float | None = None):
    from schemas.config import load_config

    return load_config(
        "smoke",
        overrides={
            "run.root": str(root), "run.name": "bench", "run.cache_dir": str(ROOT / "data" / "cache"),
            "train.algorithm": algorithm, "train.mixed_precision": mixed_precision, "train.lora_rank": lora_rank,
            **({} if lora_dropout is None else {"train.lora_dropout": lora_dropout}),
            "train.batch_size": 4, "train.grad_accumulation": 2,
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


def model_folder(cfg, inputs, shape: str | None, root: Path) -> Path:
    """The model the loops train: pi_ref, or (--shape) a model of that shape with random weights, built once
    under `root` from pi_ref's config and tokenizer."""
    from stages.catalog import reference_model_path
    from stages.models.store import build_once

    path = reference_model_path(cfg, inputs["reference"])
    if shape is None:
        return path

    def build(folder: Path) -> None:
        import torch
        from transformers import AutoConfig, AutoModelForCausalLM

        from stages.models.store import load_tokenizer, save_model_folder

        config = AutoConfig.from_pretrained(path)
        for name, value in SHAPES[shape].items():
            setattr(config, name, value)
        torch.manual_seed(0)
        save_model_folder(AutoModelForCausalLM.from_config(config, dtype=torch.float32), load_tokenizer(path), folder)

    return build_once(root / f"random-{shape}", build)


def run_stage(cfg, inputs, steps: int) -> list[tuple[int, float, None, None]]:
    """(tokens, wall seconds, None, None) per step: the stage reports no CPU time or positions per step."""
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
    return [(r["tokens"], r["tokens"] / speed, None, None) for r, speed in zip(log, result.metrics.step_tokens_per_s, strict=True)]


def _read_log(folder: Path) -> list[dict]:
    import pyarrow.parquet as pq

    return pq.read_table(folder).to_pylist()


def drawn_batches(cfg, inputs, tokenizer, steps: int):
    """Each step's micro-batches, as the loops draw and tokenise them (same sampler, seed and order)."""
    from stages.sampler import PrioritySampler
    from stages.train.rows import load_train_rows
    from stages.models.tokenize import template_prefix
    from stages.train.step import encode_micro_batch

    t = cfg.train
    prefix = template_prefix(tokenizer)
    rows = load_train_rows(t.algorithm, inputs)
    sampler = PrioritySampler(rows.weight, seed=cfg.run.seed)
    for _ in range(steps):
        drawn = rows.take(sampler.draw(t.batch_size * t.grad_accumulation))
        yield [encode_micro_batch(drawn[k * t.batch_size : (k + 1) * t.batch_size], tokenizer, cfg, shared_prefix=prefix)
               for k in range(t.grad_accumulation)]


def run_loop(mode: str, cfg, inputs, steps: int, device: str, path: Path) -> list[tuple[int, float, float, int]]:
    """(tokens, wall seconds, process CPU seconds, positions pi_theta's forwards computed) per optimiser step."""
    import torch
    from accelerate import Accelerator

    from stages.losses import loss_function
    from stages.models.logprobs import response_token_logprobs
    from stages.models.store import load_causal_lm, load_tokenizer
    from schemas.algorithms import ALGORITHM_REGISTRY
    from stages.train.policy import build_optimizer, build_policy, resolve_mixed_precision
    from stages.train.step import PolicyForward, backward_micro_batches, has_active_dropout

    t = cfg.train
    # pi_theta as the stage builds it (LoRA adapters under --lora-rank), and its importance weights alike: from a
    # second, dropout-free forward when the model has active dropout (LoRA's)
    tokenizer, model = load_tokenizer(path), build_policy(path, t, cfg.run.seed).to(device)
    weight_forward = ALGORITHM_REGISTRY[t.algorithm].clipped and has_active_dropout(model)
    pi_ref = load_causal_lm(path).to(device) if mode == "ref-loop" else None
    accelerator = Accelerator(cpu=device == "cpu", mixed_precision=resolve_mixed_precision(t.mixed_precision))
    prepared, optimizer = accelerator.prepare(model, build_optimizer(model, t))
    policy, loss_fn = PolicyForward(prepared, model), loss_function(t)
    timings = []
    positions = count_positions(model)
    batches_of_steps = drawn_batches(cfg, inputs, tokenizer, steps)
    for _ in range(steps):
        clock, cpu_clock, before = time.perf_counter(), time.process_time(), positions[0]
        batches = next(batches_of_steps)
        if mode == "nll-loop":
            for batch in batches:
                nll_backward(prepared, batch, tokenizer.pad_token_id, t.grad_accumulation)
        else:
            if pi_ref is not None:
                for batch in batches:
                    with torch.no_grad():
                        ref = response_token_logprobs(pi_ref, batch.prompt_ids, batch.response_ids, batch.shared_prefix)
                    batch.ref_token_logprobs = ref
                    batch.ref_logprob = torch.stack([r.sum() for r in ref])
            backward_micro_batches(accelerator, prepared, policy, batches, loss_fn, weight_forward)
        accelerator.clip_grad_norm_(model.parameters(), t.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        synchronize(device)
        timings.append((sum(b.tokens for b in batches), time.perf_counter() - clock, time.process_time() - cpu_clock,
                        positions[0] - before))
    return timings


def synchronize(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def run_trl_sft(cfg, inputs, steps: int, device: str, output_dir: Path, path: Path) -> list[tuple[int, float, float, int]]:
    import trl
    from datasets import Dataset
    from transformers import TrainerCallback

    from stages.models.store import load_causal_lm, load_tokenizer

    t = cfg.train
    tokenizer = load_tokenizer(path)
    rows = [{"input_ids": p + r, "completion_mask": [0] * len(p) + [1] * len(r)}
            for batches in drawn_batches(cfg, inputs, tokenizer, steps) for b in batches
            for p, r in zip(b.prompt_ids, b.response_ids)]
    args = trl.SFTConfig(
        output_dir=str(output_dir), completion_only_loss=True, gradient_checkpointing=False,
        per_device_train_batch_size=t.batch_size, gradient_accumulation_steps=t.grad_accumulation,
        max_steps=steps, learning_rate=t.learning_rate, weight_decay=t.weight_decay, lr_scheduler_type="constant",
        max_grad_norm=t.max_grad_norm, max_length=None, seed=cfg.run.seed, use_cpu=device == "cpu",
        bf16=t.mixed_precision == "bf16", fp16=False, report_to=[], save_strategy="no", logging_strategy="no",
        eval_strategy="no", dataloader_num_workers=0, disable_tqdm=True, include_num_input_tokens_seen="non_padding",
    )
    trainer = trl.SFTTrainer(model=load_causal_lm(path), args=args, processing_class=tokenizer,
                             train_dataset=Dataset.from_list(rows))
    timings: list[tuple[int, float, float, int]] = []
    positions = count_positions(trainer.model)

    class StepClock(TrainerCallback):
        def on_step_begin(self, _args, state, *_rest, **_kwargs):
            self.clock, self.cpu_clock, self.tokens = time.perf_counter(), time.process_time(), state.num_input_tokens_seen
            self.positions = positions[0]

        def on_step_end(self, _args, state, *_rest, **_kwargs):
            synchronize(device)
            timings.append((state.num_input_tokens_seen - self.tokens, time.perf_counter() - self.clock,
                            time.process_time() - self.cpu_clock, positions[0] - self.positions))

    trainer.add_callback(StepClock())
    trainer.train()
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


def child(mode: str, args, folders: dict[str, str]) -> None:
    import tempfile

    import torch

    from stages.io import StageReader

    torch.set_num_threads(args.threads)
    cfg = bench_config(args.root, args.steps, args.algorithm, args.mixed_precision, args.lora_rank, args.lora_dropout)
    inputs = {name: StageReader(folder) for name, folder in folders.items()}
    with tempfile.TemporaryDirectory() as tmp:
        if mode == "stage":
            timings = run_stage(cfg, inputs, args.steps)
        else:
            path = model_folder(cfg, inputs, args.shape, args.root)
            if mode == "trl-sft":
                timings = run_trl_sft(cfg, inputs, args.steps, args.device, Path(tmp), path)
            else:
                timings = run_loop(mode, cfg, inputs, args.steps, args.device, path)
    measured = timings[args.warmup:]
    cpu_seconds = None if measured[0][2] is None else sum(c for _, _, c, _ in measured)
    wall_seconds = sum(s for _, s, _, _ in measured)
    print(json.dumps({
        "tokens_per_s": sum(n for n, _, _, _ in measured) / wall_seconds,
        "tokens_per_cpu_s": None if cpu_seconds is None else sum(n for n, _, _, _ in measured) / cpu_seconds,
        "positions_per_s": None if measured[0][3] is None else sum(p for _, _, _, p in measured) / wall_seconds,
        "steps": len(timings),
        "tokens": sum(n for n, _, _, _ in measured),
        "peak_rss_mb": peak_rss_mb(),
        "wall_seconds": wall_seconds,
        "warmup_seconds": sum(s for _, s, _, _ in timings[: args.warmup]),
        "step_seconds": [round(s, 2) for _, s, _, _ in timings],
        "cpu_seconds": cpu_seconds,
        "mimalloc": sys.platform == "linux" and "libmimalloc" in Path("/proc/self/maps").read_text(),
    }))


def measure(mode: str, allocator: str, args, folders: dict[str, str]) -> dict:
    from pipeline.allocator import allocator_environment

    done = subprocess.run(
        [sys.executable, __file__, "--child", mode, "--root", str(args.root), "--steps", str(args.steps),
         "--device", args.device, "--mixed-precision", args.mixed_precision, "--algorithm", args.algorithm,
         "--threads", str(args.threads), "--warmup", str(args.warmup), "--inputs", json.dumps(folders)]
        + (["--shape", args.shape] if args.shape else [])
        + (["--lora-rank", str(args.lora_rank)] if args.lora_rank else [])
        + (["--lora-dropout", str(args.lora_dropout)] if args.lora_dropout is not None else []),
        capture_output=True, text=True,
        env=allocator_environment(
            {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": str(args.threads), "TQDM_DISABLE": "1"}, allocator),
    )
    if done.returncode != 0:
        raise RuntimeError(f"{mode} failed:\n{done.stderr[-3000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    if not result.pop("mimalloc") and allocator == "mimalloc":  # the preload took, or the row says it did not
        print(f"{mode}: mimalloc is not loaded (cmeel-mimalloc missing, or not Linux): it ran under the system malloc")
    return result


def run_name(mode: str, allocator: str) -> str:
    return mode if allocator == "mimalloc" else f"{mode}/{allocator}"


def median_result(runs: list[dict]) -> dict:
    """Each figure's median over the rounds (None stays None); peak RSS is the largest of any round."""
    import statistics

    merged = {k: None if runs[0][k] is None else statistics.median(r[k] for r in runs) for k in runs[0] if k != "step_seconds"}
    merged["step_seconds"] = [r["step_seconds"] for r in runs]
    merged["peak_rss_mb"] = max(r["peak_rss_mb"] for r in runs)
    merged["rounds_tokens_per_s"] = [round(r["tokens_per_s"], 1) for r in runs]
    return merged


def parameters(path: Path) -> int:
    from stages.models.store import load_causal_lm

    return sum(p.numel() for p in load_causal_lm(path).parameters())


def main() -> None:
    from bench.matmul import matmul_flops

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=6, help="optimiser steps per measurement (the first --warmup are not timed)")
    parser.add_argument("--warmup", type=int, default=1, help="first steps of each measurement not timed (their seconds are printed)")
    parser.add_argument("--shape", choices=sorted(SHAPES), help="train a random-weight model of this size instead of pi_ref "
                        "(the loops and TRL; not the stage)")
    parser.add_argument("--root", type=Path, default=ROOT / "data" / "bench-train", help="run root for the upstream stages")
    parser.add_argument("--rounds", type=int, default=1, help="rounds of all modes, interleaved; medians are printed")
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES), help="measurements to run, in this order")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="where the loops and TRL run (the stage: CUDA when there is one)")
    parser.add_argument("--mixed-precision", choices=("no", "bf16"), default="no", help="train.mixed_precision; bf16 needs an algorithm without a ratio to pi_ref")
    parser.add_argument("--algorithm", default="a_lol", help="train.algorithm of the stage and the loops")
    parser.add_argument("--threads", type=int, default=2, help="torch threads of each measured process")
    parser.add_argument("--lora-rank", type=int, help="train.lora_rank: LoRA adapters (peft) in the stage and the loops; TRL trains every weight")
    parser.add_argument("--lora-dropout", type=float, help="train.lora_dropout (default 0; above 0 the ratio algorithms "
                        "take their weights from a second, dropout-free forward)")
    parser.add_argument("--allocators", nargs="+", choices=("mimalloc", "system"), default=["mimalloc"],
                        help="memory allocators of the measured processes (pipeline/allocator.py); rows of the second are <mode>/system")
    parser.add_argument("--matmul-size", type=int, default=2048, help="side of the square matmuls of the peak (8192 on a GPU)")
    parser.add_argument("--child", choices=MODES, help=argparse.SUPPRESS)
    parser.add_argument("--inputs", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args, json.loads(args.inputs))
        return
    import torch

    torch.set_num_threads(args.threads)
    if not 0 <= args.warmup < args.steps:
        parser.error(f"--warmup {args.warmup} must be at least 0 and less than --steps {args.steps}")
    if args.shape and "stage" in args.modes:
        parser.error("--shape applies to the loops and TRL; the stage trains pi_ref (leave out --modes stage)")
    from stages.io import StageReader

    cfg = bench_config(args.root, args.steps, args.algorithm, args.mixed_precision, args.lora_rank, args.lora_dropout)
    # Built once here (the upstream stages and a --shape model), so that no measured process builds them.
    folders = {name: output.path for name, output in upstream(cfg).items()}
    params = parameters(model_folder(cfg, {"reference": StageReader(folders["reference"])}, args.shape, args.root))
    precision = "bf16" if args.mixed_precision == "bf16" else "fp32"
    print(f"load average at start: {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores; {args.steps} steps of "
          f"{cfg.train.batch_size} x {cfg.train.grad_accumulation} rows each; {args.algorithm}, {args.device}, "
          f"{precision}, {args.threads} threads, {params / 1e6:.1f} M parameters"
          + (f", LoRA rank {args.lora_rank}" if args.lora_rank else "")
          + (f", random weights of shape {args.shape}" if args.shape else "") + f"; {args.warmup} warm-up step(s) not timed")
    from pipeline.allocator import allocator_environment
    from pipeline.mkl_dispatch import describe

    print(describe(allocator_environment(os.environ)))  # the measured processes' environment
    runs = [(mode, allocator) for mode in args.modes for allocator in args.allocators]
    rounds: dict[str, list[dict]] = {run_name(mode, allocator): [] for mode, allocator in runs}
    peaks = []
    for _ in range(args.rounds):  # interleaved: load that comes and goes hits every mode alike
        for mode, allocator in runs:  # the peak before each process, so that load changes hit it as they hit the runs
            peaks.append(matmul_flops(args.matmul_size, device=args.device, precision=precision))
            rounds[run_name(mode, allocator)].append(measure(mode, allocator, args, folders))
    results = {mode: median_result(runs) for mode, runs in rounds.items()}
    peak = max(peaks)
    print(f"{precision} matmul ({args.matmul_size}^2): {peak / 1e9:.1f} GFLOP/s peak (before each run: "
          f"{[round(f / 1e9, 1) for f in peaks]})")
    print(f"{'run':>17} {'tokens/s':>9} {'tokens/CPU s':>13} {'timed tokens':>13} {'peak RSS MB':>12} {'% of peak':>10} "
          f"{'wall s':>7} {'CPU s':>7} {'warm-up s':>10}")
    for mode, r in results.items():
        share = 100 * 6 * params * (r["positions_per_s"] or r["tokens_per_s"]) / peak
        per_cpu = "-" if r["tokens_per_cpu_s"] is None else f"{r['tokens_per_cpu_s']:.1f}"
        cpu = "-" if r["cpu_seconds"] is None else f"{r['cpu_seconds']:.1f}"
        print(f"{mode:>17} {r['tokens_per_s']:>9.1f} {per_cpu:>13} {int(r['tokens']):>13} {r['peak_rss_mb']:>12.0f} {share:>9.0f}% "
              f"{r['wall_seconds']:>7.1f} {cpu:>7} {r['warmup_seconds']:>10.1f}")
    print("seconds of each step (warm-up included), by round: "
          + "; ".join(f"{m} {r['step_seconds']}" for m, r in results.items()))
    if args.rounds > 1:
        print("tokens/s by round: " + "; ".join(f"{m} {r['rounds_tokens_per_s']}" for m, r in results.items()))
    print("medians over the rounds; timed steps only (the warm-up excluded); tokens: the rows' prompt and response tokens; "
          "% of peak: 6 x parameters x the positions pi_theta's forwards computed per second (padding included; a prompt "
          "prefix shared by a packed sequence once; the stage: its tokens) over the peak; CPU s: the "
          "process's CPU time over those steps (all its threads; the stage reports none), which other load on the "
          "machine inflates less than wall time")
    if args.lora_rank:
        print("with LoRA the frozen weights get no gradient, so a step does about 4 (not 6) x parameters x tokens: "
              "% of peak overstates the work by about 1.5x (trl-sft trains every weight)")
    ratios = [
        ("tokens/s, stage / nll-loop", "stage", "nll-loop", "tokens_per_s", "(target >= 0.95)"),
        ("tokens/s, alol-loop / nll-loop", "alol-loop", "nll-loop", "tokens_per_s", ""),
        ("tokens/s, alol-loop / trl-sft", "alol-loop", "trl-sft", "tokens_per_s", "(target >= 1.3)"),
        ("tokens/s, stage / trl-sft", "stage", "trl-sft", "tokens_per_s", ""),
        ("peak RSS, alol-loop / ref-loop", "alol-loop", "ref-loop", "peak_rss_mb", "(target <= 0.6)"),
        ("peak RSS, stage / ref-loop", "stage", "ref-loop", "peak_rss_mb", ""),
    ]
    ratios += [("tokens/CPU s, alol-loop / trl-sft", "alol-loop", "trl-sft", "tokens_per_cpu_s", "")]
    ratios += [(f"tokens/s, {mode} / {mode}/system", mode, f"{mode}/system", "tokens_per_s", "") for mode in args.modes]
    ratios += [("tokens/s, alol-loop / trl-sft/system", "alol-loop", "trl-sft/system", "tokens_per_s", "(TRL as a plain process runs)"),
               ("tokens/s, alol-loop/system / trl-sft/system", "alol-loop/system", "trl-sft/system", "tokens_per_s", "")]
    for label, a, b, key, target in ratios:
        if a in results and b in results:
            print(f"{label + ':':<46} {results[a][key] / results[b][key]:.3f} {target}")


if __name__ == "__main__":
    main()
