"""`alol compare` with two algorithms on the smoke profile and the real SmolLM2, through the Prefect flow.

Uses the checkout's git-ignored `data/cache` (SmolLM2 converted once per checkout, pi_ref's
generations shared) and a temporary run root.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from pipeline.compare import compare
from pipeline.report_cli import print_report
from pipeline.storage import RunStore
from stages.io import StageReader
from schemas.config import load_config
from tests.support.tables import parse_markdown_tables

SHARED_CACHE = Path(__file__).resolve().parent.parent / "data" / "cache"

pytestmark = pytest.mark.slow


def test_compare_two_algorithms_on_the_smoke_profile(tmp_path, prefect_backend):
    overrides = {"run.root": str(tmp_path / "runs"), "run.cache_dir": str(SHARED_CACHE)}
    result = compare(["a_lol", "nll"], profile="smoke", overrides=overrides)

    table, differences = parse_markdown_tables(result.markdown())
    assert [row["method"].split(" ")[0] for row in table] == ["pi_ref", "a_lol", "nll"]
    assert [row["difference"] for row in differences] == ["a_lol − nll"]
    with open(result.csv_path, newline="") as fh:
        records = {r["method"]: r for r in csv.DictReader(fh)}
    assert set(records) == {"pi_ref", "a_lol", "nll"}
    for method in ("a_lol", "nll"):
        gap = float(records[method]["reward"]) - float(records["pi_ref"]["reward"])
        assert float(records[method]["reward_diff"]) == pytest.approx(gap, abs=1e-9)
        assert float(records[method]["train_seconds"]) > 0

    # Both evaluations share one upstream: the same ingest/score/reference/advantage outputs.
    store = RunStore(tmp_path / "runs", "smoke")
    evaluate = StageReader(store.current("evaluate").path)
    assert evaluate.manifest.metrics["algorithm"] == "nll"
    train_first = json.loads(store.state_path.read_text())["stages"]["train"]["path"]

    # Running nll again reuses every stage (nothing is trained or generated again).
    again = compare(["nll"], profile="smoke", overrides=overrides)
    state = json.loads(store.state_path.read_text())["stages"]
    assert all(entry["cached"] for entry in state.values()), state
    assert state["train"]["path"] == train_first
    assert again.rows[1]["reward"] == pytest.approx(float(records["nll"]["reward"]))

    text = print_report(None, load_config("smoke", overrides=overrides))
    assert text.startswith("run smoke: algorithm nll")
