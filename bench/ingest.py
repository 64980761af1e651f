"""Ingest throughput and memory: 100k and 1M generated JSONL rows, each ingested in a fresh subprocess.

Prints rows/s and the child's peak RSS for each size, the peak RSS of a child that only imports the stage
(the fixed cost), and the ratio peak RSS(1M) / peak RSS(100k), which should stay at or below 2: the stage
streams record batches, so memory must not grow with the input beyond 16 bytes per accepted id.

    .venv/bin/python bench/ingest.py [--sizes 100000 1000000] [--batch-rows 8192] [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WORDS = (
    "the a model answer question please help explain why how what water light garden music river code "
    "data number friend morning travel history simple clear short long small large good better best kind "
    "read write learn teach build test check fix run walk think remember city book film song food"
).split()


def sentence(rng: random.Random, low: int, high: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(low, high))).capitalize() + "."


def write_rows(path: Path, n: int, seed: int = 0) -> None:
    """n JSONL rows: text prompts, one in ten a chat prompt, about 1% exact repeats of one of the last
    1,000 rows (so the duplicate check is exercised)."""
    rng = random.Random(seed)
    recent: list[str] = []
    with open(path, "w", encoding="utf-8") as fh:
        for i in range(n):
            if recent and rng.random() < 0.01:
                fh.write(rng.choice(recent))
                continue
            prompt = f"Question {i}: {sentence(rng, 6, 20)}"
            record = {"prompt": prompt, "response": sentence(rng, 10, 40), "tag": i % 7}
            if i % 10 == 0:
                record["prompt"] = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": prompt}]
            line = json.dumps(record) + "\n"
            fh.write(line)
            recent.append(line)
            if len(recent) > 1000:
                recent.pop(0)


def child(path: str | None, out: str, batch_rows: int) -> None:
    """Runs in the subprocess: ingest `path` (or only import the stage when path is None) and print JSON."""
    from stages.io import StageWriter
    from schemas.config import AlolConfig
    from schemas.ingest import DataConfig
    from stages.ingest import run

    if path is None:
        print(json.dumps({"rows_in": 0, "seconds": 0.0}))
        return
    cfg = AlolConfig(data=DataConfig(source="file", path=path, batch_rows=batch_rows))
    writer = StageWriter(Path(out) / "ingest")
    start = time.perf_counter()
    result = run(cfg, {}, writer)
    seconds = time.perf_counter() - start
    print(json.dumps({"rows_in": result.rows_in, "rows_out": result.rows_out,
                      "rows_rejected": result.rows_rejected, "seconds": seconds}))


def measure(path: Path | None, workdir: Path, batch_rows: int) -> dict:
    """Run one child; peak RSS comes from wait4's rusage of that child alone (ru_maxrss is KiB on Linux)."""
    out = Path(tempfile.mkdtemp(dir=workdir, prefix="out-"))
    report = out / "report.json"
    command = [sys.executable, __file__, "--child", str(path) if path else "-", "--out", str(out),
               "--batch-rows", str(batch_rows)]
    with open(report, "w") as stdout:
        process = subprocess.Popen(command, cwd=ROOT, stdout=stdout, env={**os.environ, "PYTHONPATH": str(ROOT)})
        _, status, usage = os.wait4(process.pid, 0)
        process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode != 0:
        raise SystemExit(f"bench child failed ({process.returncode}): {' '.join(command)}")
    figures = json.loads(report.read_text().strip().splitlines()[-1])
    figures["peak_rss_mib"] = usage.ru_maxrss / 1024
    shutil.rmtree(out, ignore_errors=True)
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--batch-rows", type=int, default=8192)
    parser.add_argument("--keep", type=Path, help="write the generated files here and keep them")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(None if args.child == "-" else args.child, args.out, args.batch_rows)
        return
    workdir = args.keep or Path(tempfile.mkdtemp(prefix="alol-bench-ingest-"))
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        baseline = measure(None, workdir, args.batch_rows)
        print(f"import only: peak RSS {baseline['peak_rss_mib']:.0f} MiB")
        results = {}
        for n in args.sizes:
            path = workdir / f"rows_{n}.jsonl"
            start = time.perf_counter()
            write_rows(path, n)
            generated = time.perf_counter() - start
            figures = measure(path, workdir, args.batch_rows)
            results[n] = figures
            print(
                f"{n:>9,} rows ({path.stat().st_size / 2**20:.0f} MiB, generated in {generated:.1f} s): "
                f"{figures['rows_in'] / figures['seconds']:,.0f} rows/s ({figures['seconds']:.1f} s), "
                f"peak RSS {figures['peak_rss_mib']:.0f} MiB, out {figures['rows_out']:,}, "
                f"rejected {figures['rows_rejected']:,}"
            )
            if not args.keep:
                path.unlink()
        if len(args.sizes) >= 2:
            small, large = min(args.sizes), max(args.sizes)
            ratio = results[large]["peak_rss_mib"] / results[small]["peak_rss_mib"]
            verdict = "ok" if ratio <= 2 else "ABOVE TARGET"
            print(f"peak RSS ratio {large:,} / {small:,} rows: {ratio:.2f} (target <= 2: {verdict})")
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
