"""The comparison table (rows from the evaluate stage's typed metrics, Markdown and CSV) and `alol report`
on a stored evaluation."""

from __future__ import annotations

import csv

import numpy as np
import pytest

from pipeline import compare as compare_module
from pipeline.compare import algorithm_overrides, compare, method_row, write_comparison
from pipeline.report_cli import print_report, text_table
from pipeline.storage import RunStore
from schemas.algorithms import ALGORITHMS
from schemas.config import PROFILES, ConfigError, load_config
from schemas.evaluate import PI_REF, PI_THETA, EvaluateMetrics
from stages.metrics import compare_models
from tests.support.outputs import commit_output, metrics
from tests.support.tables import parse_markdown_tables


def evaluation_metrics(shift: float, policy_is_reference: bool = False) -> EvaluateMetrics:
    rng = np.random.default_rng(0)
    reference = {"safety": rng.uniform(0.3, 0.9, 20)}
    policy = {"safety": reference["safety"] + shift}
    for scores in (reference, policy):
        scores["reward"] = scores["safety"].copy()
    compared = compare_models(["yes sure"] * 20, policy, ["no"] * 20, reference, samples=100, seed=0)
    train = {"policy_is_reference": policy_is_reference, "best_step": None, "best_validation_reward": None,
             "reference_validation_reward": 0.0}
    return metrics(
        "evaluate", **compared, algorithm="a_lol", prompts=20, components=["safety"], bootstrap_samples=100,
        policy_is_reference=policy_is_reference, train=train, generation={"do_sample": False, "max_new_tokens": 8},
    )


def test_algorithm_overrides_set_kl_beta_only_for_a_lol_kl():
    assert algorithm_overrides({"data.max_rows_per_split": 5}, "wbc") == {
        "data.max_rows_per_split": 5, "train.algorithm": "wbc", "train.kl_beta": None,
    }
    assert algorithm_overrides({}, "a_lol_kl")["train.kl_beta"] == 0.1
    assert algorithm_overrides({"train.kl_beta": 0.5}, "a_lol_kl")["train.kl_beta"] == 0.5
    assert algorithm_overrides({"train.kl_beta": 0.5}, "nll")["train.kl_beta"] is None
    for algorithm in ("a_lol_kl", "r_gold"):
        cfg = load_config("smoke", overrides=algorithm_overrides({}, algorithm))
        assert cfg.train.algorithm == algorithm
    with pytest.raises(ValueError, match="unknown algorithm"):
        algorithm_overrides({}, "ppo")


def test_every_algorithm_of_the_registry_loads_on_the_shared_upstream_of_each_profile():
    """`alol compare` runs them all, DPO and PRO included: each configuration loads (chatterbot has no pairs,
    so the comparison builds them for every algorithm) and differs from the others in train.* only."""
    for profile in PROFILES:
        base = compare_module.pair_overrides({}, ALGORITHMS, profile, None)
        assert base == {"reference.pairs": "built"}, profile  # every profile reads chatterbot
        configs = {a: load_config(profile, overrides=algorithm_overrides(base, a)) for a in ALGORITHMS}
        assert {"dpo", "pro"} <= set(configs)
        upstream = {a: c.model_dump(exclude={"train"}) for a, c in configs.items()}
        assert all(u == upstream["a_lol"] for u in upstream.values()), profile
    assert configs["dpo"].train.dpo_beta == 0.1 and configs["pro"].train.pro_sft_weight == 0.05


def test_pairs_are_built_only_when_a_pair_algorithm_needs_them():
    """A plain run decodes no pairs (default `data` on chatterbot resolves to none); a comparison without DPO
    or PRO keeps the user's upstream; a reference.pairs the user set is kept, and a pair-less one is refused."""
    assert load_config("smoke").reference.pairs == "data"
    assert compare_module.pair_overrides({}, ["a_lol", "nll"], "smoke", None) == {}
    assert compare_module.pair_overrides({"reference.pairs": "auto"}, ["dpo"], "smoke", None) == {"reference.pairs": "auto"}
    with pytest.raises(ConfigError, match="reference.pairs"):
        load_config("smoke", overrides={"train.algorithm": "dpo"})
    with pytest.raises(ConfigError, match="reference.pairs"):
        load_config("smoke", overrides=algorithm_overrides({"reference.pairs": "none"}, "pro"))


