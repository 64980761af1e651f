"""`run.executor: ray` on a real local Ray cluster (tests/support/ray.py): the same outputs as the local
executor, the manifest's workers and timings, and an actor killed mid-stage changing nothing."""

from __future__ import annotations

import os

import numpy as np
import pyarrow as pa
import pytest

from pipeline.runner import STAGES, cache_key
from schemas.manifest import StageOutput
from stages.io import StageReader
from tests.support.ray import ray_cluster  # noqa: F401 (fixture)
from tests.support.s3 import free_port
from tests.support.train import WHOLE_PIPELINE, config, run_stages, tiny_setup

pytest.importorskip("ray")

SCORE_ONLY = ("ingest", "score")
EVERY_STAGE = ("ingest", "score", "reference", "advantage", "train", "evaluate")
FLOAT_TOLERANCE = 1e-5


def _run(tmp_path, name: str, stages: tuple[str, ...], **extra):
    tmp = tmp_path / name
    model, data = tiny_setup(tmp)
    cfg = config(tmp, model, data, **WHOLE_PIPELINE, **{"score.batch_size": 4, **extra})
    return run_stages(cfg, stages)


def _ray(address: str, actors: int = 2, batch_rows: int = 8) -> dict:
    return {
        "run.executor": "ray", "run.ray_address": address,
        **{
            f"run.workers.{stage}": {"actors": actors, "cpus_per_actor": 1, "batch_rows": batch_rows}
            for stage in ("score", "reference", "evaluate")
        },
    }


def _assert_tables_close(local: pa.Table, on_ray: pa.Table, where: str) -> None:
    """Same columns, same rows in the same order; floats (and lists of floats) within FLOAT_TOLERANCE, the rest equal."""
    assert local.schema == on_ray.schema, where
    for name in local.column_names:
        a, b = local.column(name), on_ray.column(name)
        kind = a.type.value_type if pa.types.is_list(a.type) else a.type
        if pa.types.is_floating(kind):
            if pa.types.is_list(a.type):
                assert [len(x) for x in a.to_pylist()] == [len(x) for x in b.to_pylist()], f"{where}.{name}"
                a, b = pa.concat_arrays([c.flatten() for c in a.chunks]), pa.concat_arrays([c.flatten() for c in b.chunks])
            x, y = np.asarray(a.to_numpy(zero_copy_only=False), float), np.asarray(b.to_numpy(zero_copy_only=False), float)
            assert np.array_equal(np.isnan(x), np.isnan(y)), f"{where}.{name}"
            assert np.allclose(x, y, rtol=0, atol=FLOAT_TOLERANCE, equal_nan=True), f"{where}.{name}: max |diff| {np.nanmax(np.abs(x - y))}"
        else:
            assert a.to_pylist() == b.to_pylist(), f"{where}.{name}"


def _execution(output):
    return StageReader(output.path).manifest.execution


def test_score_on_ray_equals_local_and_the_manifest_names_the_workers(tmp_path, ray_cluster):
    local = _run(tmp_path, "local", SCORE_ONLY)
    on_ray = _run(tmp_path, "ray", SCORE_ONLY, **_ray(ray_cluster))
    assert on_ray["score"].content_hash == local["score"].content_hash

    execution = _execution(on_ray["score"])
    assert execution.executor == "ray" and execution.ray_address == ray_cluster
    assert [m.name for m in execution.maps] == ["score cats", "score informative"]
    for run in execution.maps:
        assert run.rows == 46 and run.shards == 6 and run.actors == 2  # 46 rows, shards of 8 (two batches of 4)
        assert sum(w.rows for w in run.workers) == 46 and sum(w.shards for w in run.workers) == 6
        assert all(not w.worker.endswith(f":{os.getpid()}") and w.peak_rss_bytes > 0 for w in run.workers)
    assert _execution(local["score"]).executor == "local"
    assert all(m.workers[0].worker.endswith(f":{os.getpid()}") for m in _execution(local["score"]).maps)


