"""Reference stage: pi_ref's log-probs of every train and validation response, and the value estimate V(x).

1. pi_ref is the base model, or (reference.sft_epochs > 0) the base model fine-tuned with the
   summed-token NLL  -sum_t log pi(y_t | x, y_<t)  on the training rows (chosen rows of preference
   pairs), saved in transformers format as `pi_ref/` in this stage's output.
2. Value targets: pi_ref decodes each distinct validation prompt greedily; the score stage's
   components score the outputs, giving R(x, y_ref).
3. One pass over the train and validation rows, in batches of similar length under
   `reference.token_budget`, no grad: l_t for every response token (EOS included), L_ref = sum_t l_t,
   T, and pi_ref's last-layer hidden states at the prompt positions of the same causal forward
   (equal to a prompt-only forward). The validation rows go first: their prompt states are the
   features of the value head (stages.value_head), fitted before the training rows' pass, which
   then gives V(x) from its own forward. Each prompt is run through pi_ref once.

Outputs: table `reference` (id, split, preference, ref_logprob, ref_token_logprobs, response_tokens,
response_truncated, token_hash, value: schemas.reference.REFERENCE_SCHEMA),
table `value_targets` (prompt_id, prompt, response, one column per reward component, reward, value,
holdout), `value_head.safetensors`, and `pi_ref/` when fine-tuned. Metrics: rows per split, r_max,
value head fit (train and held-out MSE, the MSE of always predicting the mean on each, chosen epoch),
log-prob and value statistics, rows at the token limits (prompts of that length, responses cut), timings
and the log-prob pass's tokens/s.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import torch
from tqdm.auto import tqdm

from schemas.config import AlolConfig
from schemas.manifest import StageResult, Summary
from schemas.reference import REFERENCE_SCHEMA, ReferenceConfig, ReferenceMetrics, value_targets_schema
from stages.catalog import PI_REF_FOLDER, VALUE_HEAD_FILE, load_scorer, prompt_key
from stages.faults import failpoint
from stages.io import StageReader, StageWriter
from stages.losses import nll, nll_batch
from stages.models.generate import generate
from stages.models.logprobs import length_batches, response_logprobs_and_prompt_states, response_token_logprobs
from stages.models.store import load_causal_lm, load_tokenizer, resolve_model, save_model_folder
from stages.models.tokenize import encode_pair, response_truncated, token_digest
from stages.value_head import AttentionPoolingValueHead, fit_value_head, predict_values, save_value_head

log = logging.getLogger("alol.reference")

SPLITS = ("train", "validation")
WRITE_ROWS = 8192


@dataclass
class EncodedRows:
    """The train and validation rows of ingest, tokenised; validation prompts kept for the value targets."""

    ids: list[str] = field(default_factory=list)
    splits: list[str] = field(default_factory=list)
    preferences: list[str | None] = field(default_factory=list)
    prompt_ids: list[list[int]] = field(default_factory=list)
    response_ids: list[list[int]] = field(default_factory=list)
    truncated: list[bool] = field(default_factory=list)
    sft_rows: list[int] = field(default_factory=list)
    validation_prompts: dict[str, list[dict[str, str]]] = field(default_factory=dict)
    validation_first_row: dict[str, int] = field(default_factory=dict)
    prompts_at_token_limit: int = 0
    responses_at_token_limit: int = 0


def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def encode_rows(ingest: StageReader, tokenizer: Any, ref: ReferenceConfig, batch_rows: int = 4096) -> EncodedRows:
    """Stream the train and validation rows of the `ingest` table and tokenise them (stages.models.tokenize.encode_pair)."""
    rows = EncodedRows()
    wanted = pads.field("split").isin(list(SPLITS))
    columns = ["id", "split", "prompt", "response", "preference"]
    for batch in ingest.dataset("ingest").to_batches(columns=columns, filter=wanted, batch_size=batch_rows):
        for row in batch.to_pylist():
            prompt_ids, response_ids = encode_pair(
                tokenizer, row["prompt"], row["response"], ref.max_prompt_tokens, ref.max_response_tokens
            )
            truncated = response_truncated(tokenizer, response_ids)
            rows.prompts_at_token_limit += len(prompt_ids) == ref.max_prompt_tokens
            rows.responses_at_token_limit += truncated
            if row["split"] == "train" and row["preference"] in (None, "chosen"):
                rows.sft_rows.append(len(rows.ids))
            if row["split"] == "validation":
                key = prompt_key(row["prompt"])
                rows.validation_prompts.setdefault(key, row["prompt"])
                rows.validation_first_row.setdefault(key, len(rows.ids))
            rows.ids.append(row["id"])
            rows.splits.append(row["split"])
            rows.preferences.append(row["preference"])
            rows.prompt_ids.append(prompt_ids)
            rows.response_ids.append(response_ids)
            rows.truncated.append(truncated)
    return rows


# --------------------------------------------------------------------------- optional SFT of pi_ref


def fine_tune_reference(
    model: Any, rows: EncodedRows, ref: ReferenceConfig, seed: int
) -> dict[str, float | int]:
    """Summed-token NLL fine-tuning in place: loss = mean over the batch of -sum_t l_t (stages.losses.nll;
    AdamW, grad-norm clip 1.0)."""
    if not rows.sft_rows:
        raise ValueError("reference.sft_epochs > 0 but the ingest output has no training rows to fine-tune pi_ref on")
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=ref.sft_learning_rate)
    model.train()
    losses: list[float] = []
    epoch_means: list[float] = []
    for epoch in range(1, ref.sft_epochs + 1):
        order = [rows.sft_rows[i] for i in torch.randperm(len(rows.sft_rows), generator=generator).tolist()]
        batches = [order[s : s + ref.sft_batch_size] for s in range(0, len(order), ref.sft_batch_size)]
        for batch in tqdm(batches, desc=f"SFT pi_ref epoch {epoch}", unit="batch"):
            logprobs = response_token_logprobs(
                model, [rows.prompt_ids[i] for i in batch], [rows.response_ids[i] for i in batch]
            )
            loss = nll(nll_batch(logprobs)).loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            losses.append(float(loss.detach()))
            failpoint("reference.sft")
        epoch_means.append(float(np.mean(losses[-len(batches) :])))
        log.info("SFT epoch %d: mean summed-token NLL %.4f", epoch, epoch_means[-1])
    model.eval()
    # Single batches are noisy; the per-epoch means show whether the fine-tuning converged.
    return {"sft_steps": len(losses), "sft_first_loss": losses[0], "sft_last_loss": losses[-1], "sft_epoch_losses": epoch_means}


# --------------------------------------------------------------------------- the log-prob pass


@dataclass
class ReferencePass:
    """Per row: l_t (float32), and V(x) when a head was given or the prompt states when asked for."""

    token_logprobs: list[np.ndarray]
    values: np.ndarray | None
    prompt_states: list[torch.Tensor] | None
    tokens: int
    seconds: float


def reference_logprobs(
    model: Any,
    prompt_ids: Sequence[list[int]],
    response_ids: Sequence[list[int]],
    token_budget: int,
    head: AttentionPoolingValueHead | None = None,
    keep_prompt_states: bool = False,
    progress: bool = True,
) -> ReferencePass:
    """l_t of every response token in length-sorted batches under `token_budget`, no grad.

    With `head`, V(x) from the prompt positions of the same forward; with `keep_prompt_states`, those
    states themselves (P_i x hidden, float32, CPU).
    """
    n = len(prompt_ids)
    token_logprobs: list[np.ndarray | None] = [None] * n
    values = np.full(n, np.nan) if head is not None else None
    kept: list[torch.Tensor | None] | None = [None] * n if keep_prompt_states else None
    lengths = [len(p) + len(r) for p, r in zip(prompt_ids, response_ids)]
    started = time.perf_counter()
    with torch.inference_mode():
        for batch in tqdm(length_batches(lengths, token_budget), desc="reference log-probs", unit="batch", disable=not progress):
            prompts, responses = [prompt_ids[i] for i in batch], [response_ids[i] for i in batch]
            if head is None and kept is None:
                rows = response_token_logprobs(model, prompts, responses)
            else:
                rows, states = response_logprobs_and_prompt_states(model, prompts, responses)
                if head is not None:
                    values[batch] = predict_values(head, states).cpu().numpy()
                if kept is not None:
                    for i, state in zip(batch, states):
                        kept[i] = state.float().cpu().clone()
            for i, lp in zip(batch, rows):
                token_logprobs[i] = lp.float().cpu().numpy()
            failpoint("reference.logprobs")
    return ReferencePass(token_logprobs, values, kept, sum(lengths), time.perf_counter() - started)  # type: ignore[arg-type]


def _write_reference(out: StageWriter, rows: EncodedRows, token_logprobs: list[np.ndarray], values: np.ndarray) -> None:
    with out.table("reference", REFERENCE_SCHEMA) as table:
        for start in range(0, len(rows.ids), WRITE_ROWS):
            stop = min(start + WRITE_ROWS, len(rows.ids))
            token_lps = token_logprobs[start:stop]
            table.write(
                {
                    "id": rows.ids[start:stop],
                    "split": rows.splits[start:stop],
                    "preference": rows.preferences[start:stop],
                    "ref_logprob": [float(lp.astype(np.float64).sum()) for lp in token_lps],
                    "ref_token_logprobs": [lp.tolist() for lp in token_lps],
                    "response_tokens": [len(lp) for lp in token_lps],
                    "response_truncated": rows.truncated[start:stop],
                    "token_hash": [
                        token_digest(p, r) for p, r in zip(rows.prompt_ids[start:stop], rows.response_ids[start:stop])
                    ],
                    "value": values[start:stop].tolist(),
                }
            )


# --------------------------------------------------------------------------- the stage


def _value_targets(
    cfg: AlolConfig, inputs: dict[str, StageReader], model: Any, tokenizer: Any, rows: EncodedRows
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
    responses = generate(
        model, tokenizer, prompts, max_prompt_tokens=ref.max_prompt_tokens,
        max_new_tokens=ref.generate_max_new_tokens, batch_size=ref.generate_batch_size, seed=cfg.run.seed,
        progress=log,
    )
    scorer = load_scorer(cfg, inputs["score"])
    scores = scorer.score(prompts, responses, ids=keys)
    return keys, prompts, responses, scores, scorer.component_names, scorer.r_max


def run(cfg: AlolConfig, inputs: dict[str, StageReader], out: StageWriter) -> StageResult:
    """pi_ref (optionally fine-tuned), its value head, and its log-probs of every train and validation row."""
    ref, device = cfg.reference, _device()
    timings: dict[str, float] = {}
    clock = time.perf_counter()

    base_path = resolve_model(ref.model, cfg.run.cache_dir)
    tokenizer = load_tokenizer(base_path)
    rows = encode_rows(inputs["ingest"], tokenizer, ref)
    if not rows.ids:
        raise ValueError(f"{inputs['ingest'].dir}: the ingest output has no train or validation rows")
    model = load_causal_lm(base_path).to(device)
    hidden = model.config.hidden_size
    if hidden % cfg.value.heads:
        raise ValueError(f"value.heads ({cfg.value.heads}) must divide the hidden size {hidden} of {base_path}")
    timings["load_seconds"] = time.perf_counter() - clock

    sft_metrics: dict[str, Any] = {}
    if ref.sft_epochs > 0:
        clock = time.perf_counter()
        sft_metrics = fine_tune_reference(model, rows, ref, cfg.run.seed)
        folder = out.path(PI_REF_FOLDER)
        save_model_folder(model, tokenizer, folder)
        timings["sft_seconds"] = time.perf_counter() - clock

    clock = time.perf_counter()
    keys, prompts, responses, scores, component_names, r_max = _value_targets(cfg, inputs, model, tokenizer, rows)
    timings["value_targets_seconds"] = time.perf_counter() - clock

    # Validation rows first: their prompt states (from the log-prob forward) are the value head's features.
    validation = [i for i, s in enumerate(rows.splits) if s == "validation"]
    train = [i for i, s in enumerate(rows.splits) if s == "train"]
    first_pass = reference_logprobs(
        model, [rows.prompt_ids[i] for i in validation], [rows.response_ids[i] for i in validation],
        ref.token_budget, keep_prompt_states=True,
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

    fit.head.to(device)
    second_pass = reference_logprobs(
        model, [rows.prompt_ids[i] for i in train], [rows.response_ids[i] for i in train], ref.token_budget, head=fit.head
    )
    token_logprobs: list[np.ndarray] = [np.zeros(0, np.float32)] * len(rows.ids)
    values = np.full(len(rows.ids), np.nan)
    for index, lp in zip(validation, first_pass.token_logprobs):
        token_logprobs[index] = lp
    values[validation] = predict_values(fit.head.cpu(), first_pass.prompt_states).numpy()
    for index, lp in zip(train, second_pass.token_logprobs):
        token_logprobs[index] = lp
    values[train] = second_pass.values
    _write_reference(out, rows, token_logprobs, values)

    tokens = first_pass.tokens + second_pass.tokens
    timings["logprob_seconds"] = first_pass.seconds + second_pass.seconds
    ref_logprobs = np.array([lp.astype(np.float64).sum() for lp in token_logprobs])
    metrics = ReferenceMetrics(**{
        "pi_ref": "sft" if ref.sft_epochs > 0 else "base",
        "model": ref.model,
        "hidden_size": hidden,
        "device": device.type,
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
        **sft_metrics,
        **{k: round(v, 3) for k, v in timings.items()},
    })
    return StageResult(rows_in=len(rows.ids), rows_out=len(rows.ids), rows_rejected=0, metrics=metrics)
