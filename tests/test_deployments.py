"""Deployments: prefect.yaml against the stage registry, parameter validation, stopping processes
by PID, and (marked e2e) a real Prefect server with one worker per pool running `alol/full` on the
smoke profile: fresh, cached, and with one stage refreshed.

The end-to-end test runs `alol/full` with all six stages, as users do; a stage module that does not
import fails it (before any server starts).
"""

from __future__ import annotations

import json
import logging
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from pipeline import routing
from pipeline import services as alol_services
from pipeline.runner import STAGES, load_stage_function
from pipeline.storage import RunStore
from schemas.stages import STAGE_NAMES
from stages.io import StageReader
from tests.support.services import PREFECT, REPO, alol, ok, prefect_env, run, stop_all

RUN_TIMEOUT_S = 1200

log = logging.getLogger("alol.tests.deployments")


def _spec() -> dict:
    return yaml.safe_load((REPO / "prefect.yaml").read_text(encoding="utf-8"))


def _pools() -> tuple[str, str]:
    """(CPU pool, GPU pool) as prefect.yaml names them."""
    pools = alol_services.deployment_pools(REPO / "prefect.yaml")
    return pools["alol/full"], pools["alol/reference"]


# ---------------------------------------------------------------------------------------------
# prefect.yaml and parameters


def test_prefect_yaml_has_every_deployment_on_its_pool():
    cpu, gpu = _pools()
    assert cpu != gpu
    deployments = {d["name"]: d for d in _spec()["deployments"]}
    assert set(deployments) == {"full", "compare", *STAGE_NAMES}
    for stage in STAGE_NAMES:
        d = deployments[stage]
        assert d["entrypoint"] == "pipeline/flow.py:alol"
        assert d["parameters"] == {"stages": [stage]}
        assert d["work_pool"]["name"] == (gpu if STAGES[stage].accelerator else cpu), stage
    assert deployments["full"]["entrypoint"] == "pipeline/flow.py:alol" and deployments["full"]["work_pool"]["name"] == cpu
    assert deployments["compare"]["work_pool"]["name"] == gpu
    assert all(d["enforce_parameter_schema"] is True for d in deployments.values())


def test_every_entrypoint_is_a_flow_named_alol():
    from prefect.flows import load_flow_from_entrypoint

    for entrypoint in {d["entrypoint"] for d in _spec()["deployments"]}:
        assert load_flow_from_entrypoint(str(REPO / entrypoint)).name == "alol", entrypoint


@pytest.mark.parametrize(
    ("entrypoint", "good", "bad", "complaint"),
    [
        ("pipeline/flow.py:alol", {"stages": ["score"], "refresh": ["score"], "profile": "smoke"}, {"stages": ["bogus"]}, "bogus"),
        ("pipeline/flow.py:alol", {"overrides": {"train.algorithm": "a_lol_seq"}}, {"profile": "huge"}, "huge"),
        ("pipeline/flow.py:alol", {"refresh": []}, {"refresh": "score"}, "'score' is not valid"),
        ("pipeline/compare.py:compare_flow", {"algorithms": ["a_lol", "nll"]}, {"algorithms": ["ppo"]}, "ppo"),
    ],
)
def test_parameter_schema_refuses_bad_values(entrypoint, good, bad, complaint):
    """The schema Prefect stores with each deployment (built from the flow's type hints) and the
    check the server runs when a flow run is created."""
    from prefect.flows import load_flow_from_entrypoint
    from prefect.utilities.callables import parameter_schema
    from prefect.utilities.schema_tools import ValidationError, validate

    schema = parameter_schema(load_flow_from_entrypoint(str(REPO / entrypoint))).model_dump_for_openapi()
    validate(good, schema, raise_on_error=True)
    with pytest.raises(ValidationError, match=complaint):
        validate(bad, schema, raise_on_error=True)


def test_stages_run_in_process_outside_a_worker(monkeypatch):
    monkeypatch.delenv("PREFECT__FLOW_RUN_ID", raising=False)
    assert [routing.accelerator_deployment(stage) for stage in STAGE_NAMES] == [None] * len(STAGE_NAMES)
    # CPU stages never leave the flow run's process, whatever the pool (no API call is made).
    monkeypatch.setenv("PREFECT__FLOW_RUN_ID", "00000000-0000-0000-0000-000000000000")
    cpu_stages = [s for s in STAGE_NAMES if not STAGES[s].accelerator]
    assert cpu_stages and [routing.accelerator_deployment(s) for s in cpu_stages] == [None] * len(cpu_stages)


# ---------------------------------------------------------------------------------------------
# Starting and stopping


def test_up_refuses_a_busy_port_before_starting_anything(tmp_path):
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        with pytest.raises(alol_services.DeployError, match="already in use"):
            alol_services.up(home=tmp_path, port=busy.getsockname()[1], project=REPO)
    assert alol_services.Services.load(tmp_path) is None


def test_up_outside_the_repository_root_is_refused(tmp_path):
    with pytest.raises(alol_services.DeployError, match="no prefect.yaml"):
        alol_services.up(home=tmp_path / "home", port=0, project=tmp_path)


