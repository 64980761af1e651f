"""length = min(n, target) / max(n, target) for a response of n whitespace-separated words (0 when empty)."""

from __future__ import annotations

import numpy as np

from stages.rewards.base import Prompt, RewardComponent


class Length(RewardComponent):
    kind = "length"

    def _score(self, prompts: list[Prompt], responses: list[str]) -> np.ndarray:
        words = np.array([len(text.split()) for text in responses], dtype=np.float64)
        target = float(self.options.target_words)
        return np.minimum(words, target) / np.maximum(words, target)
