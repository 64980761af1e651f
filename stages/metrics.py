"""Evaluation metrics: diversity, length, bootstrap intervals and the per-prompt win rate.

Every function takes plain lists or numpy arrays, so the evaluate stage, the report and the tests
share one definition of each number.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np

from schemas.evaluate import PI_REF, PI_THETA

CONFIDENCE = 0.95
TIE_TOLERANCE = 1e-9


def words(text: str) -> list[str]:
    """Lower-cased whitespace tokens: the unit of distinct-n and of length."""
    return text.lower().split()


def distinct_n(texts: Sequence[str], n: int) -> float:
    """Corpus distinct-n = |unique n-grams over all texts| / |n-grams over all texts| (0 when there are none).

    n-grams never cross text boundaries; a text shorter than n words contributes none.
    """
    if n < 1:
        raise ValueError(f"distinct_n needs n >= 1, got {n}")
    seen: set[tuple[str, ...]] = set()
    total = 0
    for text in texts:
        tokens = words(text)
        grams = [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]
        total += len(grams)
        seen.update(grams)
    return len(seen) / total if total else 0.0


def mean_length_words(texts: Sequence[str]) -> float:
    """Mean number of whitespace-separated words per text (0 for no texts)."""
    return float(np.mean([len(text.split()) for text in texts])) if len(texts) else 0.0


@dataclass(frozen=True)
class Interval:
    """A sample mean and its percentile bootstrap interval."""

    mean: float
    low: float
    high: float

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


def bootstrap_mean(values: np.ndarray, samples: int, seed: int, confidence: float = CONFIDENCE) -> Interval:
    """Mean of `values` and the percentile bootstrap interval of the mean.

    Draws `samples` resamples of size n with replacement (numpy Generator seeded with `seed`),
    takes each resample's mean, and returns the (1-c)/2 and (1+c)/2 quantiles of those means.
    """
    values = np.asarray(values, dtype=np.float64)
    if values.ndim != 1 or values.size == 0:
        raise ValueError(f"bootstrap_mean needs a non-empty 1-d array, got shape {values.shape}")
    if samples < 1:
        raise ValueError(f"bootstrap_mean needs samples >= 1, got {samples}")
    rng = np.random.default_rng(seed)
    index = rng.integers(0, values.size, size=(samples, values.size))
    means = values[index].mean(axis=1)
    tail = (1.0 - confidence) / 2.0
    low, high = np.quantile(means, [tail, 1.0 - tail])
    return Interval(float(values.mean()), float(low), float(high))


def paired_difference(
    policy: np.ndarray, reference: np.ndarray, samples: int, seed: int, confidence: float = CONFIDENCE
) -> Interval:
    """Mean of policy_i − reference_i over prompts i, with its bootstrap interval (prompts resampled in pairs)."""
    policy = np.asarray(policy, dtype=np.float64)
    reference = np.asarray(reference, dtype=np.float64)
    if policy.shape != reference.shape:
        raise ValueError(f"paired_difference needs equal shapes, got {policy.shape} and {reference.shape}")
    return bootstrap_mean(policy - reference, samples, seed, confidence)


@dataclass(frozen=True)
class WinRate:
    """Per-prompt comparison of two models by reward; ties are counted apart, not split."""

    wins: int
    ties: int
    losses: int

    @property
    def total(self) -> int:
        return self.wins + self.ties + self.losses

    def as_dict(self) -> dict[str, float | int]:
        n = self.total
        return {
            "wins": self.wins,
            "ties": self.ties,
            "losses": self.losses,
            "win_rate": self.wins / n if n else 0.0,
            "tie_rate": self.ties / n if n else 0.0,
            "loss_rate": self.losses / n if n else 0.0,
        }


def win_rate(policy: np.ndarray, reference: np.ndarray, tolerance: float = TIE_TOLERANCE) -> WinRate:
    """Count prompts where policy reward > reference + tol (win), < reference − tol (loss), else a tie."""
    policy = np.asarray(policy, dtype=np.float64)
    reference = np.asarray(reference, dtype=np.float64)
    if policy.shape != reference.shape:
        raise ValueError(f"win_rate needs equal shapes, got {policy.shape} and {reference.shape}")
    diff = policy - reference
    wins = int(np.sum(diff > tolerance))
    losses = int(np.sum(diff < -tolerance))
    return WinRate(wins, int(diff.size) - wins - losses, losses)


def model_metrics(
    responses: Sequence[str], scores: dict[str, np.ndarray], samples: int, seed: int
) -> dict[str, object]:
    """One model's metrics: bootstrap mean of each score column, mean length, distinct-1/2/3."""
    metrics: dict[str, object] = {
        name: bootstrap_mean(values, samples, seed).as_dict() for name, values in scores.items()
    }
    metrics["length_words"] = mean_length_words(responses)
    for n in (1, 2, 3):
        metrics[f"distinct_{n}"] = distinct_n(responses, n)
    return metrics


def compare_models(
    policy_responses: Sequence[str],
    policy_scores: dict[str, np.ndarray],
    reference_responses: Sequence[str],
    reference_scores: dict[str, np.ndarray],
    samples: int,
    seed: int,
) -> dict[str, object]:
    """Both models' metrics on the same prompts (row i of each is prompt i), their paired differences
    (pi_theta − pi_ref) for every score column, and the policy's win rate by total `reward`."""
    if len(policy_responses) != len(reference_responses):
        raise ValueError(
            f"compare_models needs one response per prompt from each model, got {len(policy_responses)} "
            f"and {len(reference_responses)}"
        )
    return {
        "models": {
            PI_THETA: model_metrics(policy_responses, policy_scores, samples, seed),
            PI_REF: model_metrics(reference_responses, reference_scores, samples, seed),
        },
        "difference": {
            name: paired_difference(policy_scores[name], reference_scores[name], samples, seed).as_dict()
            for name in policy_scores
        },
        "win_rate": win_rate(policy_scores["reward"], reference_scores["reward"]).as_dict(),
    }