def test_down_with_nothing_started_says_so(tmp_path):
    assert alol_services.down(tmp_path) == [f"nothing to stop: no {alol_services.SERVICES_FILE} in {tmp_path.resolve()}"]


def _sleeper(ignore_term: bool = False) -> subprocess.Popen:
    """A session leader named like a Prefect process that starts a child in its group and sleeps."""
    code = (
        "import signal, subprocess, sys, time\n"
        f"{'signal.signal(signal.SIGTERM, signal.SIG_IGN)' if ignore_term else ''}\n"
        "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)'])\n"
        "print(child.pid, flush=True)\n"
        "time.sleep(120)\n"
    )
    return subprocess.Popen([sys.executable, "-c", code, "prefect-stand-in"], stdout=subprocess.PIPE, text=True, start_new_session=True)


def _wait_gone(proc: subprocess.Popen, child_pid: int) -> None:
    proc.wait(timeout=10)
    deadline = time.monotonic() + 10
    while alol_services._alive(child_pid) and time.monotonic() < deadline:
        time.sleep(0.05)


def test_stop_ends_the_process_and_what_is_left_of_its_group():
    proc = _sleeper()
    child_pid = int(proc.stdout.readline())
    assert alol_services._stop(proc.pid, "worker x") == f"worker x (pid {proc.pid}) stopped"
    _wait_gone(proc, child_pid)
    assert proc.returncode == -signal.SIGTERM
    assert not alol_services._alive(child_pid), "a flow-run process of the worker survived"


def test_stop_kills_a_process_that_ignores_sigterm(monkeypatch):
    monkeypatch.setattr(alol_services, "STOP_GRACE_S", 1.0)
    proc = _sleeper(ignore_term=True)
    child_pid = int(proc.stdout.readline())
    assert alol_services._stop(proc.pid, "server") == f"server (pid {proc.pid}) killed after 1 s"
    _wait_gone(proc, child_pid)
    assert proc.returncode == -signal.SIGKILL
    assert not alol_services._alive(child_pid)


def test_stop_leaves_a_process_that_is_not_prefect_alone():
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"], start_new_session=True)
    try:
        assert alol_services._stop(proc.pid, "server") == f"server (pid {proc.pid}) was not running"
        assert proc.poll() is None
    finally:
        proc.kill()
        proc.wait()


# ---------------------------------------------------------------------------------------------
# End to end: a real server and workers


def test_every_stage_function_imports():
    """The e2e test below runs all six stages; a stage that cannot be imported fails here by name."""
    for stage in STAGE_NAMES:
        assert callable(load_stage_function(stage)), stage


def _run_full(env: dict[str, str], params: dict) -> str:
    args = [PREFECT, "deployment", "run", "alol/full", "--params", json.dumps(params), "--watch", "--watch-interval", "1"]
    started = time.monotonic()
    out = ok(run(args, env, RUN_TIMEOUT_S))
    log.info("alol/full %s: %.1f s", json.dumps(params), time.monotonic() - started)
    return out


def _records(root: Path) -> dict[str, dict]:
    return RunStore(root, "smoke").state()["stages"]


def _finished(entry: dict) -> str:
    return entry["computed_by"]["finished"]


def _flow_runs(api_url: str) -> list[tuple[str | None, str | None, bool, str]]:
    """(deployment name, work pool, is a subflow, state) of every flow run on the server."""
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: api_url}), get_client(sync_client=True) as client:
        names = {d.id: d.name for d in client.read_deployments()}
        runs = client.read_flow_runs()
    return [(names.get(r.deployment_id), r.work_pool_name, r.parent_task_run_id is not None, r.state.name) for r in runs]


def _check_outputs(root: Path, stages: list[str]) -> dict[str, dict]:
    """Every stage recorded under the temporary run root, its files re-hashed against its manifest."""
    records = _records(root)
    assert set(records) == set(stages)
    for stage in stages:
        entry = records[stage]
        assert not Path(entry["path"]).is_absolute(), "run.json stores paths relative to the run root"
        reader = StageReader(root / entry["path"])
        manifest = reader.manifest
        assert (manifest.stage, manifest.cache_key, reader.content_hash) == (stage, entry["cache_key"], entry["content_hash"])
        assert manifest.table_rows() == entry["rows"] and sum(entry["rows"].values()) > 0, stage
        assert manifest.inputs == {up: records[up]["content_hash"] for up in STAGES[stage].upstream}, stage
    return records


def _refresh_target(stages: list[str]) -> str:
    """The last CPU stage that has a later stage (advantage in the full chain): cheap to recompute,
    and the accelerator stages after it must come back from the cache without a GPU-pool run."""
    candidates = [s for s in stages[:-1] if not STAGES[s].accelerator]
    return candidates[-1] if candidates else stages[-1]


