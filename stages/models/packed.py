"""Linear layers through MKL's packed GEMM, for inference on the CPU.

A decode step multiplies a handful of rows (the decoding slots) by every weight matrix of the model.
MKL's plain sgemm lays out panels of the weight matrix inside every such call; with the matrix packed
once ahead (MKL's `sgemm_pack`, what torch.compile's CPU backend does to frozen weights) each call
reads the packed copy as is. On SmolLM2-135M with 8 slots on 2 cores a decode step goes from about
57 to 42 ms (bench/decode.py measures it against transformers' `generate`); long forwards (hundreds
of rows, as the log-prob passes run) gain little, so only decoding packs.

The packed copies take about twice the weights' memory while the block runs, and they do not follow
weight updates: the block runs without gradients and nothing in it may change a weight.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from typing import Any

import torch


@functools.cache
def mkl_packing_available() -> bool:
    """torch was built with MKL and has the packed-GEMM linear ops (checked once per process)."""
    if not torch.backends.mkl.is_available():
        return False
    try:
        torch.ops.mkl._mkl_reorder_linear_weight
        torch.ops.mkl._mkl_linear
    except (AttributeError, RuntimeError):
        return False
    return True


def _packed_forward(packed: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, rows: int, x: torch.Tensor) -> torch.Tensor:
    # Under CPU autocast (train.mixed_precision bf16 runs the model's forward in it, validation decoding
    # included) the layer computes as autocast computes a linear layer; the packed op is fp32 only.
    if torch.is_autocast_enabled("cpu") or x.dtype != weight.dtype:
        return torch.nn.functional.linear(x, weight, bias)
    return torch.ops.mkl._mkl_linear(x, packed, weight, bias, rows)


@contextlib.contextmanager
def packed_linears(model: Any, rows: int) -> Iterator[int]:
    """While the block runs, every float32 `torch.nn.Linear` of `model` held on the CPU multiplies through
    a copy of its weight packed once for MKL's GEMM, tuned for inputs of `rows` rows (the decoding slots;
    other row counts are computed correctly too). Yields how many layers were packed: none when torch
    lacks MKL, the model is elsewhere or in another precision. Under CPU autocast the layers compute as
    they would unpacked (autocast's precision), since the packed op is fp32 only. Results equal the plain layers' up to
    float rounding (the summation order differs).

    Gradients must be off (the packed copy neither follows weight updates nor carries gradients); the
    layers get their own forward back when the block ends, also on an exception."""
    if torch.is_grad_enabled():
        raise RuntimeError("packed_linears: gradients are enabled; packed weights are for inference only (use torch.no_grad())")
    linears = []
    if mkl_packing_available():
        linears = [
            m for m in model.modules()
            if type(m) is torch.nn.Linear and m.weight.device.type == "cpu" and m.weight.dtype == torch.float32
        ]
    try:
        for m in linears:
            packed = torch.ops.mkl._mkl_reorder_linear_weight(m.weight, rows)
            m.forward = functools.partial(_packed_forward, packed, m.weight, m.bias, rows)
        yield len(linears)
    finally:
        for m in linears:
            m.__dict__.pop("forward", None)
