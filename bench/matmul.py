"""The machine's measured matmul rate, the peak the benchmarks under bench/ state their FLOP/s as a share of."""

from __future__ import annotations

import time

DTYPES = {"fp32": "float32", "bf16": "bfloat16"}


def matmul_flops(size: int = 2048, seconds: float = 1.5, device: str = "cpu", precision: str = "fp32") -> float:
    """Best FLOP/s of `size` x `size` matmuls in `precision` on `device` over about `seconds` (2 n^3 FLOPs each).
    On CUDA each timed matmul is synchronised; fp32 there is strict fp32 (TF32 off), as the models run."""
    import torch

    dtype = getattr(torch, DTYPES[precision])
    a = torch.randn(size, size, device=device).to(dtype)
    b = torch.randn(size, size, device=device).to(dtype)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    a @ b
    sync()
    best, deadline = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        started = time.perf_counter()
        a @ b
        sync()
        best = max(best, 2 * size**3 / (time.perf_counter() - started))
    return best


def count_positions(model) -> list[int]:
    """A one-element list that adds up the positions (padding included) of every forward of `model` from now on:
    the work a share of the matmul peak should count, where a packed or prefix-sharing forward computes fewer
    positions than its rows have tokens."""
    total = [0]
    model.get_input_embeddings().register_forward_hook(lambda _module, args, _out: total.__setitem__(0, total[0] + args[0].numel()))
    return total
