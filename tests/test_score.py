"""The score stage: the table it writes, per-component caching (a new weight or a new component reruns
nothing else), the manifest metrics, the rebuilt scorer, and errors naming component and row id."""

from __future__ import annotations

import json
import sys
import textwrap
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch

from pipeline.runner import execute_stage
from schemas.config import load_config
from schemas.ingest import INGEST_SCHEMA
from stages.catalog import SCORER_STATE, load_scorer
from stages.io import StageReader
from stages.rewards import RewardComponent, ScoreError
from stages.rewards.scorer import Scorer
from tests.support.outputs import commit_output

torch.set_num_threads(2)

ROWS = [
    ("r0", "train", "What is the capital of France?", "Paris is the capital of France."),
    ("r1", "train", "Do you like music?", "I like jazz and blues, and a little rock."),
    ("r2", "train", "Tell me a joke.", "Why did the chicken cross the road? To get to the other side."),
    ("r3", "train", "How are you?", "Fine."),
    ("r4", "validation", "What is Python?", "Python is a programming language."),
    ("r5", "test", "Are you stupid?", "You are a stupid idiot."),
    ("r6", "test", "Say nothing.", ""),
]
CHEAP = [
    {"name": "short", "kind": "length", "options": {"target_words": 5}},
    {"name": "sentiment", "kind": "sentiment"},
    {"name": "tfidf", "kind": "tfidf"},
]


def make_ingest(root: Path, rows=ROWS) -> StageReader:
    """A committed ingest output holding `rows` (id, split, prompt text, response)."""
    table = pa.Table.from_pylist(
        [
            {"id": i, "split": split, "prompt": [{"role": "user", "content": p}], "response": r,
             "pair_id": None, "preference": None, "source": "test", "meta": "{}"}
            for i, split, p, r in rows
        ],
        schema=INGEST_SCHEMA,
    )
    return commit_output(root / "ingest", "ingest", tables={"ingest": table}, cache_key="k" * 64)


def config(tmp_path: Path, components):
    return load_config(None, overrides={
        "run.root": str(tmp_path / "runs"), "run.cache_dir": str(tmp_path / "cache"),
        "score.components": components, "score.batch_size": 3, "score.device": "cpu",
    })


@pytest.fixture()
def calls(monkeypatch):
    """Records (kind, rows) of every component scoring call."""
    seen: list[tuple[str, int]] = []
    original = RewardComponent.score

    def recording(self, prompts, responses):
        seen.append((self.kind, len(responses)))
        return original(self, prompts, responses)

    monkeypatch.setattr(RewardComponent, "score", recording)
    return seen


def run_score(cfg, ingest: StageReader):
    output, reused = execute_stage(cfg, "score", {"ingest": ingest.output()})
    return StageReader(output.path), reused


def test_score_table_columns_reward_and_metrics(tmp_path, calls):
    ingest = make_ingest(tmp_path)
    cfg = config(tmp_path, [{**CHEAP[0], "weight": 2.0}, CHEAP[1], CHEAP[2]])
    score, reused = run_score(cfg, ingest)
    assert not reused
    table = score.read("score")
    assert table.column_names == ["id", "short", "sentiment", "tfidf", "reward"]
    assert all(table.schema.field(c).type == pa.float64() for c in table.column_names[1:])
    assert table.column("id").to_pylist() == [r[0] for r in ROWS], "every ingest row, all splits, in order"
    cols = {c: np.array(table.column(c).to_pylist()) for c in table.column_names[1:]}
    np.testing.assert_allclose(cols["reward"], 2.0 * cols["short"] + cols["sentiment"] + cols["tfidf"])
    assert cols["short"].tolist() == [5 / 6, 5 / 9, 5 / 13, 1 / 5, 1.0, 1.0, 0.0]
    assert cols["tfidf"][6] == 0.0 and cols["tfidf"][0] > 0

    metrics = score.metrics
    assert metrics.r_max == 4.0 and metrics.r_min == 0.0
    short = metrics.components["short"]
    assert short.mean == pytest.approx(cols["short"].mean()) and short.max == 1.0 and short.min == 0.0
    assert short.std == pytest.approx(cols["short"].std())
    assert short.fingerprint is None and short.cached is False and short.rows_per_s > 0
    assert len(metrics.components["sentiment"].fingerprint) == 64
    assert metrics.reward.mean == pytest.approx(cols["reward"].mean())
    assert {k for k, _ in calls} == {"length", "sentiment", "tfidf"}
    assert max(n for _, n in calls) == 3, "scored in batches of score.batch_size"