@pytest.mark.e2e
def test_up_stops_what_it_started_when_a_step_fails(tmp_path):
    """A prefect.yaml whose entrypoint does not exist: deploy fails after the server started."""
    spec = _spec()
    spec["deployments"] = [{**spec["deployments"][0], "entrypoint": "missing.py:alol"}]
    (tmp_path / "prefect.yaml").write_text(yaml.safe_dump(spec), encoding="utf-8")
    home = tmp_path / "home"
    done = run([sys.executable, "-c", f"from pipeline import services; services.up({str(home)!r}, 0, {str(tmp_path)!r})"], prefect_env(home))
    assert done.returncode != 0 and "prefect --no-prompt deploy --all` failed" in done.stderr, done.stderr[-3000:]
    server_log = (home / "server.log").read_text()
    assert "Check out the dashboard at http://127.0.0.1:" in server_log, "the server never started"
    assert alol_services.Services.load(home) is None, "alol-services.json left behind"
    assert not _listening(server_log), "the server is still answering"


def _listening(server_log: str) -> bool:
    port = re.search(r"dashboard at http://127\.0\.0\.1:(\d+)", server_log).group(1)
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        return sock.connect_ex(("127.0.0.1", int(port))) == 0


@pytest.mark.e2e
def test_full_deployment_runs_caches_and_refreshes_one_stage(tmp_path):
    stages = list(STAGE_NAMES)
    for stage in stages:
        load_stage_function(stage)  # a stage that does not import fails the test before any server starts
    cpu, gpu = _pools()
    home, root = tmp_path / "prefect-home", tmp_path / "runs"
    env = prefect_env(home)
    params = {"profile": "smoke", "overrides": {"run.root": str(root)}}
    accelerated = [s for s in stages if STAGES[s].accelerator]
    try:
        started = time.monotonic()
        ok(alol(["up", "--port", "0", "--home", str(home)], env))
        log.info("alol up: %.1f s", time.monotonic() - started)
        services = alol_services.Services.load(home)
        assert set(services.workers) == {cpu, gpu} and services.api_url.startswith("http://127.0.0.1:")
        env["PREFECT_API_URL"] = services.api_url

        # 1. Everything computed; the accelerator stages as child runs on the GPU pool.
        _run_full(env, params)
        first = _check_outputs(root, stages)
        assert {s: e["cached"] for s, e in first.items()} == {s: False for s in stages}
        first_finished = {s: _finished(e) for s, e in first.items()}
        runs = _flow_runs(services.api_url)
        assert sorted(runs) == sorted([("full", cpu, False, "Completed")] + [(s, gpu, True, "Completed") for s in accelerated])
        artifacts = ok(run([PREFECT, "artifact", "ls"], env))
        assert all(f"alol-{s}" in artifacts for s in stages), artifacts
        status = ok(alol(["status", "--profile", "smoke", "--set", f"run.root={root}"], env))
        assert all(any(line.split()[:1] == [s] and "fresh" in line for line in status.splitlines()) for s in stages), status
        count = ok(alol(["sql", "SELECT count(*) AS n FROM ingest", "--profile", "smoke", "--set", f"run.root={root}", "--format", "csv"], env))
        assert count.split() == ["n", str(first["ingest"]["rows"]["ingest"])]

        # 2. Again: every stage cached, nothing submitted to the GPU pool, no output rewritten.
        _run_full(env, params)
        second = _check_outputs(root, stages)
        assert {s: e["cached"] for s, e in second.items()} == {s: True for s in stages}
        assert {s: (e["path"], e["content_hash"], _finished(e)) for s, e in second.items()} == {
            s: (e["path"], e["content_hash"], first_finished[s]) for s, e in first.items()
        }
        assert len(_flow_runs(services.api_url)) == len(runs) + 1

        # A bad parameter is refused when the run is created: no flow run.
        bad = run([PREFECT, "deployment", "run", "alol/full", "-p", 'stages=["bogus"]'], env)
        assert bad.returncode != 0 and "'bogus' is not one of" in bad.stdout + bad.stderr, bad.stdout + bad.stderr
        assert len(_flow_runs(services.api_url)) == len(runs) + 1

        # 3. One stage refreshed: it runs; earlier stages stay cached; later ones run only if its output changed.
        target = _refresh_target(stages)
        _run_full(env, {**params, "refresh": [target]})
        third = _check_outputs(root, stages)
        position = stages.index(target)
        changed = third[target]["content_hash"] != first[target]["content_hash"]
        expected = {s: (i < position or (i > position and not changed)) for i, s in enumerate(stages)}
        assert {s: e["cached"] for s, e in third.items()} == expected, f"refresh {target}, output changed: {changed}"
        assert {s: _finished(e) > first_finished[s] for s, e in third.items()} == {s: not c for s, c in expected.items()}
        rerun_on_gpu = [s for s in accelerated if stages.index(s) > position and changed]
        assert len(_flow_runs(services.api_url)) == len(runs) + 2 + len(rerun_on_gpu)
    finally:
        started = time.monotonic()
        leftovers = stop_all(home, env)
        log.info("alol down: %.1f s", time.monotonic() - started)
    assert leftovers == [], f"alol down left processes running: {leftovers}"
