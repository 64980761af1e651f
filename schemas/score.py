"""Score stage: reward components (one column each) and the weighted total `reward`."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from schemas.base import Section

ComponentKind = Literal[
    "toxicity", "sentiment", "profanity", "relevance", "tfidf", "length", "hf_classifier", "python"
]


class ComponentConfig(Section):
    """One reward component: its column name, kind, weight and kind-specific options."""

    name: str = Field(..., pattern=r"^[a-z][a-z0-9_]*$", description="Column name of this component's score.")
    kind: ComponentKind = Field(..., description="Which scorer computes the component.")
    weight: float = Field(1.0, description="Weight in R = sum(weight x score). The paper sums unweighted components.")
    options: dict[str, Any] = Field(default_factory=dict, description="Kind-specific options (see README).")


def _default_components() -> list[ComponentConfig]:
    return [
        ComponentConfig(name="safety", kind="toxicity"),
        ComponentConfig(name="sentiment", kind="sentiment"),
        ComponentConfig(name="relevance", kind="relevance"),
        ComponentConfig(name="tfidf", kind="tfidf"),
    ]


class ScoreConfig(Section):
    """Reward components. R in [0, sum of weights x upper bounds] (R_max), used by the value head."""

    components: list[ComponentConfig] = Field(
        default_factory=_default_components, description="Reward components, each stored as its own column."
    )
    batch_size: int = Field(64, gt=0, description="Rows per scoring batch.")

    @model_validator(mode="after")
    def _unique_names(self) -> ScoreConfig:
        names = [c.name for c in self.components]
        if not names:
            raise ValueError("score.components needs at least one component")
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"score.components has duplicate names: {', '.join(dupes)}")
        if "reward" in names or "id" in names:
            raise ValueError("score.components names 'reward' and 'id' are reserved")
        return self