def test_comparison_table_has_pi_ref_and_one_row_per_method(tmp_path):
    good, same = evaluation_metrics(0.05), evaluation_metrics(0.0, policy_is_reference=True)
    rows = [method_row("pi_ref", good, PI_REF, 12.0), method_row("a_lol", good, PI_THETA, 12.0),
            method_row("nll", same, PI_THETA, 3.0)]
    result = write_comparison(tmp_path, rows, ["safety"], "test comparison")

    (table,) = parse_markdown_tables(result.markdown())
    assert [r["method"] for r in table] == ["pi_ref", "a_lol", "nll (= pi_ref: no checkpoint beat it)"]
    assert table[0]["Δ reward vs pi_ref (95% CI)"] == "—" and table[0]["train s"] == "—"
    assert table[1]["Δ reward vs pi_ref (95% CI)"].startswith("0.050 [0.050, 0.050]")
    assert table[1]["win/tie vs pi_ref"] == "1.00/0.00"
    assert table[2]["win/tie vs pi_ref"] == "0.00/1.00"
    assert table[1]["train s"] == "12" and table[2]["train s"] == "3"
    assert float(table[1]["safety"]) == pytest.approx(float(table[0]["safety"]) + 0.05, abs=1e-3)

    with open(result.csv_path, newline="") as fh:
        records = list(csv.DictReader(fh))
    assert [r["method"] for r in records] == ["pi_ref", "a_lol", "nll"]
    assert float(records[1]["reward"]) - float(records[0]["reward"]) == pytest.approx(0.05)
    assert float(records[1]["distinct_1"]) == pytest.approx(2 / 40)
    assert records[0]["win_rate"] == ""
    assert records[0]["train_seconds"] == "" and float(records[1]["train_seconds"]) == 12.0


def test_compare_takes_training_seconds_from_the_train_stage(tmp_path, monkeypatch):
    # The evaluate stage's files carry no timing (recomputing train must leave evaluate cached).
    evaluation = commit_output(tmp_path / "evaluate", "evaluate", metrics_model=evaluation_metrics(0.05))
    trains = {
        algorithm: commit_output(tmp_path / f"train-{algorithm}", "train",
                                 metrics_model=metrics("train", algorithm=algorithm, train_seconds=seconds))
        for algorithm, seconds in (("a_lol", 7.4), ("nll", 2.6))
    }
    monkeypatch.setattr(compare_module, "run_alol", lambda cfg, stages: {
        "evaluate": evaluation.output(), "train": trains[cfg.train.algorithm].output(),
    })
    result = compare(["a_lol", "nll"], profile="smoke", overrides={"run.root": str(tmp_path / "runs")})
    assert [(r["method"], r["train_seconds"]) for r in result.rows] == [("pi_ref", None), ("a_lol", 7.4), ("nll", 2.6)]


def _store_evaluation(root, name, evaluation: EvaluateMetrics):
    store = RunStore(root, name)
    reader = commit_output(store.stage_dir("evaluate", "k" * 64), "evaluate", files={"report.md": "# report\n"},
                           metrics_model=evaluation)
    store.record(reader.output(), cached=False, seconds=1.0)


def test_print_report_reads_the_latest_runs_metrics(tmp_path):
    cfg = load_config("smoke", overrides={"run.root": str(tmp_path)})
    with pytest.raises(FileNotFoundError, match="no evaluation yet"):
        print_report(None, cfg)
    _store_evaluation(tmp_path, "first", evaluation_metrics(0.05))
    _store_evaluation(tmp_path, "second", evaluation_metrics(-0.1))
    text = print_report(None, cfg)
    assert text.startswith("run second:")
    assert "-0.100 [-0.100, -0.100]" in text
    first = print_report("first", cfg)
    assert "0.050 [0.050, 0.050]" in first
    lines = first.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("model"))
    assert lines[header + 2].split()[0] == "pi_theta" and lines[header + 3].split()[0] == "pi_ref"


def test_text_table_aligns_columns():
    text = text_table([{"a": "x", "bb": 1.0}, {"a": "longer", "bb": None}])
    lines = text.splitlines()
    assert lines[0] == "a       bb"
    assert lines[2] == "x       1.000"
    assert lines[3] == "longer  —"
