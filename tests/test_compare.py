"""The comparison table (rows from the evaluate stage's typed metrics, Markdown and CSV) and `alol report`
on a stored evaluation."""

from __future__ import annotations

import csv

import numpy as np
import pyarrow as pa
import pytest

from pipeline import compare as compare_module
from pipeline.compare import algorithm_overrides, compare, planned_runs
from pipeline.report_cli import print_report, text_table
from pipeline.storage import RunStore
from schemas.algorithms import ALGORITHMS
from schemas.config import PROFILES, ConfigError, load_config
from schemas.evaluate import PI_REF, PI_THETA, EvaluateMetrics, eval_schema
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


def evaluation_output(folder, reference: np.ndarray, policy: np.ndarray, policy_length: np.ndarray, algorithm="a_lol",
                      policy_is_reference=False, judge_shift: float = 0.0):
    """A committed evaluate output: its `eval` table (pi_ref 2 words per response) and metrics that agree with it."""
    n = len(reference)
    ids = [f"{i:03d}" for i in range(n)]
    fluency = {PI_REF: np.full(n, -3.0), PI_THETA: np.full(n, -3.0 + judge_shift)}
    table = pa.table({
        "id": ids * 2, "prompt": [[{"role": "user", "content": "q"}]] * (2 * n), "model": [PI_THETA] * n + [PI_REF] * n,
        "response": ["x"] * (2 * n), "safety": np.concatenate([policy, reference]),
        "reward": np.concatenate([policy, reference]), "fluency": np.concatenate([fluency[PI_THETA], fluency[PI_REF]]),
        "length_words": np.concatenate([policy_length, np.full(n, 2)]).astype(np.int32),
    }, schema=eval_schema(["safety"], ["fluency"]))
    scores = {m: {"safety": v, "reward": v, "fluency": fluency[m]} for m, v in ((PI_THETA, policy), (PI_REF, reference))}
    compared = compare_models(["yes sure"] * n, scores[PI_THETA], ["no"] * n, scores[PI_REF], samples=100, seed=0)
    train = {"policy_is_reference": policy_is_reference, "best_step": None, "best_validation_reward": None,
             "reference_validation_reward": 0.0}
    model = metrics(
        "evaluate", **compared, algorithm=algorithm, prompts=n, components=["safety"], judges=["fluency"],
        bootstrap_samples=100, policy_is_reference=policy_is_reference, train=train,
        generation={"do_sample": False, "max_new_tokens": 8},
    )
    return commit_output(folder, "evaluate", tables={"eval": table}, metrics_model=model)


def test_planned_runs_give_each_method_its_seeds_and_the_value_ablation():
    planned = planned_runs(["a_lol", "nll"], {"data.max_rows_per_split": 5}, 3, True, first_seed=7)
    assert [(method, overrides.get("train.seed")) for method, _, overrides in planned] == [
        ("a_lol", None), ("a_lol", 8), ("a_lol", 9), ("nll", None), ("nll", 8), ("nll", 9),
        ("a_lol (V=mean)", None), ("a_lol (V=mean)", 8), ("a_lol (V=mean)", 9),
    ]
    assert all(o["data.max_rows_per_split"] == 5 for _, _, o in planned)
    assert [o.get("advantage.value") for m, _, o in planned if "V=mean" in m] == ["constant"] * 3
    assert all("advantage.value" not in o for m, _, o in planned if "V=mean" not in m)
    with pytest.raises(ValueError, match="at least 1"):
        planned_runs(["nll"], {}, 0, False, 0)


