"""`alol sql` and `alol status --verify`: views over a run's tables, the read-only jail, output formats, damage."""

from __future__ import annotations

import json
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline import sql
from pipeline.storage import RunStore
from tests.support.outputs import commit_output


@pytest.fixture
def run_root(tmp_path):
    store = RunStore(tmp_path / "runs", "r1")
    for stage, tables in {
        "ingest": {"ingest": pa.table({"id": ["a", "b", "c"], "split": ["train", "train", "test"]}),
                   "ingest_rejected": pa.table({"source_row": pa.array([7], pa.int64()), "reason": ["empty response"]})},
        "score": {"score": pa.table({"id": ["a", "b", "c"], "reward": [0.5, 1.5, 2.0]})},
    }.items():
        reader = commit_output(store.stage_dir(stage, stage * 8), stage, tables)
        store.record(reader.output(), cached=False, seconds=0.1)
    return tmp_path / "runs"


def test_join_across_stage_views(run_root):
    rel = sql.query(RunStore(run_root, "r1"), "SELECT i.split, sum(s.reward) AS r FROM ingest i JOIN score s USING (id) GROUP BY 1 ORDER BY 1")
    assert rel.fetchall() == [("test", 2.0), ("train", 2.0)]


@pytest.mark.parametrize("statement", [
    "CREATE TABLE x AS SELECT 1", "INSERT INTO score VALUES ('z', 1)", "DELETE FROM score", "UPDATE score SET reward = 0",
    "COPY score TO 'out.csv'", "ATTACH 'other.db'", "SET threads = 1", "DROP VIEW score", "SELECT 1; DROP VIEW score",
])
def test_writes_are_refused(run_root, statement):
    with pytest.raises(sql.SqlError, match="read-only"):
        sql.query(RunStore(run_root, "r1"), statement)


def test_no_file_access_outside_the_run(run_root, tmp_path):
    outside = tmp_path / "secret.parquet"
    pq.write_table(pa.table({"x": [1]}), outside)
    with pytest.raises(sql.SqlError):
        sql.query(RunStore(run_root, "r1"), f"SELECT * FROM read_parquet('{outside}')").fetchall()


def test_formats_and_parquet_out(run_root, tmp_path):
    rel = lambda: sql.query(RunStore(run_root, "r1"), "SELECT id, reward FROM score ORDER BY id")  # noqa: E731
    assert sql.format_csv(rel()).splitlines() == ["id,reward", "a,0.5", "b,1.5", "c,2.0"]
    assert json.loads(sql.format_json(rel()))[1] == {"id": "b", "reward": 1.5}
    table_text = sql.format_table(rel())
    assert table_text.splitlines()[0].split() == ["id", "reward"]
    assert sql.write_parquet(rel(), tmp_path / "o" / "r.parquet") == 3
    assert pq.read_table(tmp_path / "o" / "r.parquet").column("reward").to_pylist() == [0.5, 1.5, 2.0]


