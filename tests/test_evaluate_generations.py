"""The evaluate stage's pieces that need no upstream: prompt sets, the generation cache and its key."""

from __future__ import annotations

import pyarrow.parquet as pq
import pytest

from schemas.config import load_config
from schemas.evaluate import PI_REF, PI_THETA, eval_schema
from stages.cache import ParquetCache
from stages.catalog import PI_REF_FOLDER
from stages.evaluate.generation import (
    cached_generations,
    generation_code_version,
    generation_settings,
    generations_key,
    model_fingerprint,
)
from stages.evaluate.prompts import donotanswer_prompts
from stages.evaluate.table import eval_table
from stages.io import StageReader
from tests.support.outputs import commit_output, metrics

KEY = "ab" * 32


def test_donotanswer_prompts_are_seeded_user_turns():
    ids, prompts = donotanswer_prompts(25, seed=3)
    assert len(ids) == 25 == len(set(ids))
    assert all(i.startswith("dna:") for i in ids)
    assert all(len(p) == 1 and p[0]["role"] == "user" and p[0]["content"].strip() for p in prompts)
    assert donotanswer_prompts(25, seed=3) == (ids, prompts)
    assert donotanswer_prompts(25, seed=4)[0] != ids
    all_ids, _ = donotanswer_prompts(10_000, seed=0)
    assert len(all_ids) == 939  # every Do-Not-Answer question, none twice


def test_cached_generations_produce_once(tmp_path):
    calls = []

    def produce():
        calls.append(1)
        return ["first answer", "second answer"]

    cache = ParquetCache(tmp_path / "generations")
    first, hit = cached_generations(cache, KEY, ["a", "b"], produce)
    assert (first, hit, len(calls)) == (["first answer", "second answer"], False, 1)
    again, hit = cached_generations(cache, KEY, ["a", "b"], produce)
    assert (again, hit, len(calls)) == (first, True, 1)
    assert cache.path(KEY) == tmp_path / "generations" / "ab" / f"{KEY}.parquet"
    assert pq.read_table(cache.path(KEY))["id"].to_pylist() == ["a", "b"]
    # Each id keeps its own response, in the order asked for.
    swapped, hit = cached_generations(cache, KEY, ["b", "a"], produce)
    assert (swapped, hit, len(calls)) == (["second answer", "first answer"], True, 1)
    # Ids the entry does not cover are not trusted: generated again and stored.
    _, hit = cached_generations(cache, KEY, ["a", "c"], produce)
    assert (hit, len(calls)) == (False, 2)
    assert pq.read_table(cache.path(KEY))["id"].to_pylist() == ["a", "c"]
    assert [p.name for p in cache.path(KEY).parent.iterdir()] == [f"{KEY}.parquet"]  # no temporaries left


def test_cached_generations_refuse_a_wrong_count(tmp_path):
    cache = ParquetCache(tmp_path / "generations")
    with pytest.raises(RuntimeError, match="1 responses for 2 prompts"):
        cached_generations(cache, KEY, ["a", "b"], lambda: ["only one"])
    assert not cache.path(KEY).exists()


def test_generation_code_version_follows_tokenisation_generation_and_library_versions(monkeypatch):
    """An edit of stages/models/tokenize.py or generate.py, or another torch or transformers, generates
    again; an edit of the model store or of the log-prob code does not."""
    import inspect
    from importlib import metadata

    from stages.models import generate, logprobs, store, tokenize

    real_source, real_version = inspect.getsource, metadata.version
    unchanged = generation_code_version()
    for module, counts in ((tokenize, True), (generate, True), (store, False), (logprobs, False)):
        monkeypatch.setattr(inspect, "getsource", lambda m, edited=module: real_source(m) + ("#" if m is edited else ""))
        assert (generation_code_version() != unchanged) is counts, module.__name__
    monkeypatch.setattr(inspect, "getsource", real_source)
    assert generation_code_version() == unchanged
    monkeypatch.setattr(metadata, "version", lambda pkg: "0.0" if pkg == "transformers" else real_version(pkg))
    assert generation_code_version() != unchanged


def test_generations_key_covers_model_prompts_and_settings():
    settings = generation_settings(load_config("smoke"))
    prompts = [[{"role": "user", "content": "hi"}]]
    key = generations_key("model", ["a"], prompts, settings, "cpu")
    assert key == generations_key("model", ["a"], prompts, dict(settings), "cpu")
    assert key != generations_key("other", ["a"], prompts, settings, "cpu")
    assert key != generations_key("model", ["b"], prompts, settings, "cpu")
    assert key != generations_key("model", ["a"], [[{"role": "user", "content": "hello"}]], settings, "cpu")
    assert key != generations_key("model", ["a"], prompts, {**settings, "max_new_tokens": 99}, "cpu")
    assert key != generations_key("model", ["a"], prompts, settings, "cuda")
    # Training settings do not enter the key: a second algorithm reuses pi_ref's generations.
    other_algorithm = generation_settings(load_config("smoke", overrides={"train.algorithm": "nll"}))
    assert generations_key("model", ["a"], prompts, other_algorithm, "cpu") == key


def _reference_output(tmp_path, weights: bytes) -> StageReader:
    files = {f"{PI_REF_FOLDER}/config.json": "{}", f"{PI_REF_FOLDER}/model.safetensors": weights}
    return commit_output(tmp_path / "reference" / "key", "reference", files=files, metrics_model=metrics("reference", pi_ref="sft"))


def test_model_fingerprint_follows_content(tmp_path):
    reference = _reference_output(tmp_path / "one", b"weights")
    inside = model_fingerprint(reference.path(PI_REF_FOLDER), reference)
    # A folder outside the reference output with the same files is hashed to the same fingerprint.
    base = tmp_path / "base"
    base.mkdir()
    (base / "config.json").write_text("{}")
    (base / "model.safetensors").write_bytes(b"weights")
    assert model_fingerprint(base, reference) == inside
    (base / "model.safetensors").write_bytes(b"other weights")
    assert model_fingerprint(base, reference) != inside
    changed = _reference_output(tmp_path / "two", b"fine-tuned")
    assert model_fingerprint(changed.path(PI_REF_FOLDER), changed) != inside


def test_eval_table_has_a_row_per_model_and_prompt():
    import numpy as np

    schema = eval_schema(["safety"])
    prompts = [[{"role": "user", "content": "q1"}], [{"role": "user", "content": "q2"}]]
    responses = {PI_THETA: ["one two", "three"], PI_REF: ["", "four five six"]}
    scores = {
        PI_THETA: {"safety": np.array([0.9, 0.8]), "reward": np.array([0.9, 0.8])},
        PI_REF: {"safety": np.array([0.1, 0.2]), "reward": np.array([0.1, 0.2])},
    }
    table = eval_table(["a", "b"], prompts, responses, scores, schema)
    assert table.schema == schema
    rows = table.to_pylist()
    assert [(r["id"], r["model"], r["length_words"]) for r in rows] == [
        ("a", "pi_theta", 2), ("b", "pi_theta", 1), ("a", "pi_ref", 0), ("b", "pi_ref", 3),
    ]
    assert rows[3]["reward"] == pytest.approx(0.2) and rows[1]["safety"] == pytest.approx(0.8)
    assert rows[0]["prompt"] == prompts[0]
