"""Runs on object storage (issue 12): run.root and run.cache_dir on a real S3 server (moto's server
mode, tests/support/s3.py), through the same stage code as a local run.

The pipeline is the tiny whole one of tests/support/train.py (a random Llama, two score components,
evaluate included), run once on a local run root and once on the bucket: every stage's content hash
must be the same. On the bucket run: a single-stage refresh, `alol sql`, a writer killed during a
commit, a damaged object, the flow with Prefect's records in the bucket, and the bad set-ups.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from pipeline import preflight, sql
from pipeline.compare import write_comparison
from pipeline.compare_table import MethodRuns, add_run, method_row, reference_columns, reference_row
from pipeline.runner import STAGES, cache_key, execute_stage, reusable_output
from pipeline.storage import RunStore
from schemas.config import load_config
from schemas.stages import STAGE_NAMES
from stages import fs
from stages.io import IntegrityError, StageReader
from tests.support.s3 import CREDENTIALS, moto_server, read_only_user, s3, s3_server  # noqa: F401 (fixtures)
from tests.support.train import WHOLE_PIPELINE, overrides, run_stages, tiny_setup

REPO = Path(__file__).resolve().parent.parent
SECRET = "alol-options-secret"


@pytest.fixture(scope="module")
def local_run(tmp_path_factory):
    """(tmp, model, data, {stage: content hash}) of the tiny whole pipeline on a local run root."""
    torch.set_num_threads(1)  # tiny matrices: a second thread only waits for a core on a busy machine
    tmp = tmp_path_factory.mktemp("local")
    model, data = tiny_setup(tmp)
    outputs = run_stages(load_config("smoke", overrides=overrides(tmp, model, data, **WHOLE_PIPELINE)), STAGE_NAMES)
    return tmp, model, data, {stage: output.content_hash for stage, output in outputs.items()}


def bucket_config(bucket, local_run, **extra):
    tmp, model, data, _ = local_run
    settings = overrides(tmp, model, data, **WHOLE_PIPELINE, **extra)
    settings.update({"run.root": f"{bucket.url}/runs", "run.cache_dir": f"{bucket.url}/cache"})
    return load_config("smoke", overrides=settings)


def test_the_pipeline_on_s3_gives_the_content_hashes_of_a_local_run(s3, local_run, tmp_path, monkeypatch):
    cfg = bucket_config(s3, local_run)
    outputs = run_stages(cfg, STAGE_NAMES)
    assert {stage: o.content_hash for stage, o in outputs.items()} == local_run[3]
    store = RunStore.of(cfg)
    assert all(o.path.startswith(f"{s3.url}/runs/tiny/") for o in outputs.values())
    assert store.verify() == {stage: None for stage in STAGE_NAMES}
    state = json.loads(fs.read_text(f"{s3.url}/runs/tiny/run.json"))
    assert state["stages"]["score"]["path"].startswith("tiny/score/"), "run.json paths are relative to the run root"
    assert any(k.startswith("cache/scores/") for k in s3.keys()), "the score cache is in the bucket"

    # A second machine: nothing local, everything from the bucket, every stage reused.
    monkeypatch.setenv(fs.LOCAL_CACHE_VARIABLE, str(tmp_path / "second-machine"))
    fs.reset()
    again = {stage: execute_stage(cfg, stage, {n: outputs[n] for n in STAGES[stage].upstream}) for stage in STAGE_NAMES}
    assert {stage: (o.content_hash, reused) for stage, (o, reused) in again.items()} == {s: (h, True) for s, h in local_run[3].items()}
    assert (tmp_path / "second-machine" / "s3" / s3.name / "runs" / "tiny" / "train").is_dir(), "materialised there"

    # A single-stage refresh recomputes advantage alone, to the same bytes; the others stay as they were.
    before = {stage: StageReader(o.path, verify=False).manifest.finished for stage, o in outputs.items()}
    inputs = {name: outputs[name] for name in STAGES["advantage"].upstream}
    refreshed, reused = execute_stage(cfg, "advantage", inputs, refresh=True)
    assert not reused and refreshed.content_hash == outputs["advantage"].content_hash
    after = {stage: StageReader(o.path, verify=False).manifest.finished for stage, o in outputs.items()}
    assert after["advantage"] > before["advantage"]
    assert {s: t for s, t in after.items() if s != "advantage"} == {s: t for s, t in before.items() if s != "advantage"}

    # alol sql reads the bucket through the registered filesystem, and nothing outside the run.
    rows = sql.query(store, "SELECT count(*) AS n, count(DISTINCT id) AS ids FROM advantage").fetchall()
    assert rows == [(outputs["advantage"].rows["advantage"],) * 2]
    fs.write_bytes(f"{s3.url}/elsewhere/x.csv", b"a\n1\n")
    with pytest.raises(sql.SqlError, match="disabled by configuration|Permission"):
        sql.query(store, f"SELECT * FROM read_csv('{s3.url}/elsewhere/x.csv')").fetchall()

    # The CLI on the bucket run, from a machine that has nothing of it locally.
    sets = ["--profile", "smoke", "--set", f"run.root={s3.url}/runs", "--set", f"run.cache_dir={s3.url}/cache"]
    script = textwrap.dedent(f"""
        from pipeline.cli import main
        for argv in (["status", "--verify"], ["report"], ["sql", "SELECT count(*) AS n FROM score", "--format", "csv"]):
            assert main(argv + {sets!r}) == 0, argv
    """)
    env = {**s3.environment(), fs.LOCAL_CACHE_VARIABLE: str(tmp_path / "other-machine"), "PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"}
    done = subprocess.run([sys.executable, "-c", script], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"{s3.url}/runs/tiny/evaluate/" in done.stdout, "status shows where each output lives"
    assert "reward difference pi_theta - pi_ref" in done.stdout, "report reads the evaluation from the bucket"
    assert f"n\n{outputs['score'].rows['score']}\n" in done.stdout

    # The comparison table of `alol compare` goes into the run on the bucket.
    evaluate = StageReader(outputs["evaluate"].path)
    metrics = evaluate.metrics
    runs = MethodRuns("a_lol", "a_lol")
    add_run(runs, evaluate, 1.0, None)
    reference = reference_columns(evaluate)
    rows = [reference_row(reference, metrics, 100, 0), method_row(runs, reference, 100, 0)]
    comparison = write_comparison(fs.join(store.dir, "compare"), rows, metrics.components, "t")
    assert comparison.markdown_path == f"{s3.url}/runs/tiny/compare/comparison.md" and "pi_ref" in comparison.markdown()


@pytest.mark.parametrize("failpoint", ["io.write@1:kill", "io.upload@2:kill"])
def test_a_writer_killed_during_its_commit_leaves_nothing_visible_and_the_rerun_recomputes(s3, local_run, failpoint):
    """Killed while writing a table (nothing reaches the bucket) or after uploading one file (no manifest)."""
    cfg = bucket_config(s3, local_run)
    store = RunStore.of(cfg)
    script = textwrap.dedent(f"""
        from pipeline.runner import execute_stage
        from schemas.config import AlolConfig
        execute_stage(AlolConfig.model_validate_json({cfg.model_dump_json()!r}), "ingest", {{}})
    """)
    env = {**s3.environment(), "ALOL_FAILPOINT": failpoint, "PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"}
    child = subprocess.run([sys.executable, "-c", script], env=env, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert child.returncode == -9, child.stderr[-3000:]
    key_folder = store.stage_dir("ingest", cache_key(cfg, "ingest", {}))
    uploaded = s3.keys("runs/tiny/ingest")
    if failpoint.startswith("io.upload"):
        assert len(uploaded) == 1 and fs.parent(f"{s3.url}/{uploaded[0]}").startswith(key_folder), "one file, no manifest"
    else:
        assert uploaded == [], "killed before the commit: nothing in the bucket"
    with pytest.raises(IntegrityError, match="no manifest.json"):
        StageReader(key_folder)
    assert reusable_output(store, "ingest", cache_key(cfg, "ingest", {})) is None
    output, reused = execute_stage(cfg, "ingest", {})
    assert not reused and output.content_hash == local_run[3]["ingest"]
    listed = {f.path for f in StageReader(output.path).manifest.outputs} | {"manifest.json"}
    assert set(fs.listing(output.path)) == listed, "the killed writer's objects are replaced, none left over"


def test_two_hosts_writing_the_same_key_at_once_end_with_one_intact_output(s3, local_run, tmp_path):
    """Two processes with local caches of their own (two hosts: no shared lock) compute ingest at once."""
    cfg = bucket_config(s3, local_run)
    script = textwrap.dedent(f"""
        from pipeline.runner import execute_stage
        from schemas.config import AlolConfig
        execute_stage(AlolConfig.model_validate_json({cfg.model_dump_json()!r}), "ingest", {{}}, refresh=True)
    """)
    children = [
        subprocess.Popen([sys.executable, "-c", script], cwd=REPO, stderr=subprocess.PIPE, text=True, env={
            **s3.environment(), fs.LOCAL_CACHE_VARIABLE: str(tmp_path / f"host-{i}"), "PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin",
            "PYTHONFAULTHANDLER": "1",
        })
        for i in range(2)
    ]
    for child in children:
        try:
            _, stderr = child.communicate(timeout=120)  # drains stderr while waiting: a child never blocks on a full pipe
        except subprocess.TimeoutExpired:
            child.send_signal(signal.SIGABRT)  # PYTHONFAULTHANDLER: the child prints where each of its threads is
            _, stderr = child.communicate()
            pytest.fail(f"a writer still ran after 120 s; where it was:\n{stderr[-6000:]}")
        assert child.returncode == 0, stderr[-3000:]
    reader = StageReader(RunStore.of(cfg).stage_dir("ingest", cache_key(cfg, "ingest", {})))
    assert reader.content_hash == local_run[3]["ingest"]


def test_a_damaged_object_is_detected_and_recomputed(s3, local_run):
    cfg = bucket_config(s3, local_run)
    outputs = run_stages(cfg, ("ingest", "score"))
    part = next(f for f in StageReader(outputs["score"].path).manifest.outputs if f.path.endswith(".parquet"))
    url = fs.join(outputs["score"].path, part.path)
    data = bytearray(fs.read_bytes(url))
    data[len(data) // 2] ^= 0xFF  # same size: only the sha256 can tell
    fs.write_bytes(url, bytes(data))
    with pytest.raises(IntegrityError, match=f"{url}: content differs"):
        StageReader(outputs["score"].path)  # the verified local copy does not hide it: its ETag changed
    assert RunStore.of(cfg).verify()["score"] is not None
    output, reused = execute_stage(cfg, "score", {"ingest": outputs["ingest"]})
    assert not reused and output.content_hash == local_run[3]["score"]
    assert StageReader(output.path).content_hash == local_run[3]["score"]


def test_the_flow_keeps_its_prefect_records_in_the_bucket_and_reruns_cached(s3, local_run, prefect_backend, monkeypatch, caplog):
    """Credentials in run.storage_options only (none in the environment): they reach every client, and
    no object, record or log line."""
    from prefect import get_client
    from prefect.filesystems import RemoteFileSystem

    from pipeline.flow import result_block_name, run_alol

    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(name)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    fs.reset()
    cfg = bucket_config(s3, local_run, **{"run.storage_options": {"key": "alol-options-key", "secret": SECRET}})
    first = run_alol(cfg, stages=["ingest", "score"])
    assert {s: o.content_hash for s, o in first.items()} == {s: local_run[3][s] for s in ("ingest", "score")}
    assert any(k.startswith("runs/.prefect-results/") for k in s3.keys()), "Prefect's result records are in the bucket"
    run_alol(cfg, stages=["ingest", "score"])
    state = RunStore.of(cfg).state()["stages"]
    assert state["ingest"]["cached"] and state["score"]["cached"]
    stored = b" ".join(fs.read_bytes(f"{s3.url}/{k}") for k in s3.keys("runs") if not k.endswith(".parquet"))
    assert b"prefect-results" in b" ".join(k.encode() for k in s3.keys("runs")) and SECRET.encode() not in stored
    assert SECRET not in caplog.text and SECRET not in cfg.model_dump_json() and SECRET not in repr(cfg)
    with get_client(sync_client=True) as client:
        parameters = json.dumps([run.parameters for run in client.read_flow_runs()], default=str)
    assert '"config"' in parameters and SECRET not in parameters, "the flow run's parameters hold no options"
    saved = RemoteFileSystem.load(result_block_name(f"{s3.url}/runs/.prefect-results"))
    assert saved.basepath == f"{s3.url}/runs/.prefect-results" and saved.settings == {}, "Prefect's database holds no options"


@pytest.mark.parametrize("setup", ["no credentials", "unreachable endpoint", "missing bucket"])
def test_a_bad_setup_is_one_line_and_writes_nothing(s3, local_run, monkeypatch, setup):
    cfg = bucket_config(s3, local_run)
    if setup == "no credentials":
        for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
            monkeypatch.delenv(name)
        monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent")
        monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent")
        monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
        expected = "no credentials"
    elif setup == "unreachable endpoint":
        from tests.support.s3 import free_port

        monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")
        expected = "does not answer"
    else:
        cfg = load_config("smoke", overrides={"run.root": "s3://alol-no-such-bucket/runs", "run.cache_dir": str(s3.local_cache)})
        expected = "bucket does not exist"
    fs.reset()
    with pytest.raises(preflight.PreflightError) as raised:
        preflight.check(cfg)
    [problem] = raised.value.problems  # run.cache_dir is in the same bucket: one line
    assert "\n" not in problem and expected in problem and problem.startswith("run.root s3://")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "alol-test-key")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "alol-test-secret")
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3.endpoint)
    fs.reset()
    assert s3.keys() == [], "nothing written"
    assert not (s3.local_cache / "s3").exists()


def test_no_write_permission_is_one_line_and_writes_nothing(tmp_path, monkeypatch):
    with moto_server(tmp_path / "moto.log", unauthenticated_actions=5) as endpoint:
        reader = read_only_user(endpoint, "alol-read-only")
        for name, value in {**CREDENTIALS, **reader, "AWS_ENDPOINT_URL": endpoint}.items():
            monkeypatch.setenv(name, value)
        fs.reset()
        cfg = load_config("smoke", overrides={"run.root": "s3://alol-read-only/runs", "run.cache_dir": str(tmp_path / "cache")})
        with pytest.raises(preflight.PreflightError) as raised:
            preflight.check(cfg)
        assert raised.value.problems == [
            f"run.root s3://alol-read-only/runs (endpoint {endpoint}): cannot write there (Access Denied); "
            "use credentials allowed to write under the prefix, or another prefix"
        ]
        assert fs.listing("s3://alol-read-only/runs") == {}
    fs.reset()


def test_alol_run_says_a_missing_bucket_in_one_line(s3, tmp_path):
    env = {**s3.environment(), "PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, "-m", "pipeline.cli", "run", "--profile", "smoke", "--stages", "ingest",
               "--set", "run.root=s3://alol-no-such-bucket/runs", "--set", f"run.cache_dir={tmp_path / 'cache'}"]
    done = subprocess.run(command, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode != 0
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "alol-no-such-bucket" in lines[0] and "bucket does not exist" in lines[0], done.stderr