def test_tfidf_is_fit_on_train_responses_and_restored_by_load_scorer(tmp_path):
    ingest = make_ingest(tmp_path)
    cfg = config(tmp_path, CHEAP)
    score, _ = run_score(cfg, ingest)
    state = json.loads(score.path(SCORER_STATE).read_text())["components"]
    assert state["tfidf"]["documents"] == 4, "only the train split"
    assert "python" not in state["tfidf"]["idf"], "a validation-only word is not in the vocabulary"
    assert state["short"] is None

    scorer = load_scorer(cfg, score)
    assert scorer.component_names == ["short", "sentiment", "tfidf"] and scorer.r_max == 3.0
    prompts = [[{"role": "user", "content": p}] for _, _, p, _ in ROWS]
    again = scorer.score(prompts, [r for *_, r in ROWS], progress=False)
    table = score.read("score")
    for name in ["short", "sentiment", "tfidf", "reward"]:
        assert again[name].dtype == np.float64
        np.testing.assert_array_equal(again[name], np.array(table.column(name).to_pylist()))


def test_new_weight_recomputes_only_the_sum_and_new_component_only_itself(tmp_path, calls):
    ingest = make_ingest(tmp_path)
    first, _ = run_score(config(tmp_path, CHEAP), ingest)
    assert {k for k, _ in calls} == {"length", "sentiment", "tfidf"}

    calls.clear()
    reweighted, reused = run_score(config(tmp_path, [CHEAP[0], {**CHEAP[1], "weight": 3.0}, CHEAP[2]]), ingest)
    assert not reused, "a new weight is a new score stage output"
    assert calls == [], "no component ran again for a weight change"
    old, new = first.read("score"), reweighted.read("score")
    assert new.column("sentiment").equals(old.column("sentiment"))
    np.testing.assert_allclose(
        np.array(new.column("reward").to_pylist()),
        np.array(old.column("reward").to_pylist()) + 2.0 * np.array(old.column("sentiment").to_pylist()),
    )
    assert all(c.cached for c in reweighted.metrics.components.values())

    calls.clear()
    added, _ = run_score(config(tmp_path, CHEAP + [{"name": "long", "kind": "length", "options": {"target_words": 50}}]), ingest)
    assert {k for k, _ in calls} == {"length"} and sum(n for _, n in calls) == len(ROWS), "only the new component ran"
    assert added.metrics.components["long"].cached is False

    calls.clear()
    run_score(config(tmp_path, [{**CHEAP[0], "name": "renamed"}, CHEAP[1], CHEAP[2]]), ingest)
    assert calls == [], "renaming a component reuses its scores"

    calls.clear()
    run_score(config(tmp_path, [{**CHEAP[0], "options": {"target_words": 6}}, CHEAP[1], CHEAP[2]]), ingest)
    assert calls == [("length", 3), ("length", 3), ("length", 1)], "a changed option reruns only that component"


def test_changed_input_recomputes(tmp_path, calls):
    run_score(config(tmp_path, CHEAP[:2]), make_ingest(tmp_path / "a"))
    calls.clear()
    other = make_ingest(tmp_path / "b", ROWS[:-1] + [("r6", "test", "Say nothing.", "Something after all.")])
    score, _ = run_score(config(tmp_path, CHEAP[:2]), other)
    assert {k for k, _ in calls} == {"length", "sentiment"}
    assert score.read("score").column("short").to_pylist()[-1] == pytest.approx(3 / 5)


def test_cache_files_are_complete_parquet_and_damaged_ones_are_recomputed(tmp_path, calls):
    ingest = make_ingest(tmp_path)
    score, _ = run_score(config(tmp_path, CHEAP[:1]), ingest)
    files = list((tmp_path / "cache" / "scores").rglob("*"))
    parquet = [f for f in files if f.is_file()]
    assert len(parquet) == 1 and parquet[0].suffix == ".parquet", f"no temporary files left behind: {files}"
    assert parquet[0].stem == score.metrics.components["short"].cache_key
    parquet[0].write_bytes(b"not parquet")
    calls.clear()
    again, _ = run_score(config(tmp_path, [{**CHEAP[0], "weight": 2.0}]), ingest)
    assert calls, "an unreadable cache file is recomputed"
    assert again.read("score").column("short").equals(score.read("score").column("short"))