def test_reference_and_evaluate_on_ray_equal_local(tmp_path, ray_cluster):
    """Every pass of both stages on 2 actors: an SFT pi_ref (loaded by the actors from the stage's folder), its
    value-target decodes, the validation pass with the value features, the train pass with V(x), built pairs'
    decodes and pass; then the evaluation decodes and their scoring. Small shards: several per map."""
    extra = {"reference.pairs": "built", "reference.sft_epochs": 1, "reference.generate_batch_size": 2}
    local = _run(tmp_path, "local", EVERY_STAGE, **extra)
    on_ray = _run(tmp_path, "ray", EVERY_STAGE, **extra, **_ray(ray_cluster, batch_rows=4))
    for stage, tables in (("reference", ("reference", "value_targets", "pi_ref_responses")), ("evaluate", ("eval",))):
        a, b = StageReader(local[stage].path), StageReader(on_ray[stage].path)
        for table in tables:
            assert a.read(table).num_rows > 0, table
            _assert_tables_close(a.read(table), b.read(table), f"{stage}/{table}")

    reference = _execution(on_ray["reference"])
    assert reference.executor == "ray" and reference.ray_address == ray_cluster
    assert [m.name for m in reference.maps] == [
        "reference value-target decoding", "reference log-probs and value features (validation)",
        "reference log-probs and V(x) (train)", "reference pi_ref responses decoding", "reference log-probs (pi_ref responses)",
    ]
    rows = StageReader(on_ray["reference"].path).read("reference").column("split").to_pylist()
    assert [m.rows for m in reference.maps[1:3]] == [rows.count("validation"), rows.count("train")]
    assert all(m.shards > 1 and all(not w.worker.endswith(f":{os.getpid()}") for w in m.workers) for m in reference.maps)
    evaluate = _execution(on_ray["evaluate"])
    assert [m.name.split(" (")[0] for m in evaluate.maps][:2] == ["evaluate decoding", "evaluate decoding"]
    assert {m.name for m in evaluate.maps[2:]} >= {"score cats (pi_ref)", "score cats (pi_theta)"}
    assert all(m.executor == "ray" for m in evaluate.maps)


def test_an_actor_killed_mid_stage_is_restarted_and_the_output_is_the_same(tmp_path, ray_cluster, monkeypatch):
    local = _run(tmp_path, "local", SCORE_ONLY)
    monkeypatch.setenv("ALOL_FAILPOINT", "executor.shard@2")  # each actor's first life dies after its 2nd shard
    on_ray = _run(tmp_path, "ray", SCORE_ONLY, **_ray(ray_cluster, actors=1))
    assert on_ray["score"].content_hash == local["score"].content_hash
    for run in _execution(on_ray["score"]).maps:
        # the killed actor's first shard came back from it, the rest from its restarted process
        assert len(run.workers) == 2 and sorted(w.shards for w in run.workers) == [1, 5]


def test_an_actor_killed_in_the_reference_stage_is_restarted_and_the_output_is_the_same(tmp_path, ray_cluster, monkeypatch):
    stages = (*SCORE_ONLY, "reference")
    local = _run(tmp_path, "local", stages)
    monkeypatch.setenv("ALOL_FAILPOINT", "executor.shard@2")  # each actor's first life dies at its 2nd shard
    on_ray = _run(tmp_path, "ray", stages, **_ray(ray_cluster, actors=1, batch_rows=4))
    assert on_ray["reference"].content_hash == local["reference"].content_hash
    killed = [m for m in _execution(on_ray["reference"]).maps if m.shards >= 2]
    assert killed, "some map of several shards"
    for run in killed:  # the first shard came back from the killed actor, the rest from its restarted process
        assert sorted(w.shards for w in run.workers) == [1, run.shards - 1], run.name


def test_executor_settings_are_in_no_cache_key(tmp_path):
    model, data = tiny_setup(tmp_path)
    local = config(tmp_path, model, data)
    on_ray = config(tmp_path, model, data, **_ray("127.0.0.1:1", actors=3))
    inputs = {name: StageOutput(stage=name, cache_key="k" * 64, path=str(tmp_path), content_hash="h" * 64) for name in STAGES}
    for stage in ("score", "reference", "evaluate"):
        upstream = {name: inputs[name] for name in STAGES[stage].upstream}
        assert cache_key(on_ray, stage, upstream) == cache_key(local, stage, upstream)


def _preflight_config(tmp_path, **sets):
    model, data = tiny_setup(tmp_path)
    return config(tmp_path, model, data, **sets)


