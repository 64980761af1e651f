"""`alol sql`: views over a run's tables, read-only refusal, output formats."""

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
