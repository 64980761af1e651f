"""Object storage cost: ingest and advantage on 1M rows with the run root local and on an S3 server.

One run measures both: the local run root is the baseline, the other is a bucket on moto's S3 server
(started here on 127.0.0.1 at a free port, as the tests do: tests/support/s3.py). Each stage runs
through pipeline.runner.execute_stage as in a pipeline, from a cold local cache (a worker that has
nothing yet): for advantage that includes verifying (and, on S3, downloading) the score and reference
outputs, and for both the commit (on S3: the upload, manifest last). Printed per stage and root:
rows/s, the ratio S3 / local, the bytes the process read (read_chars of /proc/self/io: files and
sockets) and the bytes downloaded from the store. This process's CPU seconds are printed too: on a
busy machine they say more than wall seconds (moto's own CPU is not in them).

    .venv/bin/python bench/storage.py [--rows 1000000]

moto keeps objects in its own process's memory: the figures show alol's cost of the store (hashing,
HTTP, the local mirror), not a real network's.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import psutil  # noqa: E402

from bench.advantage import generate  # noqa: E402
from bench.ingest import write_rows  # noqa: E402
from pipeline import runner  # noqa: E402
from schemas.config import load_config  # noqa: E402
from stages import fs, remote  # noqa: E402
from stages.io import MANIFEST, StageReader  # noqa: E402
from tests.support.s3 import CREDENTIALS, moto_server  # noqa: E402


def read_chars() -> int:
    return psutil.Process().io_counters().read_chars


def upload_output(local: Path, url: str) -> None:
    """Commit an existing local output folder to the store as a writer would (manifest last)."""
    manifest = StageReader(local, verify=False).manifest
    files = [remote.FileEntry(f.path, f.bytes, f.sha256) for f in manifest.outputs]
    remote.upload_folder(local, url, files, MANIFEST)


class CountingReader(StageReader):
    """A StageReader that adds the bytes it downloaded from the store to a class-wide total."""

    downloaded = 0

    def _materialise(self) -> None:
        super()._materialise()
        CountingReader.downloaded += self.bytes_downloaded


def measure(cfg, stage: str, inputs: dict, local_cache: Path) -> dict[str, float]:
    shutil.rmtree(local_cache, ignore_errors=True)
    os.environ[fs.LOCAL_CACHE_VARIABLE] = str(local_cache)
    CountingReader.downloaded = 0
    before = read_chars()
    start, cpu_start = time.perf_counter(), time.process_time()
    output, reused = runner.execute_stage(cfg, stage, inputs, refresh=True)
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    assert not reused
    return {"seconds": seconds, "cpu_seconds": cpu_seconds, "read_bytes": read_chars() - before, "downloaded": CountingReader.downloaded,
            "rows": output.rows[stage], "content_hash": output.content_hash}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1_000_000)
    args = parser.parse_args()
    runner.StageReader = CountingReader  # count what execute_stage's readers download
    for stage in ("ingest", "advantage"):
        runner.load_stage_function(stage)  # imports out of the first measurement
    print(f"load average at start: {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores (wall seconds suffer from other load)")
    with tempfile.TemporaryDirectory(prefix="alol-bench-storage-") as tmp_name:
        tmp = Path(tmp_name)
        data = tmp / "rows.jsonl"
        write_rows(data, args.rows)
        upstream = tmp / "upstream"
        generate(upstream, args.rows)  # committed score and reference outputs, args.rows rows each
        with moto_server(tmp / "moto.log") as endpoint:
            os.environ.update({**CREDENTIALS, "AWS_ENDPOINT_URL": endpoint})
            bucket = f"alol-bench-{uuid.uuid4().hex[:8]}"
            fs.filesystem(f"s3://{bucket}")[0].mkdir(bucket)
            roots = {"local": str(tmp / "runs"), "s3": f"s3://{bucket}/runs"}
            results: dict[tuple[str, str], dict[str, float]] = {}
            for name, root in roots.items():
                cfg = load_config("smoke", overrides={
                    "run.root": root, "run.name": "bench", "run.cache_dir": str(tmp / "cache"),
                    "data.source": "file", "data.path": str(data), "data.max_rows_per_split": None,
                })
                results[("ingest", name)] = measure(cfg, "ingest", {}, tmp / f"local-cache-{name}")
                inputs = {}
                for stage in ("score", "reference"):
                    location = fs.join(fs.location(root), "upstream", stage)
                    if name == "s3":
                        upload_output(upstream / stage, location)
                    else:
                        shutil.copytree(upstream / stage, location)
                    inputs[stage] = StageReader(location, verify=False).output()
                results[("advantage", name)] = measure(cfg, "advantage", inputs, tmp / f"local-cache-{name}")
    print(f"{'stage':>9} {'root':>5} {'rows':>10} {'wall s':>7} {'CPU s':>6} {'rows/s':>10} {'rows/s / local':>14} "
          f"{'CPU s / local':>13} {'read MB':>8} {'downloaded MB':>13}")
    for stage in ("ingest", "advantage"):
        local = results[(stage, "local")]
        for name in roots:
            m = results[(stage, name)]
            print(
                f"{stage:>9} {name:>5} {m['rows']:>10,} {m['seconds']:>7.2f} {m['cpu_seconds']:>6.1f} {m['rows'] / m['seconds']:>10,.0f} "
                f"{local['seconds'] / m['seconds']:>14.2f} {m['cpu_seconds'] / local['cpu_seconds']:>13.2f} "
                f"{m['read_bytes'] / 1e6:>8.1f} {m['downloaded'] / 1e6:>13.1f}"
            )
        same = results[(stage, "local")]["content_hash"] == results[(stage, "s3")]["content_hash"]
        print(f"{stage:>9} content hash local == s3: {same}")


if __name__ == "__main__":
    main()
