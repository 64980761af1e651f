"""The Scorer: the configured reward components as one object, `score(prompts, responses)`.

Used by the score stage over the ingest rows, and through `stages.catalog.load_scorer` by the
reference stage (pi_ref's value-target decodes), training validation and the evaluate stage.

    reward = sum_c weight_c x score_c,        R_max = sum_c weight_c x upper_c
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from schemas.base import canonical_json, sha256_text
from schemas.score import ComponentConfig, ScoreConfig
from stages.rewards import COMPONENTS, RewardComponent, ScoreError, build_component
from stages.rewards.base import Prompt, torch_device


class Scorer:
    """The configured reward components: `score(prompts, responses)` -> {component name: scores, "reward": R}."""

    def __init__(self, config: ScoreConfig, states: dict[str, dict[str, Any] | None] | None = None):
        states = states or {}
        self.config, self.states = config, states
        self.batch_size = config.batch_size
        device = torch_device(config.device)
        self.configs: dict[str, ComponentConfig] = {c.name: c for c in config.components}
        self.components: dict[str, RewardComponent] = {
            c.name: build_component(c, device, states.get(c.name)) for c in config.components
        }

    @property
    def component_names(self) -> list[str]:
        return list(self.configs)

    @property
    def weights(self) -> dict[str, float]:
        return {name: c.weight for name, c in self.configs.items()}

    @property
    def r_max(self) -> float:
        """sum of weight x upper bound: the largest reward, scale of the value head."""
        return float(sum(c.weight * self.components[n].upper for n, c in self.configs.items()))

    @property
    def r_min(self) -> float:
        return float(sum(c.weight * self.components[n].lower for n, c in self.configs.items()))

    def score_component(
        self, name: str, prompts: list[Prompt], responses: list[str], ids: list[str] | None = None, progress: tqdm | None = None
    ) -> np.ndarray:
        """One component's scores, in batches of `batch_size`, each checked against the declared bounds."""
        component = self.components[name]
        scores = np.empty(len(responses), dtype=np.float64)
        for start in range(0, len(responses), self.batch_size):
            stop = min(start + self.batch_size, len(responses))
            scores[start:stop] = component.score(prompts[start:stop], responses[start:stop])
            if progress is not None:
                progress.update(stop - start)
        check_scores(name, component, scores, ids)
        return scores

    def combine(self, columns: dict[str, np.ndarray]) -> np.ndarray:
        """reward = sum over components of weight x score."""
        reward = np.zeros(len(next(iter(columns.values()))), dtype=np.float64)
        for name, weight in self.weights.items():
            reward += weight * columns[name]
        return reward

    def score(
        self, prompts: list[Prompt], responses: list[str], ids: list[str] | None = None, progress: bool = True
    ) -> dict[str, np.ndarray]:
        """{component name: float64 scores, "reward": weighted sum}; `ids` only name rows in errors."""
        if len(prompts) != len(responses):
            raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
        columns = {}
        for name in self.component_names:
            with tqdm(total=len(responses), desc=f"score {name}", unit="rows", disable=not progress) as bar:
                columns[name] = self.score_component(name, prompts, responses, ids, bar)
        columns["reward"] = self.combine(columns)
        return columns


def component_cache_key(config: ComponentConfig | Any, component: RewardComponent, fingerprint: str | None, input_hash: str) -> str:
    """sha256 of what determines a component's scores: kind, options, model fingerprint, code and input (not name or weight).

    `config` is a score component (schemas.score.ComponentConfig) or an evaluation judge (schemas.evaluate.JudgeConfig).
    """
    payload = {
        "kind": config.kind,
        "options": config.options.model_dump(mode="json"),
        "model": fingerprint,
        "code": component.code_fingerprint(),
        "input": input_hash,
    }
    return sha256_text(canonical_json(payload))


def check_scores(name: str, component: RewardComponent, scores: np.ndarray, ids: list[str] | None) -> None:
    """NaN, infinite or out-of-bounds scores are errors naming the component and the first bad row."""
    bad = ~np.isfinite(scores) | (scores < component.lower) | (scores > component.upper)
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        where = f"row id {ids[row]!r}" if ids is not None else f"row {row}"
        value = float(scores[row])
        problem = "not a finite number" if not np.isfinite(value) else "outside its declared bounds"
        raise ScoreError(
            f"reward component {name!r} ({component.kind}): {where} scored {value}, {problem} "
            f"[{component.lower}, {component.upper}] ({int(bad.sum())} bad rows in this batch)"
        )


def fit_states(config: ScoreConfig, train_responses: Iterator[str] | list[str]) -> dict[str, dict[str, Any] | None]:
    """State of each component that learns from the training responses (tf-idf); None for the others."""
    fitted = [c.name for c in config.components if COMPONENTS[c.kind].fitted]
    responses = list(train_responses) if fitted else []
    if fitted and not responses:
        raise ValueError(f"components {fitted} are fit on the training responses, but the input has no train rows")
    return {c.name: COMPONENTS[c.kind].fit(c.options, responses) if c.name in fitted else None for c in config.components}
