"""Stage I/O (stages/io.py): atomic commit, manifest with hashes, verification on read, streaming parts,
typed metrics through the manifest, nothing left by an aborted or killed writer."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pyarrow as pa
import pytest

from schemas.advantage import AdvantageMetrics
from schemas.manifest import StageResult
from stages.io import UNOWNED_STALE_SECONDS, IntegrityError, StageReader, StageWriter, atomic_path, atomic_write_text
from tests.support.outputs import metrics

SCHEMA = pa.schema([("id", pa.string()), ("v", pa.float64())])


def _commit(writer: StageWriter, rows: int, stage: str = "advantage", stage_metrics=None):
    result = StageResult(rows_in=rows, rows_out=rows, metrics=stage_metrics or metrics(stage))
    return writer.commit(stage=stage, cache_key="k" * 64, result=result,
                         config_fingerprints={}, config={}, inputs={}, code_version="c", versions={})


def test_commit_is_atomic_and_manifest_lists_every_file(tmp_path):
    final = tmp_path / "s" / "abc"
    writer = StageWriter(final)
    with writer.table("t", SCHEMA, part_rows=4) as t:
        for start in range(0, 10, 3):
            t.write({"id": [str(i) for i in range(start, min(start + 3, 10))], "v": [float(i) for i in range(start, min(start + 3, 10))]})
    writer.path("extra/weights.bin").write_bytes(b"\x00" * 10)
    assert not final.exists(), "nothing under the final name before commit"
    manifest = _commit(writer, 10)
    assert final.is_dir() and not writer.dir.exists()
    parts = [o for o in manifest.outputs if o.table == "t"]
    assert [p.rows for p in parts] == [4, 4, 2]
    assert manifest.table_rows() == {"t": 10}
    assert {o.path for o in manifest.outputs} == {"t/part-00000.parquet", "t/part-00001.parquet", "t/part-00002.parquet", "extra/weights.bin"}
    reader = StageReader(final)
    assert reader.read("t").column("v").to_pylist() == [float(i) for i in range(10)]


def test_aborted_stage_leaves_nothing(tmp_path):
    writer = StageWriter(tmp_path / "run" / "s" / "abc")
    with writer.table("t", SCHEMA) as t:
        t.write({"id": ["a"], "v": [1.0]})
    writer.abort()
    assert list(tmp_path.iterdir()) == [], "the folders the writer created go too"


def test_abort_keeps_folders_that_hold_something_else(tmp_path):
    first = StageWriter(tmp_path / "run" / "s" / "abc")
    _commit(first, 0)
    writer = StageWriter(tmp_path / "run" / "t" / "abc")
    writer.abort()
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["s"]
    writer = StageWriter(tmp_path / "run" / "s" / "def")
    writer.abort()
    assert [p.name for p in (tmp_path / "run" / "s").iterdir()] == ["abc"]


def test_partial_folders_of_gone_writers_are_removed_by_the_next_writer(tmp_path):
    stage = tmp_path / "run" / "s"
    child = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(f"""
            import os, signal
            from stages.io import StageWriter
            writer = StageWriter({str(stage / "abc")!r})
            writer.path("weights.bin").write_bytes(b"half")
            print(os.getpid(), writer.dir, flush=True)
            os.kill(os.getpid(), signal.SIGKILL)
        """)],
        capture_output=True, text=True, cwd=os.getcwd(), timeout=120,
    )
    assert child.returncode == -signal.SIGKILL
    pid, folder = child.stdout.split()
    killed = Path(folder)
    assert killed.is_dir() and killed.parent == stage, "SIGKILL leaves the partial folder behind"
    assert f"-{pid}-" in killed.name, "the partial folder names its owner"
    elsewhere = stage / f".abc.partial-some-other-host-{pid}-1-0123abcd"
    elsewhere.mkdir()
    alive = StageWriter(stage / "abc")  # this process: alive
    legacy = stage / ".old.partial-89abcdef"
    legacy.mkdir()

    StageWriter(stage / "xyz").abort()
    assert not killed.exists()
    assert elsewhere.is_dir(), "another host's partial folder is left alone"
    assert alive.dir.is_dir(), "a live writer's folder is left alone"
    assert legacy.is_dir(), "a recent folder without an owner may still be written"
    old = time.time() - UNOWNED_STALE_SECONDS - 60
    os.utime(legacy, (old, old))
    StageWriter(stage / "xyz").abort()
    assert not legacy.exists()
    _commit(alive, 0)
    assert StageReader(stage / "abc").manifest.rows_out == 0


def test_reader_refuses_changed_or_missing_files(tmp_path):
    final = tmp_path / "s" / "abc"
    writer = StageWriter(final)
    writer.write_table("t", pa.table({"id": ["a"], "v": [1.0]}, schema=SCHEMA))
    writer.path("f.txt").write_text("hello")
    _commit(writer, 1)
    (final / "f.txt").write_text("hellO")
    with pytest.raises(IntegrityError, match="f.txt"):
        StageReader(final)
    (final / "f.txt").unlink()
    with pytest.raises(IntegrityError, match="missing"):
        StageReader(final)


def test_empty_table_keeps_its_schema(tmp_path):
    writer = StageWriter(tmp_path / "s" / "abc")
    with writer.table("t", SCHEMA):
        pass
    _commit(writer, 0)
    table = StageReader(tmp_path / "s" / "abc").read("t")
    assert table.num_rows == 0 and table.schema.names == ["id", "v"]


def test_recommit_of_same_key_replaces_the_folder(tmp_path):
    final = tmp_path / "s" / "abc"
    for value in (1.0, 2.0):
        writer = StageWriter(final)
        writer.write_table("t", pa.table({"id": ["a"], "v": [value]}, schema=SCHEMA))
        _commit(writer, 1)
    assert StageReader(final).read("t").column("v").to_pylist() == [2.0]
    assert sorted(p.name for p in (tmp_path / "s").iterdir()) == ["abc"]


def test_atomic_write_text_leaves_no_temporary(tmp_path):
    atomic_write_text(tmp_path / "a" / "x.json", "{}")
    assert [p.name for p in (tmp_path / "a").iterdir()] == ["x.json"]


def test_atomic_path_removes_the_temporary_when_the_writer_fails(tmp_path):
    with pytest.raises(RuntimeError, match="disk"):
        with atomic_path(tmp_path / "x.parquet") as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("disk full")
    assert list(tmp_path.iterdir()) == []


def test_metrics_are_typed_on_both_sides_of_the_manifest(tmp_path):
    writer = StageWriter(tmp_path / "advantage" / "abc")
    writer.write_table("t", pa.table({"id": ["a"], "v": [1.0]}, schema=SCHEMA))
    _commit(writer, 1, stage_metrics=metrics("advantage", rows=7, positive_fraction=0.25))
    read = StageReader(tmp_path / "advantage" / "abc").metrics
    assert isinstance(read, AdvantageMetrics) and (read.rows, read.positive_fraction) == (7, 0.25)


def test_a_stage_must_return_its_own_metrics_model(tmp_path):
    writer = StageWriter(tmp_path / "advantage" / "abc")
    with pytest.raises(TypeError, match="expected AdvantageMetrics"):
        _commit(writer, 0, stage_metrics=metrics("score"))
    assert not (tmp_path / "advantage" / "abc").exists()


def test_an_os_error_without_a_file_name_says_which_stage_was_writing(tmp_path, monkeypatch):
    import errno

    from pipeline import runner
    from schemas.config import load_config

    def full_disk(cfg, inputs, out):
        out.path("scorer_state.json").write_text("{}")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setitem(runner.STAGES, "ingest", runner.StageSpec(f"{__name__}.full_disk", ("data",), ()))
    monkeypatch.setattr(runner, "load_stage_function", lambda stage: full_disk)
    cfg = load_config("smoke", overrides={"run.root": str(tmp_path / "runs")})
    with pytest.raises(OSError, match=r"No space left on device: while stage ingest wrote .*partial.* \(discarded\)"):
        runner.execute_stage(cfg, "ingest", {})
    assert not (tmp_path / "runs" / "smoke" / "ingest").exists(), "nothing of the failed stage is left"


def test_every_use_of_an_evaluation_of_the_final_split_is_counted_across_runs(tmp_path):
    from pipeline.storage import RunStore
    from tests.support.outputs import commit_output

    first, second = RunStore(tmp_path, "first"), RunStore(tmp_path, "second")
    on_test = commit_output(first.stage_dir("evaluate", "t" * 64), "evaluate", metrics_model=metrics("evaluate"))
    first.record(on_test.output(), cached=False, seconds=1.0)
    assert first.final_split_reads() == [] and not first.final_reads_dir.exists()
    on_final = commit_output(first.stage_dir("evaluate", "f" * 64), "evaluate", metrics_model=metrics("evaluate", split="final"))
    first.record(on_final.output(), cached=False, seconds=1.0)
    first.record(on_final.output(), cached=True, seconds=0.1)
    second.record(on_final.output(), cached=True, seconds=0.1)
    reads = second.final_split_reads()
    assert [(r["run"], r["cached"]) for r in reads] == [("first", False), ("first", True), ("second", True)]
    assert reads[0]["evaluate"] == f"first/evaluate/{'f' * 16}", "relative to the run root"
    assert first.final_split_reads() == reads, "one count per run root"


def _record_final_reads(root: str, name: str, count: int) -> None:
    from pipeline.storage import RunStore
    from stages.io import StageReader

    store = RunStore(root, name)
    output = StageReader(store.stage_dir("evaluate", "f" * 64), verify=False).output()
    for _ in range(count):
        store.record(output, cached=True, seconds=0.1)


def test_runs_recording_final_reads_at_once_lose_none(tmp_path):
    """Four processes record 25 reads each at the same time: all 100 are counted (a shared file rewritten
    by each would lose the reads of whoever wrote in between)."""
    from multiprocessing import get_context

    from pipeline.storage import RunStore
    from tests.support.outputs import commit_output

    commit_output(RunStore(tmp_path, "first").stage_dir("evaluate", "f" * 64), "evaluate", metrics_model=metrics("evaluate", split="final"))
    with get_context("spawn").Pool(4) as pool:
        pool.starmap(_record_final_reads, [(str(tmp_path), "first", 25)] * 4)
    reads = RunStore(tmp_path, "other").final_split_reads()
    assert len(reads) == 100 and len({r["id"] for r in reads}) == 100
    assert [r["recorded"] for r in reads] == sorted(r["recorded"] for r in reads)
