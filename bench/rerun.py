"""Benchmark of a warm rerun: the cold run of a profile on a fresh run root (the model cache warm),
then warm reruns, all in this one run, and where the warm seconds go.

- cold: `alol run --profile P` on an empty run root (converted models and score caches in
  run.cache_dir are reused, as after `make setup`), and its `alol status` (seconds per stage);
- warm: the same command again: every stage cached, recorded without Prefect (pipeline/cached_run.py);
- warm through the flow: `run_alol` on the same run (what a warm rerun cost before: Prefect's
  temporary server, the flow, its cached tasks), for comparison;
- where the warm seconds go: interpreter start, imports of the CLI's path, the config, the stage
  checks (cache keys, re-hashing every output file) and writing run.json.

Target: warm <= 10 s and <= 3% of the cold run. Warm runs are repeated `--rounds` times (medians).

    .venv/bin/python bench/rerun.py [--profile default] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}

BREAKDOWN = """
import json, sys, time
t0 = time.perf_counter()
from pipeline import cli, cached_run, preflight
from schemas.config import load_config
t1 = time.perf_counter()
cfg = load_config(sys.argv[1], overrides={"run.root": sys.argv[2]})
t2 = time.perf_counter()
assert cached_run.all_cached(cfg, before_recording=preflight.check_writable) is not None, "not every stage is cached"
t3 = time.perf_counter()
print(json.dumps({"imports": t1 - t0, "config": t2 - t1, "stage checks and run.json": t3 - t2}))
"""

THROUGH_FLOW = """
import sys
from pipeline.flow import run_alol
from schemas.config import load_config
run_alol(load_config(sys.argv[1], overrides={"run.root": sys.argv[2]}))
"""


def timed(args: list[str]) -> tuple[float, str]:
    started = time.perf_counter()
    done = subprocess.run(args, cwd=ROOT, env=ENV, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(args)} failed:\n{done.stderr[-3000:]}")
    return seconds, done.stdout


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--profile", default="default")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="alol-bench-rerun-") as root:
        command = [sys.executable, "-m", "pipeline.cli", "run", "--profile", args.profile, "--set", f"run.root={root}"]
        cold, _ = timed(command)
        status = [sys.executable, "-m", "pipeline.cli", "status", "--profile", args.profile, "--set", f"run.root={root}"]
        print(f"cold run, {cold:.1f} s in all:\n{timed(status)[1]}", flush=True)
        warm, flow, parts = [], [], []
        interpreter, _ = timed([sys.executable, "-c", "pass"])
        for _ in range(args.rounds):
            warm.append(timed(command)[0])
            flow.append(timed([sys.executable, "-c", THROUGH_FLOW, args.profile, root])[0])
            parts.append(json.loads(timed([sys.executable, "-c", BREAKDOWN, args.profile, root])[1].strip().splitlines()[-1]))
    w, f = statistics.median(warm), statistics.median(flow)
    print(f"profile {args.profile}: cold {cold:.1f} s; warm {w:.2f} s ({100 * w / cold:.2f}% of cold; target <= 10 s and <= 3%)")
    print(f"warm through the Prefect flow (before): {f:.2f} s; warm speed-up {f / w:.1f}x  (medians of {args.rounds} rounds)")
    print(f"where the warm seconds go: interpreter start {interpreter:.2f} s, " + ", ".join(
        f"{name} {statistics.median(p[name] for p in parts):.2f} s" for name in parts[0]))
    print(f"load average: {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores")


if __name__ == "__main__":
    main()
