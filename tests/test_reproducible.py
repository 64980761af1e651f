"""Every stage output is a function of its inputs, config and code: the same cache key computed again
gives the same files, byte for byte, so the same content hash and a downstream cache key that does
not move. Wall-clock figures live in the manifest's metrics, which the content hash does not cover.

Runs the tiny learnable pipeline of tests/support/train.py (a random Llama that learns to say
"cats" in a few steps, so the train stage writes `policy/` and evaluate generates with it).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pipeline.runner import STAGES, execute_stage
from pipeline.storage import RunStore
from schemas.stages import STAGE_NAMES
from stages.io import StageReader
from tests.support.train import WHOLE_PIPELINE, config, run_stages, tiny_setup

REPO = Path(__file__).resolve().parent.parent
SETTINGS = WHOLE_PIPELINE


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    """(cfg, {stage: output}) of the whole tiny pipeline, train and evaluate included."""
    torch.set_num_threads(1)  # tiny matrices: a second thread only waits for a core on a busy machine
    tmp = tmp_path_factory.mktemp("reproducible")
    model, data = tiny_setup(tmp)
    cfg = config(tmp, model, data, **SETTINGS)
    outputs = run_stages(cfg, STAGE_NAMES)
    assert StageReader(outputs["train"].path).metrics.policy_is_reference is False, "train wrote policy/"
    assert StageReader(outputs["score"].path).metrics.components["informative"].mean > 0, "tf-idf was fitted"
    return cfg, outputs


def file_hashes(reader: StageReader) -> dict[str, str]:
    return {f.path: f.sha256 for f in reader.manifest.outputs}


@pytest.mark.parametrize("stage", STAGE_NAMES)
def test_the_same_key_computed_again_gives_the_same_files(pipeline, stage):
    cfg, outputs = pipeline
    first = StageReader(outputs[stage].path)
    before, started = file_hashes(first), first.manifest.started
    again, reused = execute_stage(cfg, stage, {n: outputs[n] for n in STAGES[stage].upstream}, refresh=True)
    second = StageReader(again.path)
    assert not reused and second.manifest.started > started, "computed again, not reused"
    assert again.cache_key == outputs[stage].cache_key
    after = file_hashes(second)
    changed = sorted(path for path in before.keys() | after.keys() if before.get(path) != after.get(path))
    assert changed == [], f"{stage}: files that differ between two computations of one key"
    assert again.content_hash == outputs[stage].content_hash


FRESH_PROCESS = """
import json, sys
import torch
from pipeline.runner import STAGES, execute_stage
from schemas.config import AlolConfig
from schemas.stages import STAGE_NAMES
from stages.io import StageReader

torch.set_num_threads(1)
cfg = AlolConfig.model_validate_json(sys.stdin.read())
outputs, files = {}, {}
for stage in STAGE_NAMES:
    outputs[stage], _ = execute_stage(cfg, stage, {n: outputs[n] for n in STAGES[stage].upstream}, refresh=True)
    files[stage] = {f.path: f.sha256 for f in StageReader(outputs[stage].path).manifest.outputs}
print(json.dumps(files))
"""


def test_another_process_computes_the_same_files(pipeline):
    # A fresh interpreter with another hash seed (set and dict-of-set order) and the Hugging Face
    # offline flag flipped (transformers writes it into a saved tokenizer's config), into another run.
    cfg, outputs = pipeline
    other = cfg.model_copy(update={"run": cfg.run.model_copy(update={"name": "fresh-process"})})
    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONHASHSEED": "12345", "OMP_NUM_THREADS": "1",
           "HF_HUB_OFFLINE": "0", "TRANSFORMERS_OFFLINE": "0"}
    done = subprocess.run([sys.executable, "-c", FRESH_PROCESS], input=other.model_dump_json(), cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    files = json.loads(done.stdout.strip().splitlines()[-1])
    for stage in STAGE_NAMES:
        before = file_hashes(StageReader(outputs[stage].path))
        changed = sorted(path for path in before.keys() | files[stage].keys() if before.get(path) != files[stage].get(path))
        assert changed == [], f"{stage}: files that differ when another process computes the same key"


def test_refreshing_train_in_the_flow_leaves_evaluate_cached(pipeline, tmp_path, prefect_backend):
    from pipeline.flow import run_alol

    cfg, outputs = pipeline
    cfg = cfg.model_copy(update={"run": cfg.run.model_copy(update={"root": str(tmp_path / "runs"), "name": "flow"})})
    store = RunStore.of(cfg)
    first = run_alol(cfg)
    assert not any(entry["cached"] for entry in store.state()["stages"].values()), "a full run computes every stage"
    assert {stage: first[stage].content_hash for stage in STAGE_NAMES} == {
        stage: outputs[stage].content_hash for stage in STAGE_NAMES
    }, "the flow computes what execute_stage computed"
    evaluate_started = StageReader(first["evaluate"].path).manifest.started
    train_started = StageReader(first["train"].path).manifest.started

    again = run_alol(cfg, refresh=["train"])
    state = store.state()["stages"]
    assert {stage: entry["cached"] for stage, entry in state.items()} == {
        "ingest": True, "score": True, "reference": True, "advantage": True, "train": False, "evaluate": True,
    }
    assert StageReader(again["train"].path).manifest.started > train_started, "train was computed again"
    assert again["train"].content_hash == first["train"].content_hash
    assert again["evaluate"] == first["evaluate"]
    assert StageReader(again["evaluate"].path).manifest.started == evaluate_started, "evaluate was not recomputed"
