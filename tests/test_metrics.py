"""Metrics on hand-made generations: every expected value is worked out by hand in the test."""

from __future__ import annotations

import numpy as np
import pytest

from stages.metrics import (
    bootstrap_mean,
    compare_models,
    distinct_n,
    length_controlled_difference,
    length_controlled_fit,
    mean_length_words,
    model_metrics,
    paired_difference,
    seeds_and_prompts_difference,
    win_rate,
)


def test_distinct_n_counts_corpus_ngrams_lower_cased():
    texts = ["The cat sat", "the cat ran", "A dog"]
    # unigrams: the cat sat the cat ran a dog -> 8 total, unique {the, cat, sat, ran, a, dog} = 6
    assert distinct_n(texts, 1) == pytest.approx(6 / 8)
    # bigrams: (the cat) (cat sat) (the cat) (cat ran) (a dog) -> 5 total, 4 unique
    assert distinct_n(texts, 2) == pytest.approx(4 / 5)
    # trigrams: (the cat sat) (the cat ran) -> 2 total, 2 unique; "A dog" has none
    assert distinct_n(texts, 3) == pytest.approx(1.0)


def test_distinct_n_does_not_join_texts_and_handles_empty():
    # Joining the two texts would create the bigram (b c); per-text n-grams must not.
    assert distinct_n(["a b", "c d"], 2) == pytest.approx(1.0)
    assert distinct_n(["a a", "a a"], 2) == pytest.approx(1 / 2)
    assert distinct_n(["", "   "], 1) == 0.0
    assert distinct_n([], 2) == 0.0
    with pytest.raises(ValueError):
        distinct_n(["a"], 0)


def test_mean_length_words():
    assert mean_length_words(["one two three", " four ", ""]) == pytest.approx(4 / 3)
    assert mean_length_words([]) == 0.0


def test_bootstrap_interval_contains_the_mean_and_is_seeded():
    values = np.random.default_rng(3).normal(0.4, 0.2, size=200)
    first = bootstrap_mean(values, samples=500, seed=7)
    assert first.mean == pytest.approx(values.mean())
    assert first.low < first.mean < first.high
    # About 1.96 standard errors each side for a normal sample.
    se = values.std(ddof=1) / np.sqrt(values.size)
    assert first.high - first.low == pytest.approx(2 * 1.96 * se, rel=0.2)
    assert bootstrap_mean(values, samples=500, seed=7) == first
    assert bootstrap_mean(values, samples=500, seed=8) != first


def test_bootstrap_of_a_constant_is_a_point():
    interval = bootstrap_mean(np.full(10, 0.25), samples=50, seed=0)
    assert (interval.mean, interval.low, interval.high) == pytest.approx((0.25, 0.25, 0.25))


def test_bootstrap_rejects_empty():
    with pytest.raises(ValueError):
        bootstrap_mean(np.array([]), samples=10, seed=0)


def test_paired_difference_resamples_pairs():
    reference = np.linspace(0.0, 1.0, 50)
    policy = reference + 0.1
    diff = paired_difference(policy, reference, samples=200, seed=0)
    # Every pair differs by exactly 0.1: pairing removes the spread between prompts entirely.
    assert (diff.mean, diff.low, diff.high) == pytest.approx((0.1, 0.1, 0.1))
    with pytest.raises(ValueError):
        paired_difference(policy[:3], reference, samples=10, seed=0)


def test_win_rate_counts_ties_apart():
    policy = np.array([0.9, 0.5, 0.2, 0.7, 0.3])
    reference = np.array([0.1, 0.5, 0.4, 0.7 + 1e-12, 0.2])
    result = win_rate(policy, reference)
    assert (result.wins, result.ties, result.losses) == (2, 2, 1)
    d = result.as_dict()
    assert d["win_rate"] == pytest.approx(0.4)
    assert d["tie_rate"] == pytest.approx(0.4)
    assert d["loss_rate"] == pytest.approx(0.2)


def test_model_metrics_keys_and_values():
    responses = ["hello there friend", "hello there"]
    scores = {"safety": np.array([1.0, 0.5]), "reward": np.array([2.0, 1.0])}
    metrics = model_metrics(responses, scores, samples=100, seed=0)
    assert metrics["reward"]["mean"] == pytest.approx(1.5)
    assert metrics["safety"]["low"] >= 0.5 and metrics["safety"]["high"] <= 1.0
    assert metrics["length_words"] == pytest.approx(2.5)
    assert metrics["distinct_1"] == pytest.approx(3 / 5)
    assert metrics["distinct_2"] == pytest.approx(2 / 3)
    assert metrics["distinct_3"] == pytest.approx(1.0)