def test_compare_over_seeds_gives_means_intervals_and_paired_differences(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    reference = rng.uniform(0.3, 0.9, 20)
    length = np.full(20, 2)
    outputs, trains = {}, {}
    # a_lol: +0.10 and +0.14 over pi_ref in its two seeds, same length; nll: +0.02 both seeds, 2 words longer.
    for algorithm, gains, extra_words, seconds in (("a_lol", (0.10, 0.14), 0, (7.0, 9.0)), ("nll", (0.02, 0.02), 2, (2.0, 2.0))):
        for k, (gain, train_seconds) in enumerate(zip(gains, seconds)):
            policy = reference + gain + rng.normal(0, 0.01, 20)
            outputs[algorithm, k] = evaluation_output(tmp_path / f"eval-{algorithm}-{k}", reference, policy,
                                                      length + extra_words, algorithm, judge_shift=-0.5 * k)
            trains[algorithm, k] = commit_output(tmp_path / f"train-{algorithm}-{k}", "train",
                                                 metrics_model=metrics("train", algorithm=algorithm, train_seconds=train_seconds))

    def run_alol(cfg, stages):
        key = (cfg.train.algorithm, 0 if cfg.train.seed is None else cfg.train.seed)
        return {"evaluate": outputs[key].output(), "train": trains[key].output()}

    monkeypatch.setattr(compare_module, "run_alol", run_alol)
    result = compare(["a_lol", "nll"], profile="smoke", overrides={"run.root": str(tmp_path / "runs")}, seeds=2)
    rows = {r["method"]: r for r in result.rows}
    assert list(rows) == ["pi_ref", "a_lol", "nll"]
    assert rows["a_lol"]["seeds"] == 2 and rows["a_lol"]["train_seconds"] == pytest.approx(8.0)
    assert rows["a_lol"]["reward_diff"] == pytest.approx(0.12, abs=0.01)
    assert rows["a_lol"]["reward_diff_low"] < 0.11 and rows["a_lol"]["reward_diff_high"] > 0.13, "seeds widen it"
    assert rows["a_lol"]["fluency_diff"] == pytest.approx(-0.25) and rows["a_lol"]["fluency"] == pytest.approx(-3.25)
    assert rows["nll"]["lc_reward_diff"] == pytest.approx(0.02, abs=0.01)
    (difference,) = result.differences
    assert difference["difference"] == "a_lol − nll" and difference["seeds"] == "2/2"
    assert difference["reward_diff"] == pytest.approx(0.10, abs=0.01)
    assert difference["reward_diff_low"] > 0.0

    main, between = parse_markdown_tables(result.markdown())
    assert [r["method"] for r in main] == ["pi_ref", "a_lol", "nll"]
    assert main[0]["Δ reward vs pi_ref (95% CI)"] == "—" and main[1]["seeds"] == "2"
    assert main[1]["fluency (judge)"] == "-3.250"
    assert between[0]["difference"] == "a_lol − nll"
    with open(tmp_path / "runs" / "smoke" / "compare" / "differences.csv", newline="") as fh:
        assert [r["difference"] for r in csv.DictReader(fh)] == ["a_lol − nll"]
    with open(result.csv_path, newline="") as fh:
        records = list(csv.DictReader(fh))
    assert [r["method"] for r in records] == ["pi_ref", "a_lol", "nll"]
    assert records[0]["win_rate"] == "" and float(records[1]["win_rate"]) == 1.0


def test_the_value_ablation_is_compared_with_its_variant(tmp_path, monkeypatch):
    reference = np.linspace(0.2, 0.8, 20)
    gains = {("a_lol", "head"): 0.1, ("a_lol", "constant"): 0.04, ("nll", "head"): 0.0}
    outputs = {key: evaluation_output(tmp_path / f"eval-{key[0]}-{key[1]}", reference, reference + gain, np.full(20, 2), key[0])
               for key, gain in gains.items()}
    train = commit_output(tmp_path / "train", "train", metrics_model=metrics("train", train_seconds=1.0))
    monkeypatch.setattr(compare_module, "run_alol", lambda cfg, stages: {
        "evaluate": outputs[cfg.train.algorithm, cfg.advantage.value].output(), "train": train.output()})
    result = compare(["a_lol", "nll"], profile="smoke", overrides={"run.root": str(tmp_path / "runs")}, value_ablation=True)
    assert [r["method"] for r in result.rows] == ["pi_ref", "a_lol", "nll", "a_lol (V=mean)"]
    found = {r["difference"]: r["reward_diff"] for r in result.differences}
    assert found == pytest.approx({"a_lol − nll": 0.1, "a_lol (V=mean) − nll": 0.04, "a_lol − a_lol (V=mean)": 0.06})


def test_a_method_that_kept_pi_ref_says_so(tmp_path, monkeypatch):
    reference = np.linspace(0.2, 0.8, 20)
    same = evaluation_output(tmp_path / "eval", reference, reference, np.full(20, 2), "nll", policy_is_reference=True)
    train = commit_output(tmp_path / "train", "train", metrics_model=metrics("train", algorithm="nll", train_seconds=3.0))
    monkeypatch.setattr(compare_module, "run_alol", lambda cfg, stages: {"evaluate": same.output(), "train": train.output()})
    result = compare(["nll"], profile="smoke", overrides={"run.root": str(tmp_path / "runs")})
    (table,) = parse_markdown_tables(result.markdown())
    assert table[1]["method"] == "nll (= pi_ref: no checkpoint beat it)"
    assert table[1]["Δ reward vs pi_ref (95% CI)"] == "0.000 [0.000, 0.000]"
    assert table[1]["win/tie vs pi_ref"] == "0.00/1.00" and table[1]["train s"] == "3"
    assert result.differences == []


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
