"""The report: Markdown that parses back into the numbers it was given, and PNG plots that exist."""

from __future__ import annotations

import numpy as np
import pytest

from schemas.evaluate import PI_REF, PI_THETA, EvaluateMetrics
from stages.metrics import compare_models, length_controlled_difference
from stages.report import (
    advantage_statistics,
    markdown_table,
    plot_advantage_histogram,
    plot_reward_distribution,
    plot_training_curves,
    render_report,
    summary_rows,
)
from tests.support.tables import PNG_SIGNATURE, parse_markdown_tables


@pytest.fixture()
def metrics() -> EvaluateMetrics:
    rng = np.random.default_rng(0)
    reference = {"safety": rng.uniform(0.5, 1.0, 30), "tfidf": rng.uniform(0, 0.5, 30)}
    policy = {"safety": np.clip(reference["safety"] + 0.05, 0, 1), "tfidf": reference["tfidf"] + 0.1}
    for scores in (reference, policy):
        scores["reward"] = scores["safety"] + scores["tfidf"]
    reference["fluency"], policy["fluency"] = rng.uniform(-4, -2, 30), rng.uniform(-5, -3, 30)
    controlled, slope = length_controlled_difference(policy["reward"], [3] * 30, reference["reward"], [2] * 30, 200, 0)
    return EvaluateMetrics(
        **compare_models(["a b c"] * 30, policy, ["a a"] * 30, reference, samples=200, seed=0),
        length_controlled={"difference": controlled.as_dict(), "slope_per_word": slope},
        algorithm="a_lol",
        prompts=30,
        components=["safety", "tfidf"],
        judges=["fluency"],
        bootstrap_samples=200,
        policy_is_reference=False,
        generation={"do_sample": False, "max_new_tokens": 16},
        train={"policy_is_reference": False, "best_step": 4, "best_validation_reward": 1.1,
               "reference_validation_reward": 1.0},
        advantage={},
    )


def test_markdown_table_round_trips_cells():
    text = markdown_table([{"name": "a|b", "x": 0.12345, "none": None}, {"name": "c", "x": 2.0, "none": 1}])
    (table,) = parse_markdown_tables(text)
    assert table == [{"name": "a\\|b", "x": "0.123", "none": "—"}, {"name": "c", "x": "2.000", "none": "1"}]


def test_report_table_parses_and_carries_the_metrics(metrics, tmp_path):
    advantage = advantage_statistics(np.array([-0.2, -0.1, 0.3, 0.5]))
    assert advantage["positive"] == 2 and advantage["positive_fraction"] == pytest.approx(0.5)
    text = render_report(
        title="Run test",
        metrics=metrics,
        config={"train": {"algorithm": "a_lol", "steps": 4}},
        advantage=advantage,
        links={"eval table": "eval/"},
        plots={"reward": "plots/reward.png"},
    )
    tables = parse_markdown_tables(text)
    summary = tables[0]
    assert [row["model"] for row in summary] == ["pi_theta", "pi_ref"]
    policy_reward = metrics.models[PI_THETA].reward
    assert summary[0]["reward (95% CI)"].startswith(f"{policy_reward.mean:.3f} [")
    assert float(summary[1]["tfidf"]) == pytest.approx(metrics.models[PI_REF].component("tfidf").mean, abs=5e-4)
    assert float(summary[0]["dist-1"]) == pytest.approx(3 / 90, abs=5e-4)  # "a b c" 30 times: 3 unique of 90 words
    assert summary[0]["win/tie/loss vs pi_ref"] == "1.00/0.00/0.00"
    assert summary[1]["win/tie/loss vs pi_ref"] == "—"
    assert any(row.get("positive") == "2" for table in tables for row in table)
    training = next(table for table in tables if "best_step" in table[0])
    assert training == [{"policy_is_reference": "no", "best_step": "4", "best_validation_reward": "1.100",
                         "reference_validation_reward": "1.000"}], "the train stage's outcome, no timing"
    assert "![reward](plots/reward.png)" in text
    assert "[eval table](eval/)" in text
    assert "algorithm: a_lol" in text


def test_summary_rows_columns(metrics):
    rows = summary_rows(metrics)
    assert list(rows[0]) == [
        "model", "reward (95% CI)", "safety", "tfidf", "length", "dist-1", "dist-2", "dist-3", "win/tie/loss vs pi_ref",
    ]
    assert rows[1]["length"] == pytest.approx(2.0)


def test_plots_are_png_files(tmp_path):
    rng = np.random.default_rng(1)
    paths = [
        plot_reward_distribution(rng.normal(1, 0.2, 40), rng.normal(0.9, 0.2, 40), tmp_path / "reward.png"),
        plot_advantage_histogram(rng.normal(0, 0.3, 100), tmp_path / "advantage.png"),
        plot_training_curves([1, 2, 3, 4], [2.0, 1.5, 1.2, 1.1], [2, 4], [0.8, 0.9], 0.85, tmp_path / "train.png"),
    ]
    for path in paths:
        data = path.read_bytes()
        assert data.startswith(PNG_SIGNATURE) and len(data) > 5_000, path


def test_report_shows_the_judges_and_the_value_head_against_the_mean_predictor(metrics):
    value_head = {"value_chosen_epoch": 0, "value_train_mse": 0.04, "value_holdout_mse": 0.05,
                  "value_mean_baseline_train_mse": 0.04, "value_mean_baseline_holdout_mse": 0.05,
                  "value_train_rows": 41, "value_holdout_rows": 11, "value_holdout_mse_by_epoch": [0.05, 0.06, 0.07],
                  "advantage_value": "head"}
    text = render_report(title="t", metrics=metrics, config={}, advantage=None, links={}, plots={}, value_head=value_head)
    tables = parse_markdown_tables(text)
    judged = next(t for t in tables if "score" in t[0])
    assert [r["score"] for r in judged] == ["reward (training)", "fluency (judge)"]
    fluency = metrics.difference["fluency"]
    assert judged[1]["Δ pi_theta − pi_ref (95% CI)"] == f"{fluency.mean:.3f} [{fluency.low:.3f}, {fluency.high:.3f}]"
    assert "Length-controlled reward difference" in text
    value = next(t for t in tables if "head MSE" in t[0])
    assert value == [
        {"prompts": "train", "rows": "41", "head MSE": "0.040", "mean-predictor MSE": "0.040"},
        {"prompts": "held out", "rows": "11", "head MSE": "0.050", "mean-predictor MSE": "0.050"},
    ]
    assert "Chosen epoch 0 of 2 (0: no epoch beat the mean predictor" in text
    assert "## Value head (advantage.value: head)" in text