def test_compare_models_pairs_prompts():
    reference = {"reward": np.array([0.2, 0.4, 0.6, 0.8])}
    policy = {"reward": np.array([0.3, 0.4, 0.5, 1.0])}
    result = compare_models(["a b", "c", "d", "e"], policy, ["x", "y", "z", "w"], reference, samples=200, seed=1)
    assert result["win_rate"]["wins"] == 2 and result["win_rate"]["ties"] == 1 and result["win_rate"]["losses"] == 1
    diff = result["difference"]["reward"]
    assert diff["mean"] == pytest.approx(0.05)
    assert diff["low"] <= 0.05 <= diff["high"]
    assert result["models"]["pi_theta"]["length_words"] == pytest.approx(1.25)
    assert result["models"]["pi_ref"]["reward"]["mean"] == pytest.approx(0.5)
    with pytest.raises(ValueError):
        compare_models(["a"], policy, ["x", "y"], reference, samples=10, seed=0)


def test_seeds_and_prompts_difference_with_one_seed_is_the_paired_mean():
    rng = np.random.default_rng(1)
    reference = rng.uniform(0, 1, 50)
    policy = reference + 0.1 + rng.normal(0, 0.05, 50)
    interval = seeds_and_prompts_difference(policy, reference, samples=400, seed=0)
    assert interval.mean == pytest.approx(float(np.mean(policy - reference)))
    assert interval.low < interval.mean < interval.high
    # Paired: the prompts' own spread (uniform over [0, 1]) does not enter the difference's interval.
    assert interval.high - interval.low < 0.05
    alone = seeds_and_prompts_difference(policy, None, samples=400, seed=0)
    assert alone.mean == pytest.approx(float(policy.mean())) and alone.high - alone.low > 0.1


def test_seeds_and_prompts_difference_widens_with_the_spread_between_seeds():
    rng = np.random.default_rng(2)
    reference = rng.uniform(0, 1, 40)
    noise = rng.normal(0, 0.02, (3, 40))
    steady = reference + 0.1 + noise
    unsteady = reference + np.array([[0.0], [0.1], [0.2]]) + noise
    narrow = seeds_and_prompts_difference(steady, reference, samples=400, seed=0)
    wide = seeds_and_prompts_difference(unsteady, reference, samples=400, seed=0)
    assert narrow.mean == pytest.approx(wide.mean, abs=1e-9)
    assert wide.high - wide.low > 3 * (narrow.high - narrow.low)
    with pytest.raises(ValueError, match="same prompts"):
        seeds_and_prompts_difference(steady, reference[:10], samples=10, seed=0)


def test_length_controlled_difference_removes_a_gain_that_is_only_length():
    rng = np.random.default_rng(3)
    reference_reward, reference_length = rng.uniform(0, 1, 60), rng.integers(3, 10, 60)
    extra_words = rng.integers(0, 5, 60)
    hacked = reference_reward + 0.05 * extra_words  # every bit of the gain is 0.05 per extra word
    honest = reference_reward + 0.2 + 0.05 * extra_words
    for policy, expected in ((hacked, 0.0), (honest, 0.2)):
        interval, slope = length_controlled_difference(
            policy, reference_length + extra_words, reference_reward, reference_length, samples=200, seed=0
        )
        assert interval.mean == pytest.approx(expected, abs=1e-9) and slope == pytest.approx(0.05)
        assert interval.low == pytest.approx(expected, abs=1e-9) and interval.high == pytest.approx(expected, abs=1e-9)
    assert float(np.mean(hacked - reference_reward)) > 0.05, "the raw difference would call it a gain"


def test_length_controlled_fit_without_length_variation_is_the_mean_difference():
    assert length_controlled_fit(np.array([0.1, 0.3]), np.array([2.0, 2.0])) == (pytest.approx(0.2), 0.0)
    assert length_controlled_fit(np.array([0.0, 0.2, 0.4]), np.array([0.0, 1.0, 2.0])) == (pytest.approx(0.0), pytest.approx(0.2))
