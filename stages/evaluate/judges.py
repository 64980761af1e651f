"""The judges (`evaluate.judges`): scores of the evaluation's responses that no training reward uses.

A judge is a reward component kind (schemas.score) the score stage does not use, or `fluency`
(stages.rewards.fluency: an independent language model). Its column of `eval` stands beside `reward`,
so a gain on the training reward can be read against a judge the training never saw. Scores are
cached per judge and response set in a stages.cache.ParquetCache under `<run.cache_dir>/judges`,
keyed like the score stage's columns (stages.rewards.scorer.component_cache_key) with the ids,
prompts and responses as the input: pi_ref's responses are judged once for every algorithm.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa

from schemas.base import canonical_json, sha256_text
from schemas.config import AlolConfig
from schemas.evaluate import JudgeConfig
from stages.cache import ParquetCache
from stages.evaluate.prompts import Prompt
from stages.rewards import COMPONENTS, RewardComponent
from stages.rewards.base import torch_device
from stages.rewards.fluency import Fluency
from stages.rewards.scorer import check_scores, component_cache_key

log = logging.getLogger("alol.evaluate")
JUDGE_SCHEMA = pa.schema([("id", pa.string()), ("score", pa.float64())])


def build_judge(judge: JudgeConfig, device: str, cache_dir: str | Path) -> RewardComponent:
    """The scorer of one judge (its model is loaded on first use)."""
    if judge.kind == Fluency.kind:
        return Fluency(judge.options, device, cache_dir=cache_dir)
    return COMPONENTS[judge.kind](judge.options, device=device)


class Judges:
    """`score(ids, prompts, responses)` -> {judge name: scores}, through the cache."""

    def __init__(self, cfg: AlolConfig):
        device = torch_device(cfg.score.device)
        self.configs = {j.name: j for j in cfg.evaluate.judges}
        self.components = {name: build_judge(j, device, cfg.run.cache_dir) for name, j in self.configs.items()}
        self.cache = ParquetCache(Path(cfg.run.cache_dir) / "judges")
        self.cache_hits = 0

    @property
    def names(self) -> list[str]:
        return list(self.configs)

    def score(self, ids: Sequence[str], prompts: Sequence[Prompt], responses: Sequence[str]) -> dict[str, np.ndarray]:
        input_hash = sha256_text(canonical_json([list(ids), list(prompts), list(responses)]))
        columns = {}
        for name, component in self.components.items():
            key = component_cache_key(self.configs[name], component, component.fingerprint(), input_hash)
            entry = self.cache.load(key, list(ids))
            if entry is not None:
                self.cache_hits += 1
                columns[name] = entry.table.column("score").to_numpy()
                continue
            scores = component.score(list(prompts), list(responses))
            check_scores(name, component, scores, list(ids))
            self.cache.save(key, pa.table({"id": list(ids), "score": scores}, schema=JUDGE_SCHEMA), {"judge": name, "kind": component.kind})
            log.info("judge %s: %d responses scored, mean %.4f", name, len(scores), float(np.mean(scores)))
            columns[name] = scores
        return columns
