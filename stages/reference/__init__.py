"""Reference stage: pi_ref's log-probs of every train and validation response, and the value estimate V(x).

1. pi_ref is the base model, or (reference.sft_epochs > 0) the base model fine-tuned with the
   summed-token NLL  -sum_t log pi(y_t | x, y_<t)  on the training rows (chosen rows of preference
   pairs), saved in transformers format as `pi_ref/` in this stage's output; in this process, or
   (reference.sft_processes > 1) on processes the stage launches (stages.reference.sft_processes).
2. Value targets: pi_ref decodes each distinct validation prompt greedily; the score stage's
   components score the outputs, giving R(x, y_ref).
3. One pass over the train and validation rows, in batches of similar length under
   `reference.token_budget`, no grad: l_t for every response token (EOS included), L_ref = sum_t l_t,
   T, and pi_ref's last-layer hidden states at the prompt positions of the same causal forward
   (equal to a prompt-only forward). The validation rows go first: their prompt states are the
   features of the value head (stages.value_head), fitted before the training rows' pass, which
   then gives V(x) from its own forward. Each prompt is run through pi_ref once.
   The decodes and both passes are per-shard functions through `run.executor` (stages.executor): in
   this process with pi_ref as loaded here, or on a Ray actor pool (`run.workers.reference`) whose
   actors load pi_ref's folder once per map; the rows, their order and their batches are the same.
4. Pairs for DPO and PRO (stages.reference.pairs): `reference.pairs` resolves to the data's pairs, built
   pairs or none; for built pairs pi_ref decodes each distinct training prompt greedily, and its responses
   get rewards, log-probs and token hashes like the dataset's.

Outputs: table `reference` (id, split, preference, prompt_tokens, ref_logprob, ref_token_logprobs, response_tokens,
response_truncated, token_hash, value: schemas.reference.REFERENCE_SCHEMA),
table `value_targets` (prompt_id, prompt, response, one column per reward component, reward, value,
holdout), table `pi_ref_responses` (schemas.reference.pi_ref_responses_schema; empty unless pairs are
built), `value_head.safetensors`, and `pi_ref/` when fine-tuned. Metrics: rows per split, r_max,
value head fit (train and held-out MSE, the MSE of always predicting the mean on each, chosen epoch),
log-prob and value statistics, rows at the token limits (prompts of that length, responses cut), timings
and the log-prob pass's tokens/s.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np
import pyarrow as pa

from schemas.config import AlolConfig
from schemas.manifest import StageResult, Summary
from schemas.reference import ReferenceMetrics, value_targets_schema
from stages.catalog import PI_REF_FOLDER, VALUE_HEAD_FILE, load_scorer
from stages.executor import ShardMapper
from stages.io import StageReader, StageWriter
from stages.lm_shards import ShardModel, decode, device_type, torch_device
from stages.models.store import load_causal_lm, load_tokenizer, resolve_model, save_model_folder
from stages.reference.logprobs import logprob_pass, reference_logprobs, write_reference
from stages.reference.pairs import pairs_mode, write_pi_ref_responses
from stages.reference.rows import EncodedRows, encode_rows
from stages.reference.sft import fine_tune_reference
from stages.reference.sft_processes import fine_tune_on_processes
from stages.value_head import fit_value_head, predict_values, save_value_head

__all__ = ["encode_rows", "fine_tune_reference", "reference_logprobs", "run"]

log = logging.getLogger("alol.reference")


# --------------------------------------------------------------------------- the stage


def _value_targets(
    cfg: AlolConfig, inputs: dict[str, StageReader], mapper: ShardMapper, pi_ref: ShardModel, tokenizer: Any,
    rows: EncodedRows, scorer: Any,
) -> tuple[list[str], list[list[dict[str, str]]], list[str], dict[str, np.ndarray], list[str], float]:
    """pi_ref's greedy output on each distinct validation prompt, scored by the score stage's components."""
    ref = cfg.reference
    keys = list(rows.validation_prompts)
    prompts = [rows.validation_prompts[k] for k in keys]
    if len(prompts) < 2:
        raise ValueError(
            f"{inputs['ingest'].dir}: {len(prompts)} distinct validation prompts; the value head needs at least 2 "
            "(raise data.max_rows_per_split or data.split_fractions.validation)"
        )
    settings = {
        "max_prompt_tokens": ref.max_prompt_tokens, "max_new_tokens": ref.generate_max_new_tokens,
        "batch_size": ref.generate_batch_size, "seed": cfg.run.seed,
    }
    responses = decode(mapper, "reference value-target decoding", pi_ref, tokenizer, prompts, settings, log.name)
    scores = scorer.score(prompts, responses, ids=keys)
    return keys, prompts, responses, scores, scorer.component_names, scorer.r_max


def run(cfg: AlolConfig, inputs: dict[str, StageReader], out: StageWriter) -> StageResult:
    """pi_ref (optionally fine-tuned), its value head, and its log-probs of every train and validation row."""
    ref, device = cfg.reference, torch_device()
    mapper = ShardMapper.for_stage(cfg, "reference")
    timings: dict[str, float] = {}
    clock = time.perf_counter()

    base_path = resolve_model(ref.model, cfg.run.cache_dir)
    tokenizer = load_tokenizer(base_path)
    rows = encode_rows(inputs["ingest"], tokenizer, ref)
    if not rows.ids:
        raise ValueError(f"{inputs['ingest'].dir}: the ingest output has no train or validation rows")
    # On Ray without SFT the actors load pi_ref, and an SFT on processes loads it there: this process only reads its config.
    sft_on_processes = ref.sft_epochs > 0 and ref.sft_processes > 1
    loads = (mapper.in_process or ref.sft_epochs > 0) and not sft_on_processes
    model = load_causal_lm(base_path).to(device) if loads else None
    hidden = (model.config if model is not None else _model_config(base_path)).hidden_size
    if hidden % cfg.value.heads:
        raise ValueError(f"value.heads ({cfg.value.heads}) must divide the hidden size {hidden} of {base_path}")
    timings["load_seconds"] = time.perf_counter() - clock

    sft_metrics: dict[str, Any] = {}
    pi_ref_path = base_path
    if ref.sft_epochs > 0:
        clock = time.perf_counter()
        if sft_on_processes:
            model, sft_metrics = fine_tune_on_processes(base_path, rows, ref, cfg.run.seed)
            model = model.to(device)
        else:
            sft_metrics = fine_tune_reference(model, rows, ref, cfg.run.seed)
        pi_ref_path = out.path(PI_REF_FOLDER)
        save_model_folder(model, tokenizer, pi_ref_path)
        timings["sft_seconds"] = time.perf_counter() - clock
    pi_ref = ShardModel.of(mapper, pi_ref_path, model, tokenizer)

    clock = time.perf_counter()
    scorer = load_scorer(cfg, inputs["score"])
    keys, prompts, responses, scores, component_names, r_max = _value_targets(cfg, inputs, mapper, pi_ref, tokenizer, rows, scorer)
    timings["value_targets_seconds"] = time.perf_counter() - clock

    # Validation rows first: their prompt states (from the log-prob forward) are the value head's features.
    validation = [i for i, s in enumerate(rows.splits) if s == "validation"]
    train = [i for i, s in enumerate(rows.splits) if s == "train"]
    first_pass = logprob_pass(
        mapper, "reference log-probs and value features (validation)", pi_ref,
        [rows.prompt_ids[i] for i in validation], [rows.response_ids[i] for i in validation],
        ref.token_budget, keep_prompt_states=True, shared_prefix=rows.shared_prefix,
    )
    position = {row: k for k, row in enumerate(validation)}
    target_states = [first_pass.prompt_states[position[rows.validation_first_row[key]]] for key in keys]

    clock = time.perf_counter()
    value = cfg.value
    fit = fit_value_head(
        target_states, scores["reward"].tolist(), r_max=r_max, heads=value.heads, dropout=value.dropout,
        epochs=value.epochs, learning_rate=value.learning_rate, batch_size=value.batch_size,
        holdout_fraction=value.holdout_fraction, seed=cfg.run.seed,
    )
    save_value_head(fit.head, out.path(VALUE_HEAD_FILE))
    out.write_table(
        "value_targets",
        pa.Table.from_pydict(
            {
                "prompt_id": keys, "prompt": prompts, "response": responses,
                **{name: scores[name] for name in component_names},
                "reward": scores["reward"], "value": predict_values(fit.head, target_states).numpy(),
                "holdout": fit.holdout_mask,
            },
            schema=value_targets_schema(component_names),
        ),
    )
    timings["value_head_seconds"] = time.perf_counter() - clock
    log.info(
        "value head: epoch %d, held-out MSE %.4g vs %.4g for the mean (train %.4g vs %.4g)",
        fit.chosen_epoch, fit.holdout_mse, fit.mean_baseline_holdout_mse, fit.train_mse, fit.mean_baseline_train_mse,
    )

    second_pass = logprob_pass(
        mapper, "reference log-probs and V(x) (train)", pi_ref,
        [rows.prompt_ids[i] for i in train], [rows.response_ids[i] for i in train], ref.token_budget, head=fit.head,
        shared_prefix=rows.shared_prefix,
    )
    token_logprobs: list[np.ndarray] = [np.zeros(0, np.float32)] * len(rows.ids)
    values = np.full(len(rows.ids), np.nan)
    for index, lp in zip(validation, first_pass.token_logprobs):
        token_logprobs[index] = lp
    values[validation] = predict_values(fit.head.cpu(), first_pass.prompt_states).numpy()
    for index, lp in zip(train, second_pass.token_logprobs):
        token_logprobs[index] = lp
    values[train] = second_pass.values
    write_reference(out, rows, token_logprobs, values)
    mode = pairs_mode(ref.pairs, rows)
    own = write_pi_ref_responses(out, cfg, mapper, pi_ref, tokenizer, rows, scorer, build=mode == "built")

    tokens = first_pass.tokens + second_pass.tokens
    timings["logprob_seconds"] = first_pass.seconds + second_pass.seconds
    ref_logprobs = np.array([lp.astype(np.float64).sum() for lp in token_logprobs])
    metrics = ReferenceMetrics(**{
        "pi_ref": "sft" if ref.sft_epochs > 0 else "base",
        "model": ref.model,
        "hidden_size": hidden,
        "device": device_type(mapper),
        "rows": {"train": len(train), "validation": len(validation)},
        "prompts_at_token_limit": rows.prompts_at_token_limit,
        "responses_at_token_limit": rows.responses_at_token_limit,
        "r_max": r_max,
        "value_target_prompts": len(prompts),
        "value_target_reward": Summary.of(scores["reward"]),
        **fit.metrics(),
        "ref_logprob": Summary.of(ref_logprobs),
        "response_tokens": Summary.of(np.array([len(lp) for lp in token_logprobs], dtype=np.float64)),
        "value": Summary.of(values),
        "logprob_tokens": tokens,
        "logprob_tokens_per_s": tokens / max(timings["logprob_seconds"], 1e-9),
        "pairs": mode,
        **own.metrics(),
        **sft_metrics,
        **{k: round(v, 3) for k, v in timings.items()},
    })
    return StageResult(
        rows_in=len(rows.ids), rows_out=len(rows.ids), rows_rejected=0, metrics=metrics, execution=mapper.execution()
    )


def _model_config(path: Any) -> Any:
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(path)
