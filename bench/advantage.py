"""Benchmark of the advantage stage on generated score and reference tables (1M and 10M rows).

Each measurement runs in a fresh subprocess so its peak RSS is its own. The baseline, measured in
the same run, is the obvious in-memory version: read both tables into Arrow, `Table.join`, compute
the columns with pyarrow.compute and write one Parquet file. `--rounds` repeats every run, the kinds
interleaved (baseline, stage, baseline, stage, ...), and prints medians, so a burst of other load
hits both sides alike. Target: the stage at 10M rows within 5 s wall on 2 idle cores.

    .venv/bin/python bench/advantage.py            # 1M and 10M rows, 3 rounds
    .venv/bin/python bench/advantage.py --rows 1000000 --rounds 5
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
sys.path.insert(0, str(ROOT))

import duckdb  # noqa: E402
import pyarrow as pa  # noqa: E402

from bench.memory import peak_rss_mb  # noqa: E402
from stages.io import StageReader, StageWriter  # noqa: E402
from schemas.manifest import StageResult  # noqa: E402
from schemas.reference import REFERENCE_SCHEMA  # noqa: E402
from tests.support.outputs import metrics as neutral_metrics  # noqa: E402  (a hand-built output's valid metrics)


SCHEMAS = {
    "score": pa.schema([("id", pa.string()), ("safety", pa.float64()), ("sentiment", pa.float64()), ("reward", pa.float64())]),
    "reference": REFERENCE_SCHEMA,
}


def generate(folder: Path, rows: int) -> None:
    """Score and reference stage outputs with `rows` rows each (ids as 32 hex characters, like ingest's),
    9 in 10 rows in the train split, the reference table in a different order than the score table."""
    con = duckdb.connect(config={"threads": 2, "preserve_insertion_order": False})
    for stage in ("score", "reference"):
        writer = StageWriter(folder / stage)
        part = writer.external_table(stage, SCHEMAS[stage]) / "part-00000.parquet"
        if stage == "score":
            select = f"""SELECT md5(i::VARCHAR) AS id, random() AS safety, random() AS sentiment,
                         random() * 2 AS reward FROM range({rows}) t(i)"""
        else:
            select = f"""SELECT md5(i::VARCHAR) AS id, CASE WHEN i % 10 = 0 THEN 'validation' ELSE 'train' END AS split,
                         NULL::VARCHAR AS preference,
                         -20 * random() AS ref_logprob, [-1.5, -0.5, -2.0]::FLOAT[] AS ref_token_logprobs,
                         3::INTEGER AS response_tokens, false AS response_truncated,
                         md5(i::VARCHAR)[:16] AS token_hash, 2 * random() AS value
                         FROM range({rows}) t(i) ORDER BY hash(i)"""
        con.execute(f"COPY ({select}) TO '{part}' (FORMAT parquet, COMPRESSION zstd)")
        result = StageResult(rows_in=rows, rows_out=rows, metrics=neutral_metrics(stage))
        writer.commit(stage=stage, cache_key=stage * 8, result=result,
                      config_fingerprints={}, config={}, inputs={}, code_version="bench", versions={})


def run_stage(folder: Path, memory_limit: str) -> None:
    from schemas.config import AlolConfig
    from stages import advantage

    inputs = {s: StageReader(folder / s, verify=False) for s in ("score", "reference")}
    out = StageWriter(folder / "advantage")
    try:
        result = advantage.run(AlolConfig.model_validate({"advantage": {"memory_limit": memory_limit}}), inputs, out)
    finally:
        out.abort()
    assert result.rows_out > 0


def run_pyarrow(folder: Path) -> None:
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    score = pq.read_table(folder / "score" / "score", columns=["id", "reward"])
    reference = pq.read_table(folder / "reference" / "reference", columns=["id", "split", "value"])
    reference = reference.filter(pc.equal(reference["split"], "train"))
    joined = reference.join(score, "id", join_type="left outer")
    a = pc.subtract(joined["reward"], joined["value"])
    joined = joined.append_column("advantage", a).append_column("positive", pc.greater(a, 0))
    joined = joined.append_column("weight_advantage", pc.max_element_wise(a, 0.0))
    joined = joined.append_column("weight_reward", pc.max_element_wise(joined["reward"], 0.0))
    with tempfile.TemporaryDirectory() as tmp:
        pq.write_table(joined, Path(tmp) / "advantage.parquet", compression="zstd")


def child(kind: str, folder: Path) -> None:
    start, cpu_start = time.perf_counter(), time.process_time()
    if kind == "pyarrow":
        run_pyarrow(folder)
    else:
        run_stage(folder, memory_limit=kind.removeprefix("stage-"))
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    peak_mb = peak_rss_mb()
    print(json.dumps({"seconds": seconds, "cpu_seconds": cpu_seconds, "peak_rss_mb": peak_mb}))


def measure(kind: str, folder: Path) -> dict[str, float]:
    """`kind`: `pyarrow`, or `stage-<memory limit>` (the advantage stage with that `advantage.memory_limit`)."""
    done = subprocess.run(
        [sys.executable, __file__, "--child", kind, str(folder)], check=True, capture_output=True, text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, nargs="+", default=[1_000_000, 10_000_000])
    parser.add_argument("--rounds", type=int, default=3, help="interleaved repetitions of every run (medians printed)")
    parser.add_argument("--child", nargs=2, metavar=("KIND", "FOLDER"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child[0], Path(args.child[1]))
        return
    print(f"load average at start: {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores (wall seconds suffer from other load; CPU seconds less)")
    print(f"{'rows':>11} {'run':>22} {'wall s':>7} {'CPU s':>6} {'peak RSS MB':>12} {'wall / pyarrow':>15} {'RSS / pyarrow':>14}")
    for rows in args.rows:
        kinds = {"pyarrow in memory": "pyarrow", "stage (limit 2GB)": "stage-2GB"}
        if rows >= 10_000_000:
            kinds["stage (limit 512MB)"] = "stage-512MB"
        samples: dict[str, list[dict[str, float]]] = {name: [] for name in kinds}
        with tempfile.TemporaryDirectory(prefix="alol-bench-advantage-") as tmp:
            generate(Path(tmp), rows)
            for _ in range(args.rounds):
                for name, kind in kinds.items():
                    samples[name].append(measure(kind, Path(tmp)))
        runs = {name: {key: statistics.median(m[key] for m in ms) for key in ms[0]} for name, ms in samples.items()}
        baseline = runs["pyarrow in memory"]
        for name, m in runs.items():
            print(
                f"{rows:>11,} {name:>22} {m['seconds']:>7.2f} {m['cpu_seconds']:>6.2f} {m['peak_rss_mb']:>12.0f} "
                f"{m['seconds'] / baseline['seconds']:>15.2f} {m['peak_rss_mb'] / baseline['peak_rss_mb']:>14.2f}",
                flush=True,
            )
    print(f"load average at end: {os.getloadavg()[0]:.2f} (medians of {args.rounds} interleaved rounds)")

if __name__ == "__main__":
    main()
