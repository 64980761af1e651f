"""pi_ref's own responses to the training prompts: the second response of built preference pairs.

`reference.pairs` resolves to what the train stage's pair algorithms (DPO, PRO) will read: `data` (the
data's chosen/rejected pairs), `built` or `none`. For `built`, pi_ref decodes each distinct prompt of the
training rows trained on greedily (the value targets' settings: reference.generate_max_new_tokens,
generate_batch_size, run.seed), the score stage's components score the responses, and one forward gives
their l_t like every row of the `reference` table (EOS appended, right-truncated, token hash). Table
`pi_ref_responses` has one row per training row trained on, carrying pi_ref's response to its prompt;
the train stage ranks each dataset response against it by reward.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from schemas.config import AlolConfig
from schemas.manifest import Summary
from schemas.reference import pi_ref_responses_schema
from stages.catalog import PI_REF_ID_SUFFIX, PI_REF_RESPONSES_TABLE
from stages.executor import ShardMapper
from stages.io import StageWriter
from stages.lm_shards import ShardModel, decode
from stages.models.tokenize import encode_response, response_truncated, token_digest
from stages.reference.logprobs import logprob_pass
from stages.reference.rows import EncodedRows

log = logging.getLogger("alol.reference")


def pairs_mode(setting: str, rows: EncodedRows) -> str:
    """`data`, `built` or `none` (schemas.reference.PAIR_SOURCES) for reference.pairs on these rows."""
    has_pairs = any(p is not None for p, s in zip(rows.preferences, rows.splits) if s == "train")
    if setting == "none":
        return "none"
    if setting == "built":
        return "built"
    if setting == "data":
        return "data" if has_pairs else "none"
    return "data" if has_pairs else "built"


@dataclass
class PiRefResponses:
    """What the stage's metrics report of pi_ref's responses."""

    rows: int = 0
    prompts: int = 0
    reward: Summary | None = None
    seconds: float | None = None

    def metrics(self) -> dict[str, Any]:
        return {
            "pi_ref_responses": self.rows, "pi_ref_response_prompts": self.prompts,
            "pi_ref_response_reward": self.reward, "pi_ref_responses_seconds": self.seconds,
        }


def write_pi_ref_responses(
    out: StageWriter, cfg: AlolConfig, mapper: ShardMapper, pi_ref: ShardModel, tokenizer: Any, rows: EncodedRows,
    scorer: Any, build: bool,
) -> PiRefResponses:
    """The `pi_ref_responses` table: pi_ref's greedy response for every training row trained on when `build`,
    else the table empty (its schema still names the reward components)."""
    schema = pi_ref_responses_schema(scorer.component_names)
    if not build:
        out.write_table(PI_REF_RESPONSES_TABLE, schema.empty_table(), schema)
        return PiRefResponses()
    ref, clock = cfg.reference, time.perf_counter()
    keys = list(rows.sft_prompts)
    prompts = [rows.sft_prompts[k] for k in keys]
    settings = {
        "max_prompt_tokens": ref.max_prompt_tokens, "max_new_tokens": ref.generate_max_new_tokens,
        "batch_size": ref.generate_batch_size, "seed": cfg.run.seed,
    }
    texts = decode(mapper, "reference pi_ref responses decoding", pi_ref, tokenizer, prompts, settings, log.name)
    scores = scorer.score(prompts, texts, ids=keys)
    first_row = {}
    for row, key in zip(rows.sft_rows, rows.sft_prompt_keys):
        first_row.setdefault(key, row)
    prompt_ids = [rows.prompt_ids[first_row[k]] for k in keys]
    response_ids = [encode_response(tokenizer, text, ref.max_response_tokens) for text in texts]
    token_logprobs = logprob_pass(
        mapper, "reference log-probs (pi_ref responses)", pi_ref, prompt_ids, response_ids, ref.token_budget,
        shared_prefix=rows.shared_prefix,
    ).token_logprobs
    position = {key: k for k, key in enumerate(keys)}
    at = [position[key] for key in rows.sft_prompt_keys]
    table = pa.table(
        {
            "id": [rows.ids[i] + PI_REF_ID_SUFFIX for i in rows.sft_rows],
            "row_id": [rows.ids[i] for i in rows.sft_rows],
            "prompt_id": rows.sft_prompt_keys,
            "response": [texts[k] for k in at],
            **{name: scores[name][at] for name in (*scorer.component_names, "reward")},
            "ref_logprob": [float(token_logprobs[k].astype(np.float64).sum()) for k in at],
            "ref_token_logprobs": [token_logprobs[k].tolist() for k in at],
            "response_tokens": [len(token_logprobs[k]) for k in at],
            "response_truncated": [response_truncated(tokenizer, response_ids[k]) for k in at],
            "token_hash": [token_digest(prompt_ids[k], response_ids[k]) for k in at],
        },
        schema=schema,
    )
    out.write_table(PI_REF_RESPONSES_TABLE, table, schema)
    return PiRefResponses(len(at), len(keys), Summary.of(np.asarray(scores["reward"])), round(time.perf_counter() - clock, 3))