def test_preflight_refuses_an_unreachable_cluster_in_one_line(tmp_path):
    from pipeline import preflight

    port = free_port()
    cfg = _preflight_config(tmp_path, **{"run.executor": "ray", "run.ray_address": f"127.0.0.1:{port}"})
    with pytest.raises(preflight.PreflightError) as caught:
        preflight.check(cfg, ["ingest", "score"])
    [line] = caught.value.problems
    assert line.startswith(f"run.ray_address 127.0.0.1:{port}: no Ray cluster answers there") and "ray start --head" in line
    preflight.check(cfg, ["ingest"])  # a run of stages that map nothing needs no cluster


def test_cli_refuses_an_unreachable_cluster_before_any_work(tmp_path, capsys):
    from pipeline.cli import main

    model, data = tiny_setup(tmp_path)
    args = ["run", "--profile", "smoke", "--set", f"run.root={tmp_path / 'runs'}", "--set", f"run.cache_dir={tmp_path / 'cache'}",
            "--set", "data.source=file", "--set", f"data.path={data}", "--set", f"reference.model={model}",
            "--set", "run.executor=ray", "--set", f"run.ray_address=127.0.0.1:{free_port()}"]
    capsys.readouterr()  # the tiny model's set-up
    assert main(args) == 1
    [line] = capsys.readouterr().err.splitlines()
    assert line.startswith("alol: error: run.ray_address 127.0.0.1:") and "no Ray cluster answers there" in line
    assert not (tmp_path / "runs").exists(), "refused before any stage wrote anything"


def test_preflight_refuses_cpus_or_gpus_per_actor_that_no_node_has(tmp_path, ray_cluster):
    from pipeline import preflight

    ask = {"run.executor": "ray", "run.ray_address": ray_cluster, "run.workers.reference": {"gpus_per_actor": 1}}
    cfg = _preflight_config(tmp_path, **ask)
    with pytest.raises(preflight.PreflightError) as caught:
        preflight.check(cfg, [*SCORE_ONLY, "reference"])
    assert caught.value.problems == [
        f"run.workers.reference.gpus_per_actor is 1 but no node of the Ray cluster at {ray_cluster} has that many GPUs "
        "(the most on one node: 0); lower it (--set run.workers.reference.gpus_per_actor=0) or add a larger node"
    ]
    preflight.check(cfg, list(SCORE_ONLY))  # score asks for no GPU
    preflight.check(_preflight_config(tmp_path, **{**ask, "run.workers.reference": {"gpus_per_actor": 0}}), [*SCORE_ONLY, "reference"])
    cpus = _preflight_config(tmp_path, **{**ask, "run.workers.reference": {}, "run.workers.score": {"cpus_per_actor": 3}})
    with pytest.raises(preflight.PreflightError) as caught:
        preflight.check(cpus, list(SCORE_ONLY))
    [line] = caught.value.problems
    assert line.startswith("run.workers.score.cpus_per_actor is 3 but no node of the Ray cluster") and "(the most on one node: 2)" in line


def test_alol_run_on_ray_gives_the_local_content_hashes(tmp_path, ray_cluster, prefect_backend):
    """Through the CLI and the Prefect flow (a stage is one task, Ray runs inside it)."""
    import yaml

    from pipeline.cli import main
    from pipeline.storage import RunStore
    from schemas.config import apply_overrides
    from tests.support.train import overrides

    model, data = tiny_setup(tmp_path)
    settings = {**WHOLE_PIPELINE, "score.batch_size": 4}
    hashes = {}
    for name, extra in (("local", {}), ("ray", _ray(ray_cluster))):
        file = tmp_path / f"{name}.yaml"
        values = overrides(tmp_path / name, model, data, **settings, **extra)
        file.write_text(yaml.safe_dump(apply_overrides({}, values)), encoding="utf-8")
        assert main(["run", "--profile", "smoke", "--config", str(file), "--stages", *SCORE_ONLY, "reference"]) == 0
        store = RunStore(values["run.root"], values["run.name"])
        hashes[name] = {stage: store.current(stage).content_hash for stage in (*SCORE_ONLY, "reference")}
        assert _execution(store.current("reference")).executor == name
    assert hashes["ray"] == hashes["local"]
