"""The C memory allocator alol's processes run with: mimalloc, told to keep the pages it frees.

A training or SFT step frees and reallocates the same large tensors every micro-batch (SmolLM2's tied
embedding gets a dense 113 MB gradient; logits, activations and their gradients are tens of MB). glibc's
malloc serves every block over 32 MB, and at first every block over 128 kB, from a fresh mmap and unmaps it
on free, so each step faults all those pages in again: on a 2-core AMD EPYC a train benchmark process spent
26 of its 90 CPU seconds in the kernel. mimalloc (the `cmeel-mimalloc` wheel) with `MIMALLOC_PURGE_DELAY=-1` keeps freed
pages for reuse; `bench/train.py --allocators mimalloc system` measures both in one run.

The `alol` command applies it by re-executing itself once with mimalloc in `LD_PRELOAD` (the allocator has
to be there before the interpreter starts), so every process it starts (stage runs, torchrun workers, the
Prefect server and workers of `alol up`, a local Ray cluster) inherits it. `ALOL_ALLOCATOR=system` keeps
the C library's malloc. Elsewhere than Linux, or without the wheel, nothing changes. The same re-execution
preloads, on an AMD CPU, the library that lets MKL choose its kernels by the CPU's features (pipeline.mkl_dispatch).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from importlib import metadata

from pipeline.mkl_dispatch import preload_environment, preloads, with_preloads

VARIABLE = "ALOL_ALLOCATOR"
CHOICES = ("mimalloc", "system")
# Freed pages are never returned to the OS (mimalloc's default returns them after 10 ms, faulting them in again).
MIMALLOC_SETTINGS = {"MIMALLOC_PURGE_DELAY": "-1"}


def mimalloc_library() -> str | None:
    """Path of the libmimalloc.so that the cmeel-mimalloc wheel installed, or None."""
    try:
        files = metadata.files("cmeel-mimalloc") or []
    except metadata.PackageNotFoundError:
        return None
    for file in files:
        if file.name == "libmimalloc.so":
            path = str(file.locate())
            return path if os.path.exists(path) else None
    return None


def allocator_environment(env: Mapping[str, str], allocator: str | None = None) -> dict[str, str]:
    """`env` for a process that runs with `allocator` (default: `ALOL_ALLOCATOR` in `env`, else mimalloc), and
    on an AMD CPU with MKL's code paths chosen by the CPU's features (pipeline.mkl_dispatch.preload_environment).

    mimalloc: its library first in LD_PRELOAD (other preloads kept) and MIMALLOC_SETTINGS unless `env` sets
    them; on a platform other than Linux, or without the wheel, `env` unchanged. system: our library taken
    out of LD_PRELOAD and ALOL_ALLOCATOR=system, so that processes started from it keep the C library's malloc.
    """
    return preload_environment(_with_allocator(env, allocator))


def _with_allocator(env: Mapping[str, str], allocator: str | None) -> dict[str, str]:
    allocator = allocator or env.get(VARIABLE) or "mimalloc"
    if allocator not in CHOICES:
        raise ValueError(f"{VARIABLE}={allocator!r}: expected one of {', '.join(CHOICES)}")
    library = mimalloc_library() if sys.platform == "linux" else None
    others = [p for p in preloads(env) if p != library]
    if allocator == "system":
        return {**with_preloads(env, others), VARIABLE: "system"}
    if library is None:
        return dict(env)
    out = with_preloads(env, [library, *others])
    for name, value in MIMALLOC_SETTINGS.items():
        out.setdefault(name, value)
    return out


def exec_with_allocator() -> None:
    """Re-executes this process (same interpreter and arguments) under `allocator_environment` when its
    environment differs; once, since the re-executed process finds it already in place. A failing exec
    leaves this process running as it is."""
    try:
        env = allocator_environment(os.environ)
    except ValueError as exc:
        print(f"alol: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    if env == dict(os.environ):
        return
    try:
        os.execve(sys.executable, sys.orig_argv, env)
    except OSError:
        return
