"""sentiment = (c + 1) / 2, with c the VADER compound score of the response in [-1, 1] (rule-based, lexicon inside)."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import numpy as np

from stages.rewards.base import ComponentLoadError, Prompt, RewardComponent, package_dir, require_files

PIP_SPEC = "vaderSentiment==3.3.2"


@lru_cache(maxsize=1)
def load_analyzer():
    try:
        from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer
    except ImportError:
        raise ComponentLoadError(f"the sentiment component needs VADER: pip install {PIP_SPEC}") from None
    return SentimentIntensityAnalyzer()


class Sentiment(RewardComponent):
    kind = "sentiment"

    def model_files(self) -> list[Path]:
        folder = package_dir("vaderSentiment", PIP_SPEC)
        return require_files([folder / "vader_lexicon.txt", folder / "emoji_utf8_lexicon.txt"], PIP_SPEC)

    def _load(self):
        return load_analyzer()

    def _score(self, prompts: list[Prompt], responses: list[str]) -> np.ndarray:
        analyzer = self.load()
        compound = np.array([analyzer.polarity_scores(text)["compound"] for text in responses], dtype=np.float64)
        return (compound + 1.0) / 2.0
