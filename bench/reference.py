"""Benchmark of the reference log-prob pass on SmolLM2-135M-Instruct, with its baseline in the same run.

- batched: `stages.reference.reference_logprobs` (rows sorted by length, batches under a token budget,
  packed, the chat template's prompt prefix once per packed sequence, logits only at the response positions,
  no grad), as the reference stage runs it;
- baseline: the naive loop, one row at a time: full forward, log_softmax over every position, gather;
- the machine's matmul FLOP/s in the same precision, measured with torch (bench.matmul: best of several square
  matmuls).

Prints tokens/s of both (the rows' prompt and response tokens), the speed-up (target >= 4x), the agreement of the
two, and the share of the matmul peak the batched pass reaches, counting 2 x parameters x the positions its forwards
computed (padding included, a shared prompt prefix once per packed sequence): how well the work done uses the
machine, where tokens/s says how fast rows get their log-probs.
Rows are chatterbot prompt/response pairs, tokenised as the default profile does.

The three measurements are interleaved over `--rounds` rounds and medians are reported, so that
load from other processes on a shared machine hits all of them alike; the peak is the best matmul
rate of any round, and the share is also given against the matmul rate of the same round.

Both sides run in one process, under alol's memory allocator as the `alol` command runs
(pipeline/allocator.py: the script re-executes itself once), and on an AMD CPU with MKL's kernels chosen by the
CPU's features (pipeline/mkl_dispatch.py); ALOL_ALLOCATOR=system measures under glibc's malloc,
ALOL_MKL_DISPATCH=vendor under MKL's own kernel choice.

    .venv/bin/python bench/reference.py [--rows 64] [--naive-rows 32] [--rounds 3] [--threads 2] [--token-budget 4096]
                                [--device cpu|cuda] [--precision fp32|bf16]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from bench.matmul import DTYPES, count_positions, matmul_flops  # noqa: E402
from pipeline.allocator import exec_with_allocator  # noqa: E402
from pipeline.mkl_dispatch import describe  # noqa: E402
from pipeline.runner import execute_stage  # noqa: E402
from stages.io import StageReader  # noqa: E402
from schemas.config import load_config  # noqa: E402
from stages.models.store import SMOLLM2, load_causal_lm, load_tokenizer, resolve_model  # noqa: E402
from stages.models.tokenize import encode_pair, template_prefix  # noqa: E402
from stages.reference import reference_logprobs  # noqa: E402


def chatterbot_pairs(rows: int, max_prompt: int, max_response: int, tokenizer) -> tuple[list[list[int]], list[list[int]]]:
    """The first `rows` train rows of the default profile's ingest output, encoded."""
    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_config("default", overrides={"run.root": tmp, "data.max_rows_per_split": None})
        ingest, _ = execute_stage(cfg, "ingest", {})
        table = StageReader(ingest.path).read("ingest", columns=["prompt", "response", "split"]).to_pylist()
    pairs = [encode_pair(tokenizer, r["prompt"], r["response"], max_prompt, max_response) for r in table if r["split"] == "train"]
    return [p for p, _ in pairs[:rows]], [r for _, r in pairs[:rows]]


