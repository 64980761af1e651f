"""Scoring as per-shard functions (stages.executor): one reward component over (id, prompt, response) rows.

    scores = score_rows(mapper, scorer, ids, prompts, responses, "evaluate pi_ref")

Each shard is scored in batches of score.batch_size (shards are whole batches), so the scores equal
`Scorer.score` over the whole list; each actor builds the Scorer once, with the fitted states.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from schemas.ingest import MESSAGE_TYPE
from schemas.score import ScoreConfig
from stages.executor import ShardFunction, ShardMapper
from stages.rewards.base import Prompt
from stages.rewards.scorer import Scorer


@dataclass(frozen=True)
class ComponentShards:
    """Builds the per-shard function of one component: (id, prompt, response) rows -> (score)."""

    config: ScoreConfig
    states: dict[str, dict[str, Any] | None]
    name: str

    def __call__(self) -> ShardFunction:
        scorer = Scorer(self.config, self.states)

        def score(shard: pa.Table) -> pa.Table:
            prompts, responses = shard.column("prompt").to_pylist(), shard.column("response").to_pylist()
            values = scorer.score_component(self.name, prompts, responses, shard.column("id").to_pylist())
            return pa.table({"score": pa.array(values, pa.float64())})

        return score


def score_rows(
    mapper: ShardMapper, scorer: Scorer, ids: Sequence[str], prompts: Sequence[Prompt], responses: Sequence[str], what: str
) -> dict[str, np.ndarray]:
    """`scorer.score(prompts, responses, ids)` through `mapper`: {component name: scores, "reward": R}."""
    rows = pa.table({
        "id": pa.array(list(ids), pa.string()), "prompt": pa.array(list(prompts), pa.list_(MESSAGE_TYPE)),
        "response": pa.array(list(responses), pa.string()),
    })
    columns = {
        name: mapper.map_shards(
            f"score {name} ({what})", rows, ComponentShards(scorer.config, scorer.states, name), scorer.batch_size
        ).column("score").to_numpy()
        for name in scorer.component_names
    }
    columns["reward"] = scorer.combine(columns)
    return columns
