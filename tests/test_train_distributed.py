"""The train stage as separate processes (`python -m pipeline.launch`): two CPU processes under torchrun
(gloo), each running half of the micro-batches, equal one process running all of them, whether on one
machine (--standalone), on two "machines" meeting at a rendezvous endpoint (train.nodes with
train.rendezvous, two launches here), or on two nodes of a real Ray cluster (train.nodes under run.executor
ray: a head and a second node, 1 CPU each); a run killed with SIGKILL resumes from its last checkpoint to
the same files (content hash) as an uninterrupted run; workers killed under the stage's own torchrun are
started again by it and resume to the same training."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from pipeline.runner import cache_key, execute_stage
from pipeline.storage import RunStore
from schemas.config import ConfigError, apply_overrides
from stages import train
from stages.io import StageReader, StageWriter
from stages.torchrun import LOG_TAIL, failure, run_torchrun, torchrun_command
from stages.train.resume import RESUME_FOLDER, resume_key
from tests.support.ray import ray_two_nodes  # noqa: F401 (fixture)
from tests.support.s3 import free_port
from tests.support.train import build_upstream, config, overrides, readers, tiny_setup

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    torch.set_num_threads(1)  # tiny matrices: a second thread only waits for a core on a busy machine
    tmp = tmp_path_factory.mktemp("train-processes")
    model, data = tiny_setup(tmp)
    return tmp, model, data, build_upstream(config(tmp, model, data))


@pytest.fixture(scope="module")
def one_process(tiny) -> StageReader:
    """One process running both micro-batches of each step (grad_accumulation 2): what every launch must equal."""
    return in_process(tiny, "one-process", **{"train.grad_accumulation": 2})


def write_config(tiny, name: str, **extra) -> Path:
    tmp, model, data, _ = tiny
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(apply_overrides({}, overrides(tmp, model, data, **extra))), encoding="utf-8")
    return path


def cli(config_file: Path, processes: int = 1) -> list[str]:
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes)]
    return [*(launcher if processes > 1 else [sys.executable]), "-m", "pipeline.launch", "--profile", "smoke",
            "--config-file", str(config_file)]


def environment() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}


def in_process(tiny, folder: str, **extra) -> StageReader:
    tmp, model, data, outputs = tiny
    writer = StageWriter(tmp / "in-process" / folder)
    result = train.run(config(tmp, model, data, **extra), readers(outputs), writer)
    writer.commit(stage="train", cache_key="t" * 64, result=result, config_fingerprints={}, config={}, inputs={},
                  code_version="test", versions={})
    return StageReader(tmp / "in-process" / folder)


def recorded_train_output(tiny) -> StageReader:
    tmp, model, data, _ = tiny
    cfg = config(tmp, model, data)
    return StageReader(RunStore(cfg.run.root, cfg.run.name).current("train").path)


def assert_same_training(a: StageReader, b: StageReader, rel: float) -> None:
    for x, y in zip(a.read("train_log").to_pylist(), b.read("train_log").to_pylist(), strict=True):
        assert x["step"] == y["step"]
        for column in ("loss", "grad_norm", "importance_weight_mean", "advantage_mean", "validation_reward"):
            if x[column] is None or y[column] is None:
                assert x[column] is y[column] is None, (x["step"], column)
            else:
                assert x[column] == pytest.approx(y[column], rel=rel), (x["step"], column)
    first, second = load_file(a.path("policy/model.safetensors")), load_file(b.path("policy/model.safetensors"))
    assert first.keys() == second.keys()
    for name in first:
        scale = first[name].abs().max().item()
        torch.testing.assert_close(second[name], first[name], rtol=0, atol=rel * scale, msg=name)


def test_two_processes_equal_one_process_with_twice_the_accumulation(tiny, one_process):
    # grad_accumulation 2: each of two processes runs one micro-batch, one process runs both.
    config_file = write_config(tiny, "two-processes", **{"train.grad_accumulation": 2})
    done = subprocess.run(cli(config_file, processes=2), cwd=REPO, env=environment(), capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    two = recorded_train_output(tiny)
    assert two.metrics.processes == 2 and two.metrics.rows_per_step == 4
    one = one_process
    assert one.metrics.processes == 1 and one.metrics.rows_per_step == 4
    assert one.metrics.policy_is_reference is False
    assert_same_training(one, two, rel=1e-4)

    # The number of processes does not change the result, so one process reuses the two-process output.
    again = subprocess.run(cli(config_file), cwd=REPO, env=environment(), capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and "train output with this cache key exists" in again.stderr, again.stderr[-4000:]
    assert recorded_train_output(tiny).dir == two.dir


def test_killed_run_resumes_from_its_last_checkpoint_to_the_same_output(tiny):
    settings = {"train.steps": 32, "train.checkpoint_every": 2, "run.name": "resume"}
    tmp, model, data, outputs = tiny
    cfg = config(tmp, model, data, **settings)
    store = RunStore(cfg.run.root, cfg.run.name)
    for stage, output in outputs.items():
        store.record(output, cached=True, seconds=0.0)
    uninterrupted = in_process(tiny, "uninterrupted", **settings)
    assert uninterrupted.metrics.steps == 16

    latest = Path(cfg.run.cache_dir).resolve() / RESUME_FOLDER / resume_key(cfg, readers(outputs)) / "latest"
    assert not latest.exists(), "the uninterrupted run removed its resume state"
    config_file = write_config(tiny, "resume", **settings)
    proc = subprocess.Popen(cli(config_file), cwd=REPO, env=environment(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 300
        while not (latest.is_file() and latest.read_text() >= "state-00000004"):
            assert proc.poll() is None, "the run ended before it was killed"
            assert time.monotonic() < deadline, "no checkpoint within 300 s"
            time.sleep(0.01)
        assert proc.poll() is None
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    assert store.current("train") is None, "the killed run committed nothing"
    killed_at = int(latest.read_text().removeprefix("state-"))
    assert 4 <= killed_at < 16

    done = subprocess.run(cli(config_file), cwd=REPO, env=environment(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    assert f"resuming from step {killed_at}" in done.stderr
    resumed = StageReader(store.current("train").path)
    assert resumed.metrics.resumed_from_step == killed_at
    assert_same_training(uninterrupted, resumed, rel=1e-6)
    # Byte for byte: the same train_log and policy/ (no timing in the files), so evaluate's key is the same.
    assert resumed.content_hash == uninterrupted.content_hash
    # The timings of the steps before the kill came back with the resume state.
    assert len(resumed.metrics.step_tokens_per_s) == resumed.metrics.steps == 16
    assert not latest.parent.exists(), "resume state removed once the stage finished"


def test_train_processes_2_launched_by_the_stage_equal_one_process(tiny, one_process):
    """`train.processes: 2` through the runner (as `alol run` calls it): the stage launches torchrun itself, and
    the key is that of one process."""
    tmp, model, data, outputs = tiny
    settings = {"train.grad_accumulation": 2, "run.name": "processes"}
    cfg = config(tmp, model, data, **settings, **{"train.processes": 2})
    assert cache_key(cfg, "train", outputs) == cache_key(config(tmp, model, data, **settings), "train", outputs)
    output, cached = execute_stage(cfg, "train", outputs)
    assert not cached and output.cache_key == cache_key(cfg, "train", outputs)
    two = StageReader(output.path)
    assert two.metrics.processes == 2 and two.metrics.rows_per_step == 4
    assert_same_training(one_process, two, rel=1e-4)
    assert execute_stage(cfg, "train", outputs) == (output, True), "then reused, as one process's output would be"


def test_a_worker_killed_mid_training_is_restarted_and_resumes_to_the_one_process_result(tiny, one_process, monkeypatch):
    """`train.processes: 2` through the runner with both workers killed (SIGKILL) after their third step: torchrun
    starts them again (stages.torchrun.RESTARTS), they resume from the step-2 checkpoint, and the stage completes
    with the training of one process, without a rerun."""
    tmp, model, data, outputs = tiny
    settings = {"train.grad_accumulation": 2, "train.checkpoint_every": 2, "run.name": "restarted"}
    cfg = config(tmp, model, data, **settings, **{"train.processes": 2})
    monkeypatch.setenv("ALOL_FAILPOINT", "train.step@3")
    output, cached = execute_stage(cfg, "train", outputs)
    assert not cached
    restarted = StageReader(output.path)
    assert restarted.metrics.processes == 2 and restarted.metrics.resumed_from_step == 2
    assert restarted.metrics.steps == one_process.metrics.steps > 3
    assert_same_training(one_process, restarted, rel=1e-4)


def test_a_launch_that_fails_in_every_life_raises_with_the_cause_from_its_log():
    """A worker that fails on each of its RESTARTS + 1 lives: run_torchrun returns torchrun's status and the end of
    its log, which the stage's error carries (so a cut log, as CI prints, still shows why)."""
    status, tail = run_torchrun(torchrun_command("stages.no_such_module", [], 1))
    assert status != 0
    error = failure("train on 1 x 1 processes", status, tail)
    assert str(error).startswith(f"train on 1 x 1 processes failed (torchrun exited with {status}); the end of its log:")
    assert "No module named stages.no_such_module" in str(error) and len(tail) <= LOG_TAIL
    assert run_torchrun(torchrun_command("json.tool", ["--help"], 1)) == (0, ""), "success: no tail"


