"""Benchmark of greedy decoding on SmolLM2-135M-Instruct, with its baseline in the same run.

- ours: `stages.models.generate.generate` (`greedy_decode`: continuous batching over length-sorted
  prompts, keys and values in preallocated per-slot buffers written in place, logits at the last
  position only, no per-step processors; on the CPU the linear layers' weights packed once for MKL's
  GEMM, stages.models.packed);
- baseline: transformers' `generate(do_sample=False)` with default settings on the same batches
  (the same prompts, length-sorted, left-padded, the same batch size).

Prompts are the default profile's validation prompts (chatterbot), as for the value targets. The two
are interleaved over `--rounds` rounds; medians of tokens/s are printed (tokens = new tokens up to
and including each row's EOS), with the speed-up (target >= 1.5x) and whether every output is the
same (it must be).

Both sides run in one process, under alol's memory allocator as the `alol` command runs
(pipeline/allocator.py: the script re-executes itself once), and on an AMD CPU with MKL's kernels chosen by the
CPU's features (pipeline/mkl_dispatch.py); ALOL_ALLOCATOR=system measures under glibc's malloc,
ALOL_MKL_DISPATCH=vendor under MKL's own kernel choice.

    .venv/bin/python bench/decode.py [--prompts 32] [--batch-size 8] [--max-new-tokens 64] [--rounds 3] [--threads 2]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from pipeline.allocator import exec_with_allocator  # noqa: E402
from pipeline.mkl_dispatch import describe  # noqa: E402
from pipeline.runner import execute_stage  # noqa: E402
from schemas.config import load_config  # noqa: E402
from stages.io import StageReader  # noqa: E402
from stages.models.generate import _left_padded, generate  # noqa: E402
from stages.models.store import SMOLLM2, load_causal_lm, load_tokenizer, resolve_model  # noqa: E402
from stages.models.tokenize import encode_prompt  # noqa: E402


def validation_prompts(count: int) -> list:
    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_config("default", overrides={"run.root": tmp, "data.max_rows_per_split": None})
        ingest, _ = execute_stage(cfg, "ingest", {})
        table = StageReader(ingest.path).read("ingest", columns=["prompt", "split"]).to_pylist()
    prompts = []
    for row in table:
        if row["split"] == "validation" and row["prompt"] not in prompts:
            prompts.append(row["prompt"])
    return prompts[:count]


def transformers_generate(model, tokenizer, prompts, max_prompt_tokens, max_new_tokens, batch_size) -> list[str]:
    """The baseline: the batches `generate` makes, decoded by transformers' own `generate`."""
    from transformers import GenerationConfig

    config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id,
                              eos_token_id=tokenizer.eos_token_id)
    encoded = [encode_prompt(tokenizer, p, max_prompt_tokens) for p in prompts]
    order = sorted(range(len(encoded)), key=lambda i: (-len(encoded[i]), i))
    texts = [""] * len(encoded)
    with torch.no_grad():
        for start in range(0, len(order), batch_size):
            batch = order[start : start + batch_size]
            ids, mask = _left_padded([encoded[i] for i in batch], tokenizer.pad_token_id, model.device)
            output = model.generate(input_ids=ids, attention_mask=mask, generation_config=config)
            for i, text in zip(batch, tokenizer.batch_decode(output[:, ids.shape[1] :], skip_special_tokens=True)):
                texts[i] = text.strip()
    return texts


def new_tokens(tokenizer, texts: list[str]) -> int:
    """Tokens decoded, counted the same way for both sides: the text's tokens plus the EOS."""
    return sum(len(tokenizer(t, add_special_tokens=False)["input_ids"]) + 1 for t in texts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-prompt-tokens", type=int, default=128)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--cache-dir", default=str(ROOT / "data" / "cache"))
    args = parser.parse_args()
    exec_with_allocator()  # after parsing: --help and argument errors need no second interpreter
    torch.set_num_threads(args.threads)

    path = resolve_model(SMOLLM2, args.cache_dir)
    model, tokenizer = load_causal_lm(path), load_tokenizer(path)
    prompts = validation_prompts(args.prompts)
    settings = {"max_prompt_tokens": args.max_prompt_tokens, "max_new_tokens": args.max_new_tokens, "batch_size": args.batch_size}
    generate(model, tokenizer, prompts[:2], **{**settings, "max_new_tokens": 4})  # warm-up
    sides = {
        "ours": lambda: generate(model, tokenizer, prompts, **settings),
        "transformers generate": lambda: transformers_generate(model, tokenizer, prompts, **settings),
    }
    seconds: dict[str, list[float]] = {name: [] for name in sides}
    outputs: dict[str, list[str]] = {}
    for _ in range(args.rounds):
        for name, run in sides.items():
            started = time.perf_counter()
            outputs[name] = run()
            seconds[name].append(time.perf_counter() - started)
    same = outputs["ours"] == outputs["transformers generate"]
    tokens = {name: new_tokens(tokenizer, texts) for name, texts in outputs.items()}
    rates = {name: statistics.median(tokens[name] / s for s in seconds[name]) for name in sides}
    print(f"SmolLM2-135M-Instruct, fp32, {args.threads} threads, {len(prompts)} validation prompts, batch size "
          f"{args.batch_size}, at most {args.max_new_tokens} new tokens, medians of {args.rounds} interleaved rounds")
    print(describe())
    for name in sides:
        print(f"{name:>22}: {rates[name]:7.1f} tokens/s ({tokens[name]} tokens, median {statistics.median(seconds[name]):.1f} s)")
    print(f"speed-up: {rates['ours'] / rates['transformers generate']:.2f}x (target >= 1.5x); identical outputs: {same}")
    if not same:
        differ = [i for i, (a, b) in enumerate(zip(outputs["ours"], outputs["transformers generate"])) if a != b]
        print(f"outputs differ at prompts {differ}")


if __name__ == "__main__":
    main()