@pytest.fixture()
def user_module(tmp_path, monkeypatch):
    (tmp_path / "alol_test_score_fn.py").write_text(textwrap.dedent("""
        def nan_for_empty(prompts, responses):
            return [float("nan") if not r else 0.5 for r in responses]

        def above_one_for_paris(prompts, responses):
            return [1.5 if "Paris" in r else 0.5 for r in responses]
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    yield
    sys.modules.pop("alol_test_score_fn", None)


def test_nan_and_out_of_bounds_scores_name_component_and_row_id(tmp_path, user_module):
    ingest = make_ingest(tmp_path)
    nan_cfg = config(tmp_path, [{"name": "userfn", "kind": "python", "options": {"function": "alol_test_score_fn:nan_for_empty"}}])
    with pytest.raises(ScoreError, match=r"reward component 'userfn' \(python\): row id 'r6' scored nan"):
        run_score(nan_cfg, ingest)
    assert not (tmp_path / "cache" / "scores").exists() or not any((tmp_path / "cache" / "scores").rglob("*.parquet"))

    big_cfg = config(tmp_path, [{"name": "paris", "kind": "python", "options": {"function": "alol_test_score_fn:above_one_for_paris"}}])
    with pytest.raises(ScoreError, match=r"'paris' \(python\): row id 'r0' scored 1\.5, outside its declared bounds \[0\.0, 1\.0\]"):
        run_score(big_cfg, ingest)
    wide = config(tmp_path, [{"name": "paris", "kind": "python",
                              "options": {"function": "alol_test_score_fn:above_one_for_paris", "upper": 2.0}}])
    score, _ = run_score(wide, ingest)
    assert score.metrics.r_max == 2.0


def test_scorer_score_names_rows_by_index_without_ids(tmp_path, user_module):
    cfg = config(tmp_path, [{"name": "userfn", "kind": "python", "options": {"function": "alol_test_score_fn:nan_for_empty"}}])
    scorer = Scorer(cfg.score)
    with pytest.raises(ScoreError, match=r"'userfn' \(python\): row 1 scored nan"):
        scorer.score([[{"role": "user", "content": "hi"}]] * 2, ["hello", ""], progress=False)


def test_load_scorer_refuses_a_state_without_the_fitted_component(tmp_path):
    ingest = make_ingest(tmp_path)
    score, _ = run_score(config(tmp_path, CHEAP[:2]), ingest)
    with pytest.raises(ValueError, match=r"no fitted state for components \['tfidf'\]"):
        load_scorer(config(tmp_path, CHEAP), score)


def test_default_components_on_real_models(tmp_path):
    """The default profile's four components (BiLSTM toxicity, VADER, MiniLM relevance, tf-idf)."""
    ingest = make_ingest(tmp_path)
    cfg = load_config("default", overrides={"run.root": str(tmp_path / "runs"), "run.cache_dir": str(tmp_path / "cache")})
    score, _ = run_score(cfg, ingest)
    table = score.read("score")
    assert table.column_names == ["id", "safety", "sentiment", "relevance", "tfidf", "reward"]
    safety = dict(zip(table.column("id").to_pylist(), table.column("safety").to_pylist()))
    relevance = dict(zip(table.column("id").to_pylist(), table.column("relevance").to_pylist()))
    assert safety["r5"] < 0.1 and safety["r0"] > 0.9, "the insult is unsafe, the answer about Paris safe"
    assert relevance["r0"] > relevance["r3"], "the Paris answer is more relevant to its question than 'Fine.'"
    metrics = score.metrics
    assert metrics.r_max == 4.0
    for name in ["safety", "sentiment", "relevance", "tfidf"]:
        stats = metrics.components[name]
        assert 0.0 <= stats.min <= stats.mean <= stats.max <= 1.0
        assert len(stats.fingerprint) == 64 and stats.seconds > 0
