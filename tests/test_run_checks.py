"""`alol run` refuses to reuse a run name that holds another data source (it would replace that run's
record without a word), unless `--force`; before Prefect starts."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pytest

from pipeline import preflight
from pipeline.cli import build_parser, main
from pipeline.storage import RunStore
from schemas.config import load_config
from tests.support.outputs import commit_output


def _rows(path: Path) -> Path:
    path.write_text(json.dumps({"prompt": "hi", "response": "hello", "split": "train"}) + "\n")
    return path


def _cfg(tmp_path: Path, **sets):
    return load_config("smoke", overrides={"run.root": str(tmp_path / "runs"), "run.cache_dir": str(tmp_path / "cache"), **sets})


@pytest.fixture
def demo_run(tmp_path):
    """A run `smoke` whose recorded ingest output is of the chatterbot corpus (the demo's data)."""
    cfg = _cfg(tmp_path)
    store = RunStore.of(cfg)
    ingest = commit_output(store.dir / "ingest" / "k", "ingest", {"ingest": pa.table({"id": ["a"]})},
                           config={"data": cfg.data.model_dump(mode="json")})
    store.record(ingest.output(), cached=False, seconds=1.0)
    return tmp_path


def test_own_data_under_a_run_name_holding_another_source_is_refused_unless_forced(demo_run):
    data = _rows(demo_run / "mine.jsonl")
    mine = {"data.source": "file", "data.path": str(data)}
    with pytest.raises(preflight.PreflightError) as caught:
        preflight.check(_cfg(demo_run, **mine), ["ingest"])
    assert caught.value.problems == [
        f"run 'smoke' already holds other data (data.source=chatterbot); give this run (data.source=file, "
        f"data.path={data}) its own name: --set run.name=NAME (or --force to replace the run's record)"
    ]
    preflight.check(_cfg(demo_run, **mine), ["ingest"], force=True)
    preflight.check(_cfg(demo_run, **mine, **{"run.name": "mine"}), ["ingest"])
    # The same source with other selections of it (caps, splits) is the same run, iterated on.
    preflight.check(_cfg(demo_run, **{"data.max_rows_per_split": 8}), ["ingest"])
    preflight.check(_cfg(demo_run, **mine), ["score"]), "only a run that ingests replaces the data"


def test_cli_says_it_in_one_line_before_prefect(demo_run, capsys):
    data = _rows(demo_run / "mine.jsonl")
    args = ["run", "--profile", "smoke", "--stages", "ingest", "--set", f"run.root={demo_run / 'runs'}",
            "--set", f"run.cache_dir={demo_run / 'cache'}", "--set", "data.source=file", "--set", f"data.path={data}"]
    assert main(args) == 1
    [line] = capsys.readouterr().err.splitlines()
    assert line.startswith("alol: error: run 'smoke' already holds other data") and "--set run.name=NAME" in line
    assert not (demo_run / "runs" / ".prefect-results").exists(), "refused before Prefect"
    assert build_parser().parse_args([*args, "--force"]).force and not build_parser().parse_args(args).force
