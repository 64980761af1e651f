"""profanity = 1 - p(profane | response) from alt-profanity-check (a linear model on character n-grams)."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import numpy as np

from stages.rewards.base import ComponentLoadError, Prompt, RewardComponent, package_dir, require_files

PIP_SPEC = "alt-profanity-check==1.9.1"


@lru_cache(maxsize=1)
def load_predictor():
    """`profanity_check.predict_prob` (importing the package loads its scikit-learn model, a few seconds)."""
    try:
        from profanity_check import predict_prob
    except ImportError as exc:
        raise ComponentLoadError(f"the profanity component needs alt-profanity-check ({exc}): pip install {PIP_SPEC}") from None
    return predict_prob


class Profanity(RewardComponent):
    kind = "profanity"

    def model_files(self) -> list[Path]:
        folder = package_dir("profanity_check", PIP_SPEC) / "data"
        return require_files([folder / "vectorizer.joblib", folder / "model.joblib"], PIP_SPEC)

    def _load(self):
        return load_predictor()

    def _score(self, prompts: list[Prompt], responses: list[str]) -> np.ndarray:
        return 1.0 - np.asarray(self.load()(responses), dtype=np.float64)
