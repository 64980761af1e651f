"""The `alol` command as a user runs it: errors in input data are one line and a non-zero exit."""

from __future__ import annotations

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
    last = proc.stderr.strip().splitlines()[-1] if "alol: error" in proc.stderr.strip().splitlines()[-1] else \
        next(line for line in proc.stderr.splitlines() if line.startswith("alol: error"))
    assert last == f"alol: error: {bad}: line 2, column 17: not valid JSON: Expecting ',' delimiter"
    assert "Traceback" not in proc.stderr + proc.stdout
    assert not list((tmp_path / "runs").glob("smoke/ingest/*")), "a failed stage leaves no output folder"
