"""Evaluate stage on a tiny random Llama: ingest -> ... -> train -> evaluate for two algorithms.

Checks the `eval` table against independent generation and scoring, the metrics against the table,
pi_ref's cached generations being reused by the second algorithm, and the report files. Whether a
few random steps beat pi_ref is chance, so a third evaluation reads a train output holding another
random model as its `policy/`: the policy's own generations are checked there whatever training did.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch

from pipeline.runner import execute_stage
from pipeline.storage import RunStore
from schemas.evaluate import MODELS, PI_REF, PI_THETA
from schemas.train import TRAIN_LOG_SCHEMA
from stages.catalog import POLICY_FOLDER, load_scorer, policy_model_path, reference_model_path
from stages.io import StageReader
from stages.metrics import distinct_n, length_controlled_fit
from stages.models.generate import generate
from stages.models.store import load_causal_lm, load_tokenizer
from stages.models.tokenize import encode_pair
from tests.support.models import tiny_model_folder
from tests.support.outputs import commit_output
from tests.support.outputs import metrics as stage_metrics
from tests.support.reference import tiny_config
from tests.support.tables import PNG_SIGNATURE, parse_markdown_tables

ALGORITHMS = ("a_lol", "nll")
TRAIN = {
    "train.steps": 2,
    "train.batch_size": 2,
    "train.grad_accumulation": 1,
    "train.eval_every": 2,
    "train.learning_rate": 1e-3,
    "evaluate.max_new_tokens": 5,
    "evaluate.batch_size": 3,
    "evaluate.bootstrap_samples": 100,
    "score.components": [
        {"name": "length", "kind": "length", "options": {"target_words": 6}},
        {"name": "sentiment", "kind": "sentiment", "weight": 2.0},
        {"name": "safety", "kind": "toxicity"},
    ],
}
HARMLESSNESS_PROMPTS = 3


def judges(folder: Path) -> list[dict]:
    """A fluency judge under another tiny random model (the independent LM) and the profanity classifier."""
    return [{"name": "fluency", "kind": "fluency", "options": {"model": str(folder), "max_prompt_tokens": 24}},
            {"name": "inoffensive", "kind": "profanity"}]


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
    """(cfg, readers of the shared upstream, {algorithm: (train reader, evaluate reader)})."""
    torch.set_num_threads(2)
    tmp = tmp_path_factory.mktemp("evaluate")
    model = tiny_model_folder(tmp / "tiny")
    judge = judges(tiny_model_folder(tmp / "judge", seed=2))
    outputs = {}
    results = {}
    for algorithm in ALGORITHMS:
        cfg = tiny_config(tmp, model, **TRAIN, **{"train.algorithm": algorithm, "evaluate.judges": judge})
        if not outputs:
            outputs["ingest"], _ = execute_stage(cfg, "ingest", {})
            outputs["score"], _ = execute_stage(cfg, "score", {"ingest": outputs["ingest"]})
            outputs["reference"], _ = execute_stage(cfg, "reference", {k: outputs[k] for k in ("ingest", "score")})
            outputs["advantage"], _ = execute_stage(cfg, "advantage", {k: outputs[k] for k in ("score", "reference")})
        train, _ = execute_stage(cfg, "train", dict(outputs))
        evaluate, reused = execute_stage(cfg, "evaluate", {**outputs, "train": train})
        assert not reused
        results[algorithm] = (cfg, StageReader(train.path), StageReader(evaluate.path))
    cfg = tiny_config(tmp, model, **TRAIN, **{"evaluate.harmlessness_prompts": HARMLESSNESS_PROMPTS, "evaluate.judges": judge})
    train = _train_output_with_policy(cfg, tiny_model_folder(tmp / "other", seed=1))
    evaluate, _ = execute_stage(cfg, "evaluate", {**outputs, "train": train.output()})
    results["other policy"] = (cfg, train, StageReader(evaluate.path))
    readers = {name: StageReader(output.path) for name, output in outputs.items()}
    return tmp, readers, results


def _train_output_with_policy(cfg, policy_folder: Path) -> StageReader:
    """A committed train output whose `policy/` is the given model folder and that says it beat pi_ref."""
    folder = RunStore(cfg.run.root, cfg.run.name).stage_dir("train", "0" * 64)
    files = {f"{POLICY_FOLDER}/{p.relative_to(policy_folder).as_posix()}": p.read_bytes()
             for p in policy_folder.rglob("*") if p.is_file()}
    rows = [{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.5, "validation_reward": 1.2}]
    train_metrics = stage_metrics("train", algorithm=cfg.train.algorithm, policy_is_reference=False, best_step=2,
                            best_validation_reward=1.2, reference_validation_reward=1.0, train_seconds=1.0)
    return commit_output(
        folder, "train", tables={"train_log": pa.Table.from_pylist(rows, schema=TRAIN_LOG_SCHEMA)}, files=files,
        metrics_model=train_metrics, cache_key="0" * 64, config={"train": cfg.train.model_dump(mode="json")},
    )


def _rows(reader: StageReader, model: str) -> list[dict]:
    return [r for r in reader.read("eval").to_pylist() if r["model"] == model]


def test_pi_ref_generations_are_generated_once_and_reused(evaluated):
    tmp, _, results = evaluated
    (_, _, first), (_, _, second) = results["a_lol"], results["nll"]
    third = results["other policy"][2]
    assert first.metrics.reference_generations_cached == 0
    assert second.metrics.reference_generations_cached == 1
    assert third.metrics.reference_generations_cached == 1
    # One entry for the test prompts, one for the Do-Not-Answer prompts of the third evaluation.
    assert len(list((tmp / "cache" / "generations").rglob("*.parquet"))) == 2
    assert _rows(first, PI_REF) == _rows(second, PI_REF) == _rows(third, PI_REF)


def test_a_policy_that_beat_pi_ref_generates_its_own_responses(evaluated):
    _, _, results = evaluated
    _, train, evaluate = results["other policy"]
    assert not json.loads(evaluate.path("metrics.json").read_text())["policy_is_reference"]
    policy, reference = _rows(evaluate, PI_THETA), _rows(evaluate, PI_REF)
    assert [r["response"] for r in policy] != [r["response"] for r in reference]


def test_eval_rows_are_independent_greedy_generations_scored_by_the_score_stage(evaluated):
    _, readers, results = evaluated
    ingest = readers["ingest"].read("ingest").to_pylist()
    test_prompts = {r["id"]: r["prompt"] for r in ingest if r["split"] == "test"}
    for algorithm, (cfg, train, evaluate) in results.items():
        table = evaluate.read("eval").to_pylist()
        assert len(table) == 2 * len(test_prompts)
        for model in (PI_REF, PI_THETA):
            rows = _rows(evaluate, model)
            assert [r["id"] for r in rows] == sorted(test_prompts)
            if model == PI_REF:
                path = reference_model_path(cfg, readers["reference"])
            elif train.metrics.policy_is_reference:
                assert [r["response"] for r in rows] == [r["response"] for r in _rows(evaluate, PI_REF)]
                continue
            else:
                path = policy_model_path(cfg, train, readers["reference"])
            prompts = [test_prompts[r["id"]] for r in rows]
            expected = generate(
                load_causal_lm(path), load_tokenizer(path), prompts,
                max_prompt_tokens=cfg.reference.max_prompt_tokens, max_new_tokens=5, batch_size=1,
            )
            assert [r["response"] for r in rows] == expected, (algorithm, model)
            scores = load_scorer(cfg, readers["score"]).score(prompts, expected, progress=False)
            for name in ("length", "sentiment", "safety", "reward"):
                np.testing.assert_allclose([r[name] for r in rows], scores[name], atol=1e-12)
            assert [r["length_words"] for r in rows] == [len(t.split()) for t in expected]


def test_metrics_agree_with_the_eval_table(evaluated):
    _, _, results = evaluated
    for algorithm, (cfg, train, evaluate) in results.items():
        metrics = json.loads(evaluate.path("metrics.json").read_text())
        assert metrics["algorithm"] == cfg.train.algorithm == train.manifest.config["train"]["algorithm"]
        policy, reference = _rows(evaluate, PI_THETA), _rows(evaluate, PI_REF)
        for model, rows in ((PI_THETA, policy), (PI_REF, reference)):
            m = metrics["models"][model]
            assert m["reward"]["mean"] == pytest.approx(np.mean([r["reward"] for r in rows]))
            assert m["reward"]["low"] <= m["reward"]["mean"] <= m["reward"]["high"]
            assert m["distinct_2"] == pytest.approx(distinct_n([r["response"] for r in rows], 2))
            assert m["length_words"] == pytest.approx(np.mean([r["length_words"] for r in rows]))
        diffs = np.array([p["reward"] - r["reward"] for p, r in zip(policy, reference)])
        win = metrics["win_rate"]
        assert (win["wins"], win["losses"]) == (int(np.sum(diffs > 1e-9)), int(np.sum(diffs < -1e-9)))
        assert win["wins"] + win["ties"] + win["losses"] == len(policy)
        assert metrics["difference"]["reward"]["mean"] == pytest.approx(diffs.mean())
        assert metrics["policy_is_reference"] == train.metrics.policy_is_reference
        assert metrics["advantage"]["rows"] == 24  # the training rows of the tiny data set
        assert metrics["train"]["best_step"] == train.metrics.best_step
        assert not [key for key in metrics["train"] if key.endswith(("_seconds", "_per_s"))], "no timing in metrics.json"


def _fluency(folder: Path, prompt, response: str, max_prompt_tokens: int) -> float:
    """Mean log-prob of the response tokens (EOS appended) after the rendered prompt: one plain forward."""
    tokenizer, model = load_tokenizer(folder), load_causal_lm(folder)
    prompt_ids, response_ids = encode_pair(tokenizer, prompt, response, max_prompt_tokens, 128)
    ids = torch.tensor([prompt_ids + response_ids])
    with torch.no_grad():
        logprobs = torch.log_softmax(model(input_ids=ids).logits[0].double(), dim=-1)
    positions = range(len(prompt_ids) - 1, len(prompt_ids) + len(response_ids) - 1)
    return float(np.mean([logprobs[p, t].item() for p, t in zip(positions, response_ids)]))


def test_judges_score_both_models_beside_the_reward_and_are_cached(evaluated):
    from profanity_check import predict_prob

    tmp, _, results = evaluated
    response_sets = set()
    for cfg, _, evaluate in results.values():
        assert evaluate.metrics.judges == ["fluency", "inoffensive"]
        columns = evaluate.read("eval").column_names
        assert columns[columns.index("reward") + 1 : columns.index("reward") + 3] == ["fluency", "inoffensive"]
        for model in MODELS:
            rows = _rows(evaluate, model)
            response_sets.add(tuple(r["response"] for r in rows))
            responses = [r["response"] for r in rows]
            np.testing.assert_allclose([r["inoffensive"] for r in rows], 1 - predict_prob(responses), atol=1e-12)
            expected = [_fluency(tmp / "judge", r["prompt"], r["response"], 24) for r in rows]
            np.testing.assert_allclose([r["fluency"] for r in rows], expected, atol=1e-4)
            assert evaluate.metrics.models[model].component("fluency").mean == pytest.approx(np.mean(expected), abs=1e-4)
        policy, reference = _rows(evaluate, PI_THETA), _rows(evaluate, PI_REF)
        difference = [p["fluency"] - r["fluency"] for p, r in zip(policy, reference)]
        assert evaluate.metrics.difference["fluency"].mean == pytest.approx(np.mean(difference))
        intercept, slope = length_controlled_fit(
            np.array([p["reward"] - r["reward"] for p, r in zip(policy, reference)]),
            np.array([p["length_words"] - r["length_words"] for p, r in zip(policy, reference)]),
        )
        controlled = evaluate.metrics.length_controlled
        assert controlled.difference.mean == pytest.approx(intercept) and controlled.slope_per_word == pytest.approx(slope)
        report = parse_markdown_tables(evaluate.path("report.md").read_text())
        judged = next(t for t in report if "score" in t[0])
        assert [r["score"] for r in judged] == ["reward (training)", "fluency (judge)", "inoffensive (judge)"]
    # Each judge scored each distinct set of responses once (pi_ref's for all three evaluations).
    assert len(list((tmp / "cache" / "judges").rglob("*.parquet"))) == 2 * len(response_sets)


def test_report_and_plots_are_written(evaluated):
    _, readers, results = evaluated
    _, _, evaluate = results["a_lol"]
    text = evaluate.path("report.md").read_text()
    summary = parse_markdown_tables(text)[0]
    assert [r["model"] for r in summary] == ["pi_theta", "pi_ref"]
    metrics = json.loads(evaluate.path("metrics.json").read_text())
    assert float(summary[1]["sentiment"]) == pytest.approx(metrics["models"][PI_REF]["sentiment"]["mean"], abs=5e-4)
    assert json.loads(evaluate.path("metrics_table.json").read_text())[0]["model"] == "pi_theta"
    for plot in ("reward_distribution", "advantage_histogram", "training_curves"):
        assert evaluate.path(f"plots/{plot}.png").read_bytes().startswith(PNG_SIGNATURE)
        assert f"(plots/{plot}.png)" in text
    # Links to the upstream tables resolve from the report's folder.
    assert "advantage (advantage)" in text
    for link in ("eval/", "../../advantage/"):
        assert f"]({link}" in text
    advantage_link = next(line for line in text.splitlines() if line.startswith("- [advantage (advantage)]"))
    target = advantage_link.split("](", 1)[1].rstrip(")")
    assert (evaluate.dir / target).resolve() == (readers["advantage"].dir / "advantage").resolve()
    assert "algorithm: a_lol" in text and "max_new_tokens: 5" in text


def test_harmlessness_prompts_are_generated_and_scored_for_safety(evaluated):
    _, _, results = evaluated
    cfg, _, evaluate = results["other policy"]
    table = evaluate.read("eval_harmlessness").to_pylist()
    assert len(table) == 2 * HARMLESSNESS_PROMPTS
    assert all(r["id"].startswith("dna:") for r in table)
    harmless = json.loads(evaluate.path("metrics.json").read_text())["harmlessness"]
    assert harmless["prompts"] == HARMLESSNESS_PROMPTS and harmless["component"] == "safety"
    for model in MODELS:
        expected = np.mean([r["safety"] for r in table if r["model"] == model])
        assert harmless["models"][model]["mean"] == pytest.approx(expected)
    assert "## Harmlessness (3 Do-Not-Answer prompts" in evaluate.path("report.md").read_text()
    assert "eval_harmlessness" not in results["a_lol"][2].tables()


def test_harmlessness_needs_a_toxicity_component():
    from schemas.config import load_config
    from stages.evaluate.harmlessness import safety_component

    cfg = load_config("smoke", overrides={"score.components": [{"name": "length", "kind": "length"}]})
    with pytest.raises(ValueError, match="no component of kind 'toxicity'"):
        safety_component(cfg)
    assert safety_component(load_config("smoke")) == "safety"
