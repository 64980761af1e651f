"""The `alol` command as a user runs it: errors in input data are one line and a non-zero exit."""

from __future__ import annotations

import os
import re
import subprocess
import sys


def test_unparseable_input_file_is_one_clear_line(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('[{"prompt": "a", "response": "b"},\n {"prompt": "c" "response": 1}]')
    proc = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "run", "--profile", "smoke", "--stages", "ingest",
         "--set", "data.source=file", "--set", f"data.path={bad}", "--set", f"run.root={tmp_path / 'runs'}"],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 1
    errors = [line for line in proc.stderr.splitlines() if line.startswith("alol: error")]
    assert errors == [f"alol: error: {bad}: line 2, column 17: not valid JSON: Expecting ',' delimiter"]
    startup = re.search(
        r"first stage ingest starts (\d+\.\d) s after alol started \(config and checks (\d+\.\d) s, "
        r"Prefect import and server (\d+\.\d) s, flow start (\d+\.\d) s\)", proc.stderr,
    )
    assert startup, f"the time to the first stage, and what it went to: {proc.stderr[-3000:]}"
    total, *parts = map(float, startup.groups())
    assert abs(sum(parts) - total) <= 0.2, "the parts add up to the time to the first stage (to rounding)"
    assert "Traceback" not in proc.stderr + proc.stdout
    assert not (tmp_path / "runs" / "smoke").exists(), "a failed stage leaves no output folder"
    records = [p.name for p in (tmp_path / "runs" / ".prefect-results").iterdir() if p.name != "locks"]
    assert records == [], "nor a Prefect record of its exception"


def test_debug_shows_the_traceback(tmp_path):
    args = [sys.executable, "-m", "pipeline.cli", "run", "--profile", "smoke", "--stages", "score",
            "--set", f"run.root={tmp_path / 'runs'}"]
    quiet = subprocess.run(args, capture_output=True, text=True, timeout=120)
    assert quiet.returncode == 1 and "Traceback" not in quiet.stderr
    for debug_args, env in ((["--debug"], {}), ([], {"ALOL_DEBUG": "1"})):
        loud = subprocess.run([*args[:3], *debug_args, *args[3:]], capture_output=True, text=True, timeout=120,
                              env={**os.environ, **env})
        assert loud.returncode == 1
        assert "Traceback" in loud.stderr and "PreflightError: run 'smoke' has no output of ingest" in loud.stderr


def test_final_flag_asks_for_the_final_split_in_run_and_compare():
    from pipeline.cli import _overrides, build_parser

    for argv in (["run", "--final"], ["compare", "--final", "--seeds", "3", "--value-ablation"]):
        args = build_parser().parse_args(argv)
        assert _overrides(args) == {"evaluate.split": "final"}
    args = build_parser().parse_args(["compare", "--seeds", "3", "--value-ablation"])
    assert (args.seeds, args.value_ablation, _overrides(args)) == (3, True, {})
    assert _overrides(build_parser().parse_args(["run", "--set", "train.steps=2"])) == {"train.steps": 2}