def naive_logprobs(model, prompt_ids, response_ids) -> tuple[list[np.ndarray], float]:
    """One row at a time: logits at every position, log_softmax over the vocabulary, pick the response tokens."""
    started = time.perf_counter()
    rows = []
    with torch.inference_mode():
        for prompt, response in zip(prompt_ids, response_ids):
            ids = torch.tensor([prompt + response], device=model.device)
            logp = torch.log_softmax(model(input_ids=ids).logits[0].float(), dim=-1)
            positions = torch.arange(len(prompt) - 1, len(prompt) + len(response) - 1)
            rows.append(logp[positions, ids[0, positions + 1]].cpu().numpy())
    return rows, time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=64, help="rows in the batched pass")
    parser.add_argument("--naive-rows", type=int, default=32, help="rows in the one-at-a-time loop (the first of them)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--token-budget", type=int, default=4096)
    parser.add_argument("--max-prompt-tokens", type=int, default=128)
    parser.add_argument("--max-response-tokens", type=int, default=48)
    parser.add_argument("--cache-dir", default=str(ROOT / "data" / "cache"))
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--precision", choices=tuple(DTYPES), default="fp32", help="weights' dtype, and the matmul peak's")
    parser.add_argument("--matmul-size", type=int, default=2048, help="side of the square matmuls of the peak (8192 on a GPU)")
    args = parser.parse_args()
    exec_with_allocator()  # after parsing: --help and argument errors need no second interpreter
    torch.set_num_threads(args.threads)

    path = resolve_model(SMOLLM2, args.cache_dir)
    model = load_causal_lm(path, dtype=getattr(torch, DTYPES[args.precision])).to(args.device)
    tokenizer = load_tokenizer(path)
    params = sum(p.numel() for p in model.parameters())
    prompts, responses = chatterbot_pairs(args.rows, args.max_prompt_tokens, args.max_response_tokens, tokenizer)
    tokens = [len(p) + len(r) for p, r in zip(prompts, responses)]
    n = min(args.naive_rows, len(prompts))
    prefix = template_prefix(tokenizer)
    reference_logprobs(model, prompts[:4], responses[:4], args.token_budget, progress=False, shared_prefix=prefix)  # warm-up
    positions = count_positions(model)

    batched_tps, batched_pps, naive_tps, matmul, diff = [], [], [], [], 0.0
    for _ in range(args.rounds):
        matmul.append(matmul_flops(args.matmul_size, device=args.device, precision=args.precision))
        before = positions[0]
        batched = reference_logprobs(model, prompts, responses, args.token_budget, progress=False, shared_prefix=prefix)
        batched_pps.append((positions[0] - before) / batched.seconds)
        naive, naive_seconds = naive_logprobs(model, prompts[:n], responses[:n])
        batched_tps.append(batched.tokens / batched.seconds)
        naive_tps.append(sum(tokens[:n]) / naive_seconds)
        diff = max([diff] + [float(np.abs(b - a).max()) for a, b in zip(naive, batched.token_logprobs[:n])])
    batched_tps, naive_tps, matmul = np.array(batched_tps), np.array(naive_tps), np.array(matmul)
    achieved = 2 * params * np.array(batched_pps)
    peak = matmul.max()

    print(f"SmolLM2-135M-Instruct, {params / 1e6:.1f} M parameters, {args.threads} threads, {args.precision}, {args.device}, {args.rounds} rounds")
    print(describe())
    print(f"rows: {len(prompts)} ({sum(tokens)} prompt+response tokens, mean {np.mean(tokens):.1f}); token budget {args.token_budget}; "
          f"prompt prefix of {len(prefix)} tokens computed once per packed sequence")
    print(f"batched log-prob pass:  {np.median(batched_tps):8.1f} tokens/s  (rounds: {np.round(batched_tps, 1).tolist()})")
    print(f"naive one-row loop:     {np.median(naive_tps):8.1f} tokens/s  (rounds: {np.round(naive_tps, 1).tolist()}, {n} rows)")
    print(f"speed-up:               {np.median(batched_tps / naive_tps):8.2f} x  (median of rounds; target >= 4x)")
    print(f"max |batched - naive| log-prob: {diff:.2e}")
    print(f"{args.precision} matmul ({args.matmul_size}^2): {peak / 1e9:8.1f} GFLOP/s peak  (rounds: {np.round(matmul / 1e9, 1).tolist()})")
    print(
        f"batched pass:           {np.median(achieved) / 1e9:8.1f} GFLOP/s (2 x params x positions computed/s) = "
        f"{100 * np.median(achieved) / peak:.0f}% of peak, {100 * np.median(achieved / matmul):.0f}% of the same round's matmul"
    )


if __name__ == "__main__":
    main()
