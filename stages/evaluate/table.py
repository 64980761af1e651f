"""The `eval` table (schemas.evaluate.eval_schema): both models' responses to the same prompts, scored."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pyarrow as pa

from schemas.evaluate import MODELS, PI_REF, PI_THETA
from stages.evaluate.prompts import Prompt
from stages.executor import ShardMapper
from stages.metrics import words
from stages.rewards.scorer import Scorer
from stages.rewards.shards import score_rows


def score_both(
    mapper: ShardMapper, scorer: Scorer, ids: Sequence[str], prompts: Sequence[Prompt], responses: dict[str, list[str]],
    same: bool,
) -> dict[str, dict[str, np.ndarray]]:
    """Score pi_ref's responses, and pi_theta's unless they are the same responses, through `mapper`."""
    reference = score_rows(mapper, scorer, ids, prompts, responses[PI_REF], PI_REF)
    policy = reference if same else score_rows(mapper, scorer, ids, prompts, responses[PI_THETA], PI_THETA)
    return {PI_REF: reference, PI_THETA: policy}


def eval_table(
    ids: Sequence[str], prompts: Sequence[Prompt], responses: dict[str, list[str]], scores: dict[str, dict[str, np.ndarray]],
    schema: pa.Schema,
) -> pa.Table:
    """Rows of every (model, prompt): response, its reward columns and its length in words."""
    columns: dict[str, list[Any]] = {name: [] for name in schema.names}
    for model in MODELS:
        columns["id"] += list(ids)
        columns["prompt"] += list(prompts)
        columns["model"] += [model] * len(ids)
        columns["response"] += responses[model]
        for name, values in scores[model].items():
            columns[name] += values.tolist()
        columns["length_words"] += [len(words(r)) for r in responses[model]]
    return pa.Table.from_pydict(columns, schema=schema)
