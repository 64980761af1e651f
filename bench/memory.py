"""Peak memory of a benchmark child process, shared by the benchmarks under bench/."""

from __future__ import annotations

from pathlib import Path


def peak_rss_mb() -> float:
    """This process's peak resident set (VmHWM). Not ru_maxrss: a child started by fork/vfork + exec keeps
    the parent's high-water mark there, and the parent built the inputs."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status (Linux only)")
