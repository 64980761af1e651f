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


def _as_seeds_by_prompts(values: np.ndarray, name: str) -> np.ndarray:
    """A (seeds, prompts) float64 matrix: one row per seed; a 1-d array is one seed."""
    matrix = np.asarray(values, dtype=np.float64)
    matrix = matrix[None, :] if matrix.ndim == 1 else matrix
    if matrix.ndim != 2 or matrix.size == 0:
        raise ValueError(f"{name} needs a non-empty (seeds, prompts) array, got shape {np.shape(values)}")
    return matrix


def _resample_seeds_and_prompts(
    shapes: Sequence[tuple[int, int]], samples: int, seed: int
) -> list[tuple[np.ndarray, np.ndarray]]:
    """For each bootstrap resample: per matrix, seed rows drawn with replacement (independently per matrix),
    and one draw of prompt columns shared by all matrices (the prompts are paired)."""
    prompts = {n for _, n in shapes}
    if len(prompts) != 1:
        raise ValueError(f"paired matrices need the same prompts, got shapes {list(shapes)}")
    n = prompts.pop()
    rng = np.random.default_rng(seed)
    draws = []
    for _ in range(samples):
        seed_rows = [rng.integers(0, k, size=k) for k, _ in shapes]
        columns = rng.integers(0, n, size=n)
        draws.append((seed_rows, columns))
    return draws


def _interval(estimate: float, resampled: np.ndarray, confidence: float) -> Interval:
    tail = (1.0 - confidence) / 2.0
    low, high = np.quantile(resampled, [tail, 1.0 - tail])
    return Interval(float(estimate), float(low), float(high))


def seeds_and_prompts_difference(
    a: np.ndarray, b: np.ndarray | None, samples: int, seed: int, confidence: float = CONFIDENCE
) -> Interval:
    """mean(a) − mean(b) over seeds and prompts, with a two-level percentile bootstrap interval.

    `a` is (K_a seeds, n prompts), `b` (K_b, n) on the same prompts, or None for the mean of `a` alone.
    Each resample draws K_a of a's seeds and K_b of b's with replacement (two methods' seeds are not
    paired) and n prompts with replacement, the same prompts for both (the prompts are paired), and
    takes mean(a[seeds_a][:, prompts]) − mean(b[seeds_b][:, prompts]). With one seed each this is the
    paired bootstrap over prompts; the interval covers the variation of both the prompts and the seeds.
    """
    if samples < 1:
        raise ValueError(f"the bootstrap needs samples >= 1, got {samples}")
    a = _as_seeds_by_prompts(a, "seeds_and_prompts_difference")
    b = np.zeros((1, a.shape[1])) if b is None else _as_seeds_by_prompts(b, "seeds_and_prompts_difference")
    resampled = np.empty(samples)
    for i, ((rows_a, rows_b), columns) in enumerate(_resample_seeds_and_prompts([a.shape, b.shape], samples, seed)):
        resampled[i] = a[rows_a][:, columns].mean() - b[rows_b][:, columns].mean()
    return _interval(a.mean() - b.mean(), resampled, confidence)


def length_controlled_fit(difference: np.ndarray, length_difference: np.ndarray) -> tuple[float, float]:
    """(intercept, slope) of the least-squares line difference = intercept + slope × length_difference.

    The intercept is the reward difference at equal response length (as length-controlled win rates
    adjust for length). When the length differences do not vary there is nothing to control for: the
    slope is 0 and the intercept the mean difference.
    """
    d = np.asarray(difference, dtype=np.float64).ravel()
    x = np.asarray(length_difference, dtype=np.float64).ravel()
    if d.shape != x.shape or d.size == 0:
        raise ValueError(f"length_controlled_fit needs equal non-empty shapes, got {d.shape} and {x.shape}")
    spread = x - x.mean()
    variance = float(np.dot(spread, spread))
    slope = float(np.dot(spread, d - d.mean()) / variance) if variance > 1e-12 else 0.0
    return float(d.mean() - slope * x.mean()), slope


def length_controlled_difference(
    reward_a: np.ndarray, length_a: np.ndarray, reward_b: np.ndarray, length_b: np.ndarray,
    samples: int, seed: int, confidence: float = CONFIDENCE,
) -> tuple[Interval, float]:
    """The length-controlled reward difference a − b and the fitted slope (reward per word).

    Per seed pair and prompt i: d = R_a − R_b and l = length_a − length_b (words); the estimate is the
    intercept of the least-squares line d = c + slope × l over all (seed of a, seed of b, prompt)
    triples (length_controlled_fit). The interval is the two-level bootstrap of
    seeds_and_prompts_difference, refitting the line on each resample. Arrays are (seeds, prompts),
    or 1-d for one seed.
    """
    ra, la = _as_seeds_by_prompts(reward_a, "reward_a"), _as_seeds_by_prompts(length_a, "length_a")
    rb, lb = _as_seeds_by_prompts(reward_b, "reward_b"), _as_seeds_by_prompts(length_b, "length_b")
    if ra.shape != la.shape or rb.shape != lb.shape:
        raise ValueError("each model's rewards and lengths need the same shape")

    def fit(rows_a: np.ndarray, rows_b: np.ndarray, columns: np.ndarray) -> tuple[float, float]:
        d = ra[rows_a][:, None, columns] - rb[rows_b][None, :, columns]
        x = la[rows_a][:, None, columns] - lb[rows_b][None, :, columns]
        return length_controlled_fit(d, x)

    everything = np.arange(ra.shape[1])
    estimate, slope = fit(np.arange(ra.shape[0]), np.arange(rb.shape[0]), everything)
    draws = _resample_seeds_and_prompts([ra.shape, rb.shape], samples, seed)
    resampled = np.array([fit(rows_a, rows_b, columns)[0] for (rows_a, rows_b), columns in draws])
    return _interval(estimate, resampled, confidence), slope
