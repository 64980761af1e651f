"""Fault injection (issue 18): a stage killed with SIGKILL at a failpoint (stages.faults), or failing
on a full disk, leaves nothing half-written that a rerun would use, and the rerun computes the same
content hash as an uninterrupted run, without hanging.

The pipeline is the tiny learnable one of tests/support/train.py (a random Llama that learns to say
"cats"), with an SFT pi_ref, two score components, resume checkpoints every 2 train steps and
validation every 3. The kills run one stage in a child process (tests/support/faults.py, through
pipeline.runner.execute_stage, no Prefect); one kill, and the full disk, go through `alol run`
itself, so Prefect's stage locks and the cleanup of partial folders are those a user meets.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from pipeline.runner import RESULTS_FOLDER, STAGES
from pipeline.storage import RunStore
from schemas.manifest import StageOutput
from schemas.stages import STAGE_NAMES
from stages.catalog import PI_REF_FOLDER
from stages.faults import ENVIRONMENT_VARIABLE, parse
from stages.io import StageReader, TableWriter
from stages.train.resume import RESUME_FOLDER
from tests.support.faults import run_stage_in_child
from tests.support.train import WHOLE_PIPELINE, config, overrides, run_stages, tiny_setup

REPO = Path(__file__).resolve().parent.parent
SETTINGS = {
    **WHOLE_PIPELINE,  # two score components, so that a kill can fall between them
    "reference.sft_epochs": 1, "reference.sft_batch_size": 8, "reference.sft_learning_rate": 1e-3,
    "train.checkpoint_every": 2, "train.eval_every": 3,
}
MARKER = "ALOL_FAULT_TEST"
"""An environment variable given to the `alol` subprocesses, which their children inherit: a process
that still has it after its `alol` was killed was left behind."""


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    """(tmp, model, data, {stage: output}) of an uninterrupted run of the whole tiny pipeline."""
    torch.set_num_threads(1)  # tiny matrices: a second thread only waits for a core on a busy machine
    tmp = tmp_path_factory.mktemp("faults")
    model, data = tiny_setup(tmp)
    cfg = config(tmp, model, data, **SETTINGS)
    outputs = run_stages(cfg, STAGE_NAMES)
    train = StageReader(outputs["train"].path).metrics
    assert train.policy_is_reference is False and train.steps == 6, "train wrote policy/ after 6 steps"
    assert StageReader(outputs["reference"].path).metrics.sft_steps == 4
    return tmp, model, data, outputs


def partial_folders(stage_dir: Path) -> list[Path]:
    return sorted(stage_dir.parent.glob(f".{stage_dir.name}.partial-*"))


def copy_upstream(outputs: dict[str, StageOutput], stage: str, store: RunStore) -> dict[str, StageOutput]:
    """The upstream outputs of `stage`, copied into the run `store` as they lie in the uninterrupted run (the
    evaluate report links them by relative path, so where they lie is part of its content)."""
    copies = {}
    for name in STAGES[stage].upstream:
        folder = store.stage_dir(name, outputs[name].cache_key)
        shutil.copytree(outputs[name].path, folder)
        copies[name] = outputs[name].model_copy(update={"path": str(folder)})
    return copies


def cache_files(cache_dir: Path, kind: str, pattern: str = "*.parquet") -> list[Path]:
    return sorted((cache_dir / kind).rglob(pattern))


# --- the failpoints themselves ------------------------------------------------------------------------------------


def test_failpoint_specs_are_parsed_and_a_bad_one_is_refused():
    assert parse("reference.sft") == ("reference.sft", 1, "kill")
    assert parse("train.step@3") == ("train.step", 3, "kill")
    assert parse("io.write@2:enospc") == ("io.write", 2, "enospc")
    for bad in ("train.step@0", "train.step@x", "io.write:full", "@2"):
        with pytest.raises(ValueError, match=ENVIRONMENT_VARIABLE):
            parse(bad)


def test_a_real_full_disk_names_the_part_being_written(tmp_path):
    """pyarrow's OSError on a full disk names no file; the table writer's does (/dev/full: every write fails ENOSPC)."""
    if not Path("/dev/full").exists():
        pytest.skip("no /dev/full here")
    folder = tmp_path / "score"
    folder.mkdir()
    (folder / "part-00000.parquet").symlink_to("/dev/full")
    writer = TableWriter(folder, pa.schema([("id", pa.string())]))
    with pytest.raises(OSError) as caught:
        writer.write({"id": [str(i) for i in range(1000)]})
        writer.close()
    assert caught.value.errno == errno.ENOSPC
    assert str(caught.value) == (
        f"[Errno 28] No space left on device: {folder / 'part-00000.parquet'} (table 'score'); "
        "free space on its file system and run the stage again"
    )


# --- SIGKILL inside a stage, then a rerun ----------------------------------------------------------------------------

KILLS = {
    "score-after-its-first-component": ("score", "score.component_cached@1"),
    "score-while-writing-its-table": ("score", "io.write@1"),
    "reference-during-sft": ("reference", "reference.sft@2"),  # of 4 SFT steps
    "reference-during-the-logprob-pass": ("reference", "reference.logprobs@5"),  # 3 validation, 8 train batches
    "train-right-after-a-checkpoint": ("train", "train.step@4"),
    "train-between-checkpoints": ("train", "train.step@3"),  # after validating step 3 and saving it as the best
    "evaluate-after-pi-ref-generations": ("evaluate", "evaluate.reference_generations"),
}
RESUMED_FROM = {"train.step@4": 4, "train.step@3": 2}
"""The checkpoint a killed train run leaves (checkpoint_every 2) and its rerun continues from."""


@pytest.mark.parametrize("case", KILLS)
def test_a_killed_stage_reruns_to_the_uninterrupted_output(pipeline, tmp_path, case):
    tmp, model, data, outputs = pipeline
    stage, point = KILLS[case]
    cache_dir = tmp_path / "cache"  # the shared caches start empty, so the killed run fills them
    cfg = config(tmp, model, data, **SETTINGS, **{"run.root": str(tmp_path / "runs"), "run.cache_dir": str(cache_dir)})
    store = RunStore.of(cfg)
    inputs = copy_upstream(outputs, stage, store)
    stage_dir = store.stage_dir(stage, outputs[stage].cache_key)

    killed = run_stage_in_child(cfg, stage, inputs, tmp_path / "killed", failpoint=point)
    assert killed.killed, f"{point} did not kill the stage (exit {killed.exitcode}):\n{killed.log}"
    assert not stage_dir.exists(), "the killed run committed nothing"
    [partial] = partial_folders(stage_dir)
    assert f"-{killed.pid}-" in partial.name, "the half-written output is the killed process's"
    if case == "score-after-its-first-component":
        [entry] = cache_files(cache_dir, "scores")
        assert pq.read_table(entry).num_rows == StageReader(outputs["ingest"].path).manifest.rows_out
    if case == "reference-during-the-logprob-pass":
        assert (partial / PI_REF_FOLDER / "config.json").is_file(), "killed with pi_ref/ already in the partial output"
    if stage == "train":
        [latest] = (cache_dir / RESUME_FOLDER).glob("*/latest")
        assert latest.read_text() == f"state-{RESUMED_FROM[point]:08d}"
    if stage == "evaluate":
        assert len(cache_files(cache_dir, "generations")) == 1, "pi_ref's generations were cached before the kill"

    rerun = run_stage_in_child(cfg, stage, inputs, tmp_path / "rerun")
    assert rerun.exitcode == 0, rerun.log
    assert rerun.reused is False and Path(rerun.output.path) == stage_dir
    assert rerun.output.content_hash == outputs[stage].content_hash, "the rerun differs from an uninterrupted run"
    assert partial_folders(stage_dir) == [], "the rerun removed the killed run's partial folder"
    assert cache_files(cache_dir, "", ".*.tmp") == [], "no half-written cache file"
    metrics = StageReader(stage_dir).metrics  # verifies every file against the manifest
    if stage == "score":
        cached = {name: component.cached for name, component in metrics.components.items()}
        assert cached == {"cats": True, "informative": case == "score-while-writing-its-table"}
    if stage == "train":
        assert metrics.resumed_from_step == RESUMED_FROM[point]
        assert f"resuming from step {RESUMED_FROM[point]}" in rerun.log
        assert not any((cache_dir / RESUME_FOLDER).glob("*")), "the resume state was removed"
    if stage == "evaluate":
        assert metrics.reference_generations_cached == 1


# --- through `alol run` --------------------------------------------------------------------------------------------


def alol_run(tmp: Path, model: Path, data: Path, root: Path, log: Path, *args: str, failpoint: str | None = None,
             timeout: float = 300) -> tuple[int, str]:
    """`python -m pipeline.cli run --profile smoke` on the tiny pipeline under `root`: (exit code, stderr)."""
    sets = overrides(tmp, model, data, **SETTINGS, **{"run.root": str(root), "run.cache_dir": str(root / "cache")})
    command = [sys.executable, "-m", "pipeline.cli", "run", "--profile", "smoke", *args]
    command += [arg for key, value in sets.items() for arg in ("--set", f"{key}={json.dumps(value)}")]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", MARKER: str(root)}
    env.pop(ENVIRONMENT_VARIABLE, None)
    if failpoint:
        env[ENVIRONMENT_VARIABLE] = failpoint
    with open(log, "w", encoding="utf-8") as err:
        proc = subprocess.Popen(command, cwd=REPO, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=err)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            raise AssertionError(f"alol run {' '.join(args)} still ran after {timeout} s:\n{log.read_text()[-4000:]}")
    return proc.returncode, log.read_text(encoding="utf-8")


def assert_nothing_left_running(root: Path, wait: float = 30.0) -> None:
    """No process of the `alol` runs under `root` (their temporary Prefect servers) outlives them."""
    deadline = time.monotonic() + wait
    while left := [p for p in psutil.process_iter() if _environ(p).get(MARKER) == str(root)]:
        if time.monotonic() > deadline:
            for process in left:
                process.send_signal(signal.SIGKILL)
            raise AssertionError(f"left running after alol ended: {[p.cmdline() for p in left]}")
        time.sleep(0.2)


def _environ(process: psutil.Process) -> dict[str, str]:
    try:
        return process.environ()
    except (psutil.Error, OSError):
        return {}


def test_alol_run_killed_in_train_then_run_again_completes_with_the_same_outputs(pipeline, tmp_path):
    tmp, model, data, outputs = pipeline
    root = tmp_path / "runs"
    store = RunStore(root, "tiny")
    code, err = alol_run(tmp, model, data, root, tmp_path / "killed.log", failpoint="train.step@3")
    assert code == -signal.SIGKILL, err[-4000:]
    assert_nothing_left_running(root)
    recorded = store.state()["stages"]
    assert list(recorded) == ["ingest", "score", "reference", "advantage"], "the stages before train were recorded"
    # Folders and locks are found by name patterns, not by the test's cache keys: `alol` computes its own.
    [partial] = (store.dir / "train").iterdir()
    assert partial.name.startswith(".") and ".partial-" in partial.name, "nothing of train committed, a partial folder"
    locks = root / RESULTS_FOLDER / "locks"
    assert len(list(locks.glob("*.lock"))) == 1, "the killed run held train's stage lock"

    code, err = alol_run(tmp, model, data, root, tmp_path / "rerun.log")
    assert code == 0, err[-4000:]
    assert "removing the lock of stage key" in err and "resuming from step 2" in err, err[-4000:]
    assert_nothing_left_running(root)
    recorded = store.state()["stages"]
    assert [entry["cache_key"] for entry in recorded.values()] == [outputs[s].cache_key for s in STAGE_NAMES], (
        "alol computed other cache keys than the test did: was a file under stages/ or schemas/ edited meanwhile?"
    )
    assert {stage: entry["content_hash"] for stage, entry in recorded.items()} == {
        stage: outputs[stage].content_hash for stage in STAGE_NAMES
    }, "every stage as in an uninterrupted run"
    assert {stage: entry["cached"] for stage, entry in recorded.items()} == {
        "ingest": True, "score": True, "reference": True, "advantage": True, "train": False, "evaluate": False,
    }
    assert StageReader(store.current("train").path).metrics.resumed_from_step == 2
    assert list(store.dir.glob("*/.*")) == [], "no partial folder left in the run"
    assert list(locks.glob("*.lock")) == [], "no stage lock left"
    assert not any((root / "cache" / RESUME_FOLDER).glob("*")), "the resume state was removed"


def test_a_full_disk_while_a_stage_writes_its_table_fails_naming_the_file(pipeline, tmp_path):
    tmp, model, data, outputs = pipeline
    root = tmp_path / "runs"
    store = RunStore(root, "tiny")
    store.record(outputs["ingest"], cached=True, seconds=0.0)
    code, err = alol_run(tmp, model, data, root, tmp_path / "enospc.log", "--stages", "score",
                         failpoint="io.write:enospc")
    assert code == 1, err[-4000:]
    part = re.escape(f"{store.dir}/score/.") + r"[0-9a-f]{16}\.partial-[^/]+/score/part-00000\.parquet"
    [line] = [line for line in err.splitlines() if line.startswith("alol: error:")]
    assert re.fullmatch(
        rf"alol: error: OSError: \[Errno 28\] No space left on device: {part} \(table 'score'\); free space on its "
        r"file system and run the stage again \(--debug shows the traceback\)",
        line,
    ), line
    assert "Traceback" not in err
    assert_nothing_left_running(root)
    assert list(store.dir.glob("score/*")) == list(store.dir.glob("score/.*")) == [], "no output, no partial folder"
    assert "score" not in store.state()["stages"]
    assert list((root / RESULTS_FOLDER / "locks").glob("*.lock")) == [], "the stage lock was released"