def test_train_processes_must_divide_grad_accumulation(tiny):
    tmp, model, data, _ = tiny
    with pytest.raises(ConfigError, match=r"train.grad_accumulation \(3\) must be a multiple of train.processes \(2\)"):
        config(tmp, model, data, **{"train.grad_accumulation": 3, "train.processes": 2})


def test_train_nodes_need_a_rendezvous_under_the_local_executor(tiny):
    tmp, model, data, _ = tiny
    with pytest.raises(ConfigError, match=r"train.nodes is 2 with run.executor local: set train.rendezvous to host:port"):
        config(tmp, model, data, **{"train.nodes": 2})
    with pytest.raises(ConfigError, match=r"must be a multiple of train.nodes x train.processes \(2 x 2\)"):
        config(tmp, model, data, **{"train.nodes": 2, "train.processes": 2, "train.rendezvous": "127.0.0.1:29400"})
    with pytest.raises(ConfigError, match=r"train.rendezvous is set but run.executor is ray"):
        config(tmp, model, data, **{"train.nodes": 2, "train.rendezvous": "127.0.0.1:29400", "run.executor": "ray"})
    with pytest.raises(ConfigError, match=r"train.rendezvous is set but train.nodes is 1"):
        config(tmp, model, data, **{"train.rendezvous": "127.0.0.1:29400"})


