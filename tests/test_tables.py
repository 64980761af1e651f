"""The documented tables (schemas.tables): every column described, the schemas equal to what the
stages write, `alol sql --describe`, the `joined` view, and the views in the DuckDB CLI."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pipeline import sql
from pipeline.cli import main
from pipeline.storage import RunStore
from schemas.base import column_description
from schemas.stages import STAGE_NAMES
from schemas.tables import JOINED_VIEW, TABLES, joined_schema
from stages.io import StageReader
from tests.support.train import WHOLE_PIPELINE, config, run_stages, tiny_setup

COMPONENTS = ["cats", "informative"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """(cfg, {stage: reader}) of the tiny whole pipeline."""
    torch.set_num_threads(1)
    tmp = tmp_path_factory.mktemp("tables")
    model, data = tiny_setup(tmp)
    cfg = config(tmp, model, data, **WHOLE_PIPELINE)
    return cfg, {s: StageReader(o.path) for s, o in run_stages(cfg, STAGE_NAMES).items()}


def sql_main(cfg, *args: str) -> int:
    return main(["sql", "--profile", "smoke", "--set", f"run.root={cfg.run.root}", "--run", cfg.run.name, *args])


def test_every_column_of_every_table_and_of_the_joined_view_is_described():
    schemas = {name: doc.schema(COMPONENTS) for name, doc in TABLES.items()}
    schemas[JOINED_VIEW] = joined_schema(COMPONENTS)
    undescribed = [f"{t}.{f.name}" for t, s in schemas.items() for f in s if not (column_description(f) or "").strip()]
    assert not undescribed
    assert "reward component `cats`" in column_description(schemas["score"].field("cats")).lower()


def test_documented_schemas_are_what_the_stages_wrote(run):
    _, readers = run
    written = {table: (stage, columns) for stage, reader in readers.items() for table, columns in reader.manifest.columns.items()}
    # evaluate.harmlessness_prompts is 0 here, and an A-LoL run draws no pairs
    assert set(written) == set(TABLES) - {"eval_harmlessness", "pairs"}
    for table, (stage, columns) in written.items():
        schema = TABLES[table].schema(COMPONENTS)
        assert TABLES[table].stage == stage
        assert columns == {f.name: str(f.type) for f in schema}, table


def test_joined_view_has_text_scores_reference_numbers_and_advantage(run):
    cfg, readers = run
    store = RunStore(cfg.run.root, cfg.run.name)
    joined = sql.query(store, f"SELECT * FROM {JOINED_VIEW} ORDER BY id")
    assert joined.columns == joined_schema(COMPONENTS).names
    rows = [dict(zip(joined.columns, r)) for r in joined.fetchall()]
    ingest = {r["id"]: r for r in readers["ingest"].read("ingest").to_pylist()}
    score = {r["id"]: r for r in readers["score"].read("score").to_pylist()}
    reference = {r["id"]: r for r in readers["reference"].read("reference").to_pylist()}
    advantage = {r["id"]: r for r in readers["advantage"].read("advantage").to_pylist()}
    assert [r["id"] for r in rows] == sorted(ingest)
    for row in rows:
        source = ingest[row["id"]]
        assert row["prompt_text"] == source["prompt"][-1]["content"] and row["response"] == source["response"]
        assert row["reward"] == score[row["id"]]["reward"] and row["cats"] == score[row["id"]]["cats"]
        ref = reference.get(row["id"])
        assert row["prompt_tokens"] == (ref["prompt_tokens"] if ref else None)
        assert (row["prompt_tokens"] is None) == (source["split"] == "test")
        assert row["advantage"] == (advantage[row["id"]]["advantage"] if row["id"] in advantage else None)
    assert sum(r["advantage"] is not None for r in rows) == len(advantage) > 0


def test_cli_describe_prints_columns_types_and_descriptions(run, capsys):
    cfg, _ = run
    assert sql_main(cfg, "--describe", "reference") == 0
    out = capsys.readouterr().out
    assert out.startswith("reference (stage reference): ")
    line = next(line for line in out.splitlines() if line.split()[0] == "prompt_tokens")
    assert line.split()[1] == "int32" and "left truncation" in line
    assert sql_main(cfg, "--describe") == 0
    everything = capsys.readouterr().out
    assert all(f"\n{name} (stage " in "\n" + everything for name in [*TABLES, JOINED_VIEW])
    assert "  cats  " in everything, "component columns named after the run's components"
    assert sql_main(cfg, "--describe", "nosuch") == 1
    assert "no such table" in capsys.readouterr().err


def test_views_file_works_in_the_duckdb_cli(run, tmp_path, capsys):
    """The README's `alol sql --views > views.sql && duckdb -init views.sql`, with the CLI of duckdb-cli."""
    cfg, readers = run
    cli = shutil.which("duckdb") or str(Path(sys.executable).with_name("duckdb"))
    assert Path(cli).is_file(), "the DuckDB CLI (pip install duckdb-cli, in the sql extra) is missing"
    assert sql_main(cfg, "--views") == 0
    views = tmp_path / "views.sql"
    views.write_text(capsys.readouterr().out)
    assert f'VIEW "{JOINED_VIEW}"' in views.read_text()
    done = subprocess.run([cli, "-init", str(views), "-csv", "-c", f"SELECT count(*) AS n FROM {JOINED_VIEW}"],
                          capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == str(readers["ingest"].manifest.table_rows()["ingest"])
