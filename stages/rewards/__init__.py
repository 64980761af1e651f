"""Reward components, one module per kind. `build_component` turns a component's config into its scorer."""

from __future__ import annotations

from typing import Any

from schemas.score import ComponentConfig
from stages.rewards.base import ComponentLoadError, RewardComponent, ScoreError
from stages.rewards.hf_classifier import HfClassifier
from stages.rewards.length import Length
from stages.rewards.profanity import Profanity
from stages.rewards.python import PythonFunction
from stages.rewards.relevance import Relevance
from stages.rewards.sentiment import Sentiment
from stages.rewards.tfidf import Tfidf
from stages.rewards.toxicity import Toxicity

COMPONENTS: dict[str, type[RewardComponent]] = {
    cls.kind: cls for cls in (Toxicity, Sentiment, Profanity, Relevance, Tfidf, Length, HfClassifier, PythonFunction)
}


def build_component(config: ComponentConfig, device: str = "cpu", state: dict[str, Any] | None = None) -> RewardComponent:
    """The scorer of one component (its model is loaded on first use, not here)."""
    return COMPONENTS[config.kind](config.options, device=device, state=state)


__all__ = ["COMPONENTS", "ComponentLoadError", "RewardComponent", "ScoreError", "build_component"]