def test_cli_refuses_nodes_without_a_rendezvous_before_any_work(tmp_path, capsys):
    from pipeline.cli import main

    args = ["run", "--profile", "smoke", "--stages", "train", "--set", "train.nodes=2", "--set", "train.grad_accumulation=2",
            "--set", f"run.root={tmp_path / 'runs'}"]
    assert main(args) == 2
    header, line = capsys.readouterr().err.splitlines()
    assert header == "alol: invalid configuration (profile smoke + --set):"
    assert "train.nodes is 2 with run.executor local: set train.rendezvous to host:port on the first machine" in line
    assert not (tmp_path / "runs").exists()


def test_two_machines_meeting_at_a_rendezvous_equal_one_process(tiny, one_process):
    """`train.nodes: 2` under the local executor: the same stage run twice (as `alol run --stages train` on each
    machine), each launching torchrun --nnodes 2 --rdzv-endpoint 127.0.0.1:<port> of pipeline.launch; both
    get the one output the rank-0 process committed, which equals one process."""
    tmp, model, data, outputs = tiny
    settings = {"train.grad_accumulation": 2, "run.name": "rendezvous"}
    cfg = config(tmp, model, data, **settings, **{"train.nodes": 2, "train.rendezvous": f"127.0.0.1:{free_port()}"})
    assert cache_key(cfg, "train", outputs) == cache_key(config(tmp, model, data, **settings), "train", outputs)
    results: dict[int, object] = {}

    def machine(index: int) -> None:
        try:
            results[index] = execute_stage(cfg, "train", outputs)
        except Exception as error:  # reported by the assertion below
            results[index] = error

    machines = [threading.Thread(target=machine, args=(i,)) for i in range(2)]
    for thread in machines:
        thread.start()
    for thread in machines:
        thread.join(timeout=600)
    assert results[0] == results[1] and results[0][1] is False, results
    two = StageReader(results[0][0].path)
    assert two.metrics.processes == 2 and two.metrics.rows_per_step == 4
    assert two.manifest.producer.pid != os.getpid()
    assert_same_training(one_process, two, rel=1e-4)


def test_two_ray_nodes_equal_one_process(tiny, one_process, ray_two_nodes):
    """`train.nodes: 2` under run.executor ray on a head and a second node (1 CPU each): the stage places one
    launcher per node (STRICT_SPREAD) and they meet at the first node's address; the key is one process's."""
    from pipeline import preflight

    tmp, model, data, outputs = tiny
    settings = {"train.grad_accumulation": 2, "run.name": "ray-nodes"}
    on_ray = {"run.executor": "ray", "run.ray_address": ray_two_nodes, "train.nodes": 2}
    cfg = config(tmp, model, data, **settings, **on_ray)
    store = RunStore.of(cfg)
    for output in outputs.values():
        store.record(output, cached=True, seconds=0.0)
    preflight.check(cfg, ["train"])
    assert cache_key(cfg, "train", outputs) == cache_key(config(tmp, model, data, **settings), "train", outputs)
    output, cached = execute_stage(cfg, "train", outputs)
    assert not cached and output.cache_key == cache_key(cfg, "train", outputs)
    two = StageReader(output.path)
    assert two.metrics.processes == 2 and two.metrics.rows_per_step == 4
    assert two.manifest.producer.pid != os.getpid()
    assert_same_training(one_process, two, rel=1e-4)


def test_preflight_refuses_more_nodes_than_the_ray_cluster_has(tiny, ray_two_nodes):
    from pipeline import preflight

    tmp, model, data, outputs = tiny
    ask = {"run.executor": "ray", "run.ray_address": ray_two_nodes, "run.name": "too-many-nodes",
           "train.nodes": 3, "train.grad_accumulation": 3}
    cfg = config(tmp, model, data, **ask)
    store = RunStore.of(cfg)
    for output in outputs.values():
        store.record(output, cached=True, seconds=0.0)
    with pytest.raises(preflight.PreflightError) as caught:
        preflight.check(cfg, ["train"])
    assert caught.value.problems == [
        f"train.nodes is 3 but the Ray cluster at {ray_two_nodes} has 2 live node(s) with 1 CPU (one launcher per "
        "node); lower it (--set train.nodes=2) or add nodes (ray start --address <head>)"
    ]
    gpus = config(tmp, model, data, **{**ask, "train.nodes": 2, "train.grad_accumulation": 2, "train.gpus_per_node": 1})
    with pytest.raises(preflight.PreflightError, match=r"has 0 live node\(s\) with 1 CPU and 1 GPUs"):
        preflight.check(gpus, ["train"])
