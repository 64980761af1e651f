"""Priority sampling: frequencies follow w / sum w, rows with w <= 0 never drawn, seeded and resumable."""

import json

import numpy as np
import pytest
from scipy.stats import chi2

from stages.sampler import PrioritySampler, SamplerError

ADVANTAGE = np.array([-1.0, 0.0, 0.5, 1.0, 2.0, 3.0, -0.2, 0.1, 4.0, 0.0])
A_PLUS = np.maximum(ADVANTAGE, 0.0)


def test_frequencies_match_a_plus_and_non_positive_rows_are_never_drawn():
    sampler = PrioritySampler(A_PLUS, seed=123)
    draws = 200_000
    counts = np.bincount(sampler.draw(draws), minlength=len(A_PLUS))
    assert counts[ADVANTAGE <= 0].sum() == 0
    expected = draws * A_PLUS / A_PLUS.sum()
    positive = ADVANTAGE > 0
    statistic = (((counts - expected) ** 2)[positive] / expected[positive]).sum()
    assert statistic < chi2.ppf(0.999, df=positive.sum() - 1), (counts, expected)
    np.testing.assert_allclose(sampler.probabilities, A_PLUS / A_PLUS.sum())


def test_a_biased_draw_is_caught_by_the_same_statistic():
    # The test above must be able to fail: draws in proportion to A+ squared are rejected.
    sampler = PrioritySampler(A_PLUS**2, seed=123)
    draws = 200_000
    counts = np.bincount(sampler.draw(draws), minlength=len(A_PLUS))
    expected = draws * A_PLUS / A_PLUS.sum()
    positive = ADVANTAGE > 0
    statistic = (((counts - expected) ** 2)[positive] / expected[positive]).sum()
    assert statistic > chi2.ppf(0.999, df=positive.sum() - 1)


def test_uniform_weights_reach_every_row_and_zero_weight_first_row_is_never_drawn():
    counts = np.bincount(PrioritySampler(np.ones(7), seed=0).draw(7000), minlength=7)
    assert (counts > 800).all()
    sampler = PrioritySampler(np.array([0.0, 1.0, 0.0]), seed=0)
    assert set(sampler.draw(1000).tolist()) == {1}


def test_same_seed_same_draws_other_seed_other_draws():
    a, b, c = (PrioritySampler(A_PLUS, seed=s) for s in (7, 7, 8))
    first = a.draw(50)
    np.testing.assert_array_equal(first, b.draw(50))
    assert not np.array_equal(first, c.draw(50))


def test_resumed_sampler_continues_the_same_sequence():
    uninterrupted = PrioritySampler(A_PLUS, seed=3)
    expected = np.concatenate([uninterrupted.draw(5), uninterrupted.draw(5), uninterrupted.draw(7)])
    first = PrioritySampler(A_PLUS, seed=3)
    head = np.concatenate([first.draw(5), first.draw(5)])
    state = json.loads(json.dumps(first.state_dict()))  # survives a round trip through a file
    resumed = PrioritySampler(A_PLUS, seed=999)
    resumed.load_state_dict(state)
    np.testing.assert_array_equal(np.concatenate([head, resumed.draw(7)]), expected)
    assert resumed.draws == 17


def test_state_of_other_weights_is_refused():
    state = PrioritySampler(A_PLUS, seed=0).state_dict()
    with pytest.raises(SamplerError, match="other weights"):
        PrioritySampler(A_PLUS + 1, seed=0).load_state_dict(state)


def test_unusable_weights_name_the_problem():
    with pytest.raises(SamplerError, match="none of the 3 rows"):
        PrioritySampler(np.array([0.0, -1.0, 0.0]), seed=0)
    with pytest.raises(SamplerError, match="row 1 is nan"):
        PrioritySampler(np.array([1.0, np.nan]), seed=0)
