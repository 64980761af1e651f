"""Priority sampling with replacement (../shared/method.md, Advantage, filter, priority sampling).

Row i is drawn with probability w_i / sum_j w_j: w = A+ for the A-LoL family (so rows with A <= 0
are never drawn), w = R for the reward baselines, w = 1 for NLL. Only rows with w_i > 0 are
candidates at all. Seeded; its state (the generator's and the number of draws) is saved with each
resume checkpoint, so a resumed run draws exactly the rows the uninterrupted run would have.
"""

from __future__ import annotations

import hashlib
from typing import Any

import numpy as np


class SamplerError(ValueError):
    """Weights that cannot define a sampling distribution."""


class PrioritySampler:
    """Draws row indices i with replacement, P(i) = w_i / sum_j w_j; rows with w_i <= 0 are never drawn."""

    def __init__(self, weights: np.ndarray, seed: int):
        weights = np.asarray(weights, dtype=np.float64)
        bad = np.flatnonzero(~np.isfinite(weights))
        if bad.size:
            raise SamplerError(f"sampling weight of row {bad[0]} is {weights[bad[0]]}; weights must be finite")
        self.rows = weights.size
        self.candidates = np.flatnonzero(weights > 0)
        if self.candidates.size == 0:
            raise SamplerError(f"none of the {weights.size} rows has a positive sampling weight; nothing to train on")
        self.cumulative = np.cumsum(weights[self.candidates])
        self.fingerprint = hashlib.sha256(weights.tobytes()).hexdigest()[:16]
        self.rng = np.random.default_rng(seed)
        self.draws = 0

    @property
    def probabilities(self) -> np.ndarray:
        """P(i) for every row (zero for rows that are never drawn)."""
        p = np.zeros(self.rows)
        p[self.candidates] = np.diff(self.cumulative, prepend=0.0) / self.cumulative[-1]
        return p

    def draw(self, count: int) -> np.ndarray:
        """`count` row indices: u ~ U[0, sum w), the candidate whose cumulative weight first exceeds u."""
        u = self.rng.random(count) * self.cumulative[-1]
        picked = np.searchsorted(self.cumulative, u, side="right")
        self.draws += count
        return self.candidates[np.minimum(picked, self.candidates.size - 1)]

    def state_dict(self) -> dict[str, Any]:
        return {"fingerprint": self.fingerprint, "draws": self.draws, "rng": self.rng.bit_generator.state}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["fingerprint"] != self.fingerprint:
            raise SamplerError(
                f"the saved sampler state belongs to other weights (fingerprint {state['fingerprint']}, "
                f"these {self.fingerprint}); delete the resume folder to start over"
            )
        self.rng.bit_generator.state = state["rng"]
        self.draws = state["draws"]
