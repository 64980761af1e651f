"""The flow's caching: hit on rerun, miss on a config or input change, recompute of a damaged output,
forced refresh, single-stage runs on the recorded upstream. Uses two small stage functions defined
here (registered in place of ingest and score) so only the caching machinery is under test."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pytest

from pipeline import runner
from pipeline.storage import RunStore
from schemas.config import load_config
from schemas.manifest import StageResult
from stages.io import StageReader
from tests.support.outputs import metrics

CALLS: list[str] = []
SCHEMA = pa.schema([("id", pa.string()), ("x", pa.int64())])


def fake_ingest(cfg, inputs, out):
    CALLS.append("ingest")
    n = cfg.data.max_rows_per_split or 5
    with out.table("ingest", SCHEMA) as t:
        t.write({"id": [f"r{i}" for i in range(n)], "x": list(range(n))})
    return StageResult(rows_in=n, rows_out=n, metrics=metrics("ingest", source_rows=n))


def fake_score(cfg, inputs, out):
    CALLS.append("score")
    table = inputs["ingest"].read("ingest")
    weight = cfg.score.components[0].weight
    xs = [v * weight for v in table.column("x").to_pylist()]
    with out.table("score", pa.schema([("id", pa.string()), ("reward", pa.float64())])) as t:
        t.write({"id": table.column("id").to_pylist(), "reward": xs})
    return StageResult(rows_in=table.num_rows, rows_out=table.num_rows, metrics=metrics("score", r_max=max(xs)))


@pytest.fixture
def fake_stages(monkeypatch):
    monkeypatch.setitem(runner.STAGES, "ingest", runner.StageSpec(f"{__name__}:fake_ingest", ("data",), ()))
    monkeypatch.setitem(runner.STAGES, "score", runner.StageSpec(f"{__name__}:fake_score", ("score",), ("ingest",)))
    CALLS.clear()
    return CALLS


def _run(tmp_path: Path, stages=("ingest", "score"), refresh=None, **sets):
    from pipeline.flow import run_alol

    overrides = {"run.root": str(tmp_path / "runs"), "run.name": "t", **sets}
    return run_alol(load_config("smoke", overrides=overrides), stages=list(stages), refresh=refresh)


def _states(tmp_path: Path) -> dict[str, bool]:
    state = RunStore(tmp_path / "runs", "t").state()["stages"]
    return {stage: entry["cached"] for stage, entry in state.items()}


def test_rerun_is_cached_and_config_change_recomputes_only_downstream(tmp_path, prefect_backend, fake_stages):
    first = _run(tmp_path)
    assert fake_stages == ["ingest", "score"]
    assert _states(tmp_path) == {"ingest": False, "score": False}

    again = _run(tmp_path)
    assert fake_stages == ["ingest", "score"], "a rerun with the same config computed something"
    assert _states(tmp_path) == {"ingest": True, "score": True}
    assert again["score"].content_hash == first["score"].content_hash

    changed = _run(tmp_path, **{"score.components": [{"name": "safety", "kind": "toxicity", "weight": 2.0}]})
    assert fake_stages == ["ingest", "score", "score"]
    assert _states(tmp_path) == {"ingest": True, "score": False}
    assert changed["score"].content_hash != first["score"].content_hash
    assert changed["score"].path != first["score"].path, "outputs of different keys must not share a folder"


def test_damaged_output_is_recomputed_not_used(tmp_path, prefect_backend, fake_stages):
    first = _run(tmp_path)
    part = next(Path(first["score"].path, "score").glob("*.parquet"))
    part.write_bytes(b"not parquet any more")
    _run(tmp_path)
    assert fake_stages == ["ingest", "score", "score"]
    StageReader(first["score"].path)  # verified again: intact

    Path(first["ingest"].path, "manifest.json").unlink()
    _run(tmp_path)
    assert fake_stages == ["ingest", "score", "score", "ingest"]
    assert _states(tmp_path) == {"ingest": False, "score": True}, "same ingest content -> score stays cached"


def test_refresh_and_single_stage_on_recorded_upstream(tmp_path, prefect_backend, fake_stages):
    first = _run(tmp_path)
    _run(tmp_path, stages=("score",), refresh=["score"])
    assert fake_stages == ["ingest", "score", "score"]
    assert _states(tmp_path)["score"] is False

    # Running score alone uses run.json's ingest even though the data config changed since.
    _run(tmp_path, stages=("score",), **{"data.max_rows_per_split": 3})
    assert fake_stages == ["ingest", "score", "score"]
    manifest = json.loads(Path(RunStore(tmp_path / "runs", "t").current("score").path, "manifest.json").read_text())
    assert manifest["rows_out"] == first["ingest"].rows["ingest"] != 3


def test_single_stage_without_upstream_output_is_a_clear_error(tmp_path, prefect_backend, fake_stages):
    with pytest.raises(runner.MissingUpstreamError, match="has no output of stage 'ingest'"):
        _run(tmp_path, stages=("score",))


def test_an_intact_folder_found_by_the_task_counts_as_cached(tmp_path, prefect_backend, fake_stages):
    """Without Prefect's result records the task finds the committed folder of the same key: no
    recompute, and run.json says cached (told by the runner, not guessed from timestamps)."""
    import shutil

    _run(tmp_path)
    records = tmp_path / "runs" / ".prefect-results"
    for entry in records.iterdir():
        if entry.name != "locks":
            shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
    _run(tmp_path)
    assert fake_stages == ["ingest", "score"]
    assert _states(tmp_path) == {"ingest": True, "score": True}


def test_a_stage_reading_an_undeclared_setting_fails(tmp_path, monkeypatch):
    def reads_train(cfg, inputs, out):
        return cfg.train.steps

    monkeypatch.setitem(runner.STAGES, "ingest", runner.StageSpec(f"{__name__}:fake_ingest", ("data",), ()))
    cfg = load_config("smoke", overrides={"run.root": str(tmp_path / "runs")})
    view = runner.StageConfig(cfg, "ingest")
    assert view.data == cfg.data
    with pytest.raises(runner.UndeclaredConfigError, match="read config section 'train'"):
        reads_train(view, {}, None)
    seed_only = runner.StageConfig(cfg, "reference")
    assert seed_only.run.seed == cfg.run.seed and seed_only.run.cache_dir == cfg.run.cache_dir
    with pytest.raises(runner.UndeclaredConfigError, match=r"read run\.name"):
        seed_only.run.name


def test_the_cache_folder_is_in_no_cache_key(tmp_path):
    from schemas.manifest import StageOutput
    from schemas.stages import STAGE_NAMES

    inputs = {s: StageOutput(stage=s, cache_key="k" * 64, path="/x", content_hash=s * 4) for s in STAGE_NAMES}
    here = load_config("smoke", overrides={"run.cache_dir": str(tmp_path / "a")})
    moved = load_config("smoke", overrides={"run.cache_dir": str(tmp_path / "b")})
    for stage in STAGE_NAMES:
        assert runner.cache_key(here, stage, inputs) == runner.cache_key(moved, stage, inputs), stage


def test_a_moved_run_root_keeps_every_output_cached(tmp_path, prefect_backend, fake_stages):
    """run.json and the stage results in Prefect's records hold paths relative to the run root (Prefect's
    own `metadata.storage_key` stays absolute, but lookups go by key under the current result storage)."""
    import shutil

    _run(tmp_path)
    old_root = str((tmp_path / "runs").resolve())
    shutil.move(tmp_path / "runs", tmp_path / "moved")
    assert old_root not in (tmp_path / "moved" / "t" / "run.json").read_text(encoding="utf-8")
    records = [p for p in (tmp_path / "moved" / ".prefect-results").iterdir() if p.is_file()]
    assert records
    for record in records:
        assert old_root not in json.loads(record.read_text(encoding="utf-8"))["result"], record
    (tmp_path / "runs").mkdir()  # _run's run.root: keep it empty, the run goes to the moved root
    moved = _run(tmp_path, **{"run.root": str(tmp_path / "moved")})
    assert fake_stages == ["ingest", "score"], "a moved run root recomputed something"
    state = RunStore(tmp_path / "moved", "t").state()["stages"]
    assert {s: e["cached"] for s, e in state.items()} == {"ingest": True, "score": True}
    assert all(not Path(e["path"]).is_absolute() for e in state.values())
    assert Path(moved["score"].path).is_relative_to((tmp_path / "moved").resolve())
    StageReader(moved["score"].path)


def test_the_run_record_says_who_computed_a_stage_and_how_long_this_run_waited(tmp_path, prefect_backend, fake_stages):
    import os
    import socket

    _run(tmp_path)
    first = RunStore(tmp_path / "runs", "t").state()["stages"]["score"]
    computed_by = first["computed_by"]
    assert (computed_by["host"], computed_by["pid"]) == (socket.gethostname(), os.getpid())
    assert computed_by["run"] and computed_by["run_id"], "the flow run that computed it is named"
    assert first["cached"] is False and first["computing_seconds"] == pytest.approx(computed_by["seconds"], abs=1e-3)
    assert first["computing_seconds"] + first["waiting_seconds"] == pytest.approx(first["seconds"], abs=2e-3)

    _run(tmp_path)
    again = RunStore(tmp_path / "runs", "t").state()["stages"]["score"]
    assert again["cached"] is True and again["computing_seconds"] == 0.0
    assert again["waiting_seconds"] == again["seconds"]
    assert again["computed_by"] == computed_by, "a cached stage keeps the story of the run that computed it"


def test_record_splits_computing_from_waiting(tmp_path):
    from schemas.manifest import Producer
    from stages.io import StageWriter
    from tests.support.outputs import metrics as stage_metrics

    store = RunStore(tmp_path / "runs", "t")
    writer = StageWriter(store.stage_dir("score", "k" * 64))
    writer.write_table("score", pa.table({"id": ["a"], "reward": [1.0]}))
    manifest = writer.commit(
        stage="score", cache_key="k" * 64, result=StageResult(rows_in=1, rows_out=1, metrics=stage_metrics("score")),
        config_fingerprints={}, config={}, inputs={}, code_version="c", versions={},
        producer=Producer(host="elsewhere", pid=4242, run="other-run"),
    )
    output = StageReader(store.stage_dir("score", "k" * 64)).output()
    store.record(output, cached=True, seconds=216.0)
    entry = store.state()["stages"]["score"]
    assert (entry["cached"], entry["computing_seconds"], entry["waiting_seconds"]) == (True, 0.0, 216.0)
    assert entry["computed_by"]["run"] == "other-run" and entry["computed_by"]["pid"] == 4242
    store.record(output, cached=False, seconds=manifest.seconds + 2.0)
    entry = store.state()["stages"]["score"]
    assert entry["computing_seconds"] == pytest.approx(manifest.seconds, abs=1e-3)
    assert entry["waiting_seconds"] == pytest.approx(2.0, abs=1e-3)


def test_a_warm_rerun_is_recorded_without_prefect_only_when_every_stage_is_cached(tmp_path, fake_stages):
    """pipeline.cached_run: every selected stage intact under its key -> recorded as cached, nothing computed;
    a stage that would compute, a damaged output or a refresh -> None and run.json untouched (the flow runs)."""
    from pipeline.cached_run import all_cached

    cfg = load_config("smoke", overrides={"run.root": str(tmp_path / "runs"), "run.name": "t"})
    store = RunStore.of(cfg)
    assert all_cached(cfg, stages=["ingest", "score"]) is None  # nothing computed yet
    ingest, _ = runner.execute_stage(cfg, "ingest", {})
    score, _ = runner.execute_stage(cfg, "score", {"ingest": ingest})
    for output in (ingest, score):
        store.record(output, cached=False, seconds=1.0)
    before = store.state_path.read_text()

    changed = load_config("smoke", overrides={"run.root": str(tmp_path / "runs"), "run.name": "t",
                                              "score.components": [{"name": "safety", "kind": "toxicity", "weight": 2.0}]})
    assert all_cached(changed, stages=["ingest", "score"]) is None
    assert all_cached(cfg, stages=["ingest", "score"], refresh=["score"]) is None
    assert store.state_path.read_text() == before

    outputs = all_cached(cfg, stages=["ingest", "score"])
    assert fake_stages == ["ingest", "score"], "the warm rerun computed something"
    assert {s: o.content_hash for s, o in outputs.items()} == {"ingest": ingest.content_hash, "score": score.content_hash}
    assert _states(tmp_path) == {"ingest": True, "score": True}
    assert all_cached(cfg, stages=["score"]) is not None  # a single stage on run.json's ingest

    refused = []
    all_cached(cfg, stages=["score"], before_recording=lambda c, s: refused.append(s))
    assert refused == [["score"]], "the CLI's writability check runs before run.json is written"

    part = next(Path(score.path, "score").glob("*.parquet"))
    part.write_bytes(b"damaged")
    assert all_cached(cfg, stages=["ingest", "score"]) is None
    assert all_cached(cfg, stages=["evaluate"]) is None  # no recorded upstream: the flow's error, not ours