def test_cli_sql_latest_run_views_and_refusal(run_root):
    base = [sys.executable, "-m", "pipeline.cli", "sql", "--profile", "smoke", "--set", f"run.root={run_root}"]
    ok = subprocess.run(base + ["SELECT count(*) AS n FROM ingest_rejected", "--format", "csv"], capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.splitlines() == ["n", "1"]
    views = subprocess.run(base + ["--views"], capture_output=True, text=True, timeout=120)
    assert views.stdout.count("CREATE OR REPLACE VIEW") == 3
    refused = subprocess.run(base + ["DELETE FROM score"], capture_output=True, text=True, timeout=120)
    assert refused.returncode == 1 and "read-only" in refused.stderr and "Traceback" not in refused.stderr


@pytest.mark.parametrize("statement", [
    "EXPLAIN ANALYZE SELECT 1",
    "explain   analyse select 1",
    "/* looks harmless */ EXPLAIN ANALYZE SELECT * FROM score",
    "EXPLAIN ANALYZE COPY (SELECT id, 0.0::DOUBLE AS reward FROM score) TO 'x.parquet' (FORMAT parquet)",
    "EXPLAIN COPY score TO 'out.csv'",
    "EXPLAIN INSERT INTO score VALUES ('z', 1)",
    "EXPLAIN CREATE TABLE x AS SELECT 1",
    "SELECT 1; EXPLAIN ANALYZE SELECT 1",
    "PRAGMA version",
    "CALL pragma_version()",
    "EXPORT DATABASE 'dump'",
    "INSTALL httpfs",
    "LOAD httpfs",
])
def test_statements_that_can_write_or_execute_are_refused(run_root, statement):
    with pytest.raises(sql.SqlError, match="read-only"):
        sql.query(RunStore(run_root, "r1"), statement)


@pytest.mark.parametrize("statement", [
    "EXPLAIN SELECT * FROM score", "EXPLAIN (FORMAT JSON) SELECT * FROM score", "DESCRIBE score", "SHOW TABLES",
    "SUMMARIZE score", "WITH s AS (SELECT * FROM score) SELECT count(*) FROM s", "FROM score SELECT id",
])
def test_reading_statements_run(run_root, statement):
    assert sql.query(RunStore(run_root, "r1"), statement).fetchall()


def _sha256(folder):
    from stages.io import file_sha256

    return {p.name: file_sha256(p) for p in sorted(folder.rglob("*.parquet"))}


def test_cli_cannot_write_into_the_run_through_explain_analyze_or_out(run_root, tmp_path):
    """The attack of issue 18: EXPLAIN ANALYZE COPY over a stage's data file, and --out onto it."""
    score_dir = next((run_root / "r1" / "score").iterdir())
    before = _sha256(run_root)
    part = score_dir / "score" / "part-00000.parquet"
    base = [sys.executable, "-m", "pipeline.cli", "sql", "--profile", "smoke", "--set", f"run.root={run_root}",
            "--set", f"run.cache_dir={tmp_path / 'cache'}"]
    attack = f"EXPLAIN ANALYZE COPY (SELECT id, 0.0::DOUBLE AS reward FROM score) TO '{part}' (FORMAT parquet)"
    for argv in ([attack], ["SELECT * FROM score", "--out", str(part)],
                 ["SELECT * FROM score", "--out", str(run_root / "r1" / "new.parquet")],
                 ["SELECT * FROM score", "--out", str(tmp_path / "cache" / "x.parquet")]):
        done = subprocess.run(base + argv, capture_output=True, text=True, timeout=120)
        assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
        assert done.stderr.startswith("alol: error: ") and ("read-only" in done.stderr or "never writes" in done.stderr)
    assert _sha256(run_root) == before, "a refused statement changed a file of the run"
    assert not (run_root / "r1" / "new.parquet").exists() and not (tmp_path / "cache").exists()
    fine = subprocess.run(base + ["SELECT * FROM score", "--out", str(tmp_path / "out.parquet")], capture_output=True,
                          text=True, timeout=120)
    assert fine.returncode == 0 and pq.read_table(tmp_path / "out.parquet").num_rows == 3


def test_intact_tables_of_a_damaged_run_still_answer(run_root, caplog):
    score_dir = next((run_root / "r1" / "score").iterdir())
    (score_dir / "score" / "part-00000.parquet").write_bytes(b"damaged")
    store = RunStore(run_root, "r1")
    with caplog.at_level("WARNING", logger="alol.sql"):
        assert sql.query(store, "SELECT count(*) FROM ingest").fetchall() == [(3,)]
    assert any("stage score is damaged" in r.getMessage() for r in caplog.records)
    with pytest.raises(sql.SqlError, match="belongs to stage score, whose output is damaged.*alol run"):
        sql.query(store, "SELECT * FROM score")


def test_status_verify_names_the_damaged_output(run_root):
    base = [sys.executable, "-m", "pipeline.cli", "status", "--verify", "--profile", "smoke", "--set", f"run.root={run_root}"]
    intact = subprocess.run(base, capture_output=True, text=True, timeout=120)
    assert intact.returncode == 0, intact.stderr
    assert "ingest: intact" in intact.stdout and "score: intact" in intact.stdout
    score_dir = next((run_root / "r1" / "score").iterdir())
    (score_dir / "score" / "part-00000.parquet").write_bytes(b"damaged")
    damaged = subprocess.run(base, capture_output=True, text=True, timeout=120)
    assert damaged.returncode == 1
    assert "ingest: intact" in damaged.stdout
    assert "score: DAMAGED: " in damaged.stdout and "part-00000.parquet" in damaged.stdout
    assert "damaged: score" in damaged.stderr and "Traceback" not in damaged.stderr
