"""Reference stage on a tiny random Llama: ingest -> score -> reference through the stage runner.

Checks the tables against independent computations: naive one-row-at-a-time log-probs, greedy
decoding and scoring of the validation prompts, the saved head reproducing the stored values, and
the causal identity V(prompt+response forward) = V(prompt-only forward).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.runner import execute_stage
from stages.catalog import PI_REF_FOLDER, VALUE_HEAD_FILE, load_scorer, prompt_key, reference_model_path
from stages.io import StageReader
from stages.models.generate import generate
from stages.models.store import load_causal_lm, load_tokenizer
from stages.models.tokenize import encode_pair, encode_prompt, token_digest
from stages.value_head import load_value_head, predict_values
from tests.support.models import tiny_model_folder
from tests.support.reference import tiny_config

def _run_through_reference(cfg):
    ingest, _ = execute_stage(cfg, "ingest", {})
    score, _ = execute_stage(cfg, "score", {"ingest": ingest})
    reference, reused = execute_stage(cfg, "reference", {"ingest": ingest, "score": score})
    assert not reused
    return StageReader(ingest.path), StageReader(score.path), StageReader(reference.path)


def _naive_logprobs(model, prompt, response) -> np.ndarray:
    ids = torch.tensor([prompt + response])
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids).logits[0].double(), dim=-1)
    return np.array([logp[len(prompt) - 1 + t, response[t]].item() for t in range(len(response))])


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    torch.set_num_threads(2)
    tmp = tmp_path_factory.mktemp("reference")
    model = tiny_model_folder(tmp / "tiny")
    cfg = tiny_config(tmp, model)
    return cfg, *_run_through_reference(cfg)


def test_reference_table_covers_train_and_validation_rows(tiny_run):
    cfg, ingest, _, reference = tiny_run
    rows = ingest.read("ingest", columns=["id", "split"]).to_pylist()
    table = reference.read("reference").to_pylist()
    expected = {r["id"]: r["split"] for r in rows if r["split"] in ("train", "validation")}
    assert {r["id"]: r["split"] for r in table} == expected and len(table) == len(expected) == 36
    assert reference.manifest.columns["reference"] == {
        "id": "string", "split": "string", "preference": "string", "prompt_tokens": "int32", "ref_logprob": "double",
        "ref_token_logprobs": "list<item: float>", "response_tokens": "int32", "response_truncated": "bool",
        "token_hash": "string", "value": "double",
    }
    for row in table:
        assert row["response_tokens"] == len(row["ref_token_logprobs"]) <= cfg.reference.max_response_tokens
        assert abs(row["ref_logprob"] - sum(row["ref_token_logprobs"])) < 1e-4
        assert all(lp <= 0 for lp in row["ref_token_logprobs"])
        assert row["preference"] is None, "prompt/response rows have no preference"


def test_truncated_responses_are_flagged_and_hashed_as_tokenised(tiny_run):
    """A response longer than max_response_tokens is cut without its EOS and flagged; the hash is of the ids."""
    cfg, ingest, _, reference = tiny_run
    tokenizer = load_tokenizer(reference_model_path(cfg, reference))
    stored = {r["id"]: r for r in reference.read("reference").to_pylist()}
    flags = []
    for row in ingest.read("ingest").to_pylist():
        if row["id"] not in stored:
            continue
        prompt, response = encode_pair(tokenizer, row["prompt"], row["response"], 24, 8)
        whole = tokenizer(row["response"], add_special_tokens=False)["input_ids"]
        truncated = len(whole) + 1 > cfg.reference.max_response_tokens
        assert stored[row["id"]]["response_truncated"] == truncated == (response[-1] != tokenizer.eos_token_id)
        assert stored[row["id"]]["token_hash"] == token_digest(prompt, response)
        assert stored[row["id"]]["prompt_tokens"] == len(prompt) <= 24
        flags.append(truncated)
    assert 0 < sum(flags) < len(flags), "the toy data has cut and whole responses"
    assert reference.metrics.responses_at_token_limit == sum(flags)


def test_reference_logprobs_equal_a_naive_loop(tiny_run):
    cfg, ingest, _, reference = tiny_run
    path = reference_model_path(cfg, reference)
    model, tokenizer = load_causal_lm(path), load_tokenizer(path)
    stored = {r["id"]: r for r in reference.read("reference").to_pylist()}
    for row in ingest.read("ingest").to_pylist():
        if row["split"] not in stored.get(row["id"], {}).get("split", ""):
            continue
        prompt, response = encode_pair(tokenizer, row["prompt"], row["response"], 24, 8)
        naive = _naive_logprobs(model, prompt, response)
        np.testing.assert_allclose(stored[row["id"]]["ref_token_logprobs"], naive, atol=1e-4, rtol=0)
        assert abs(stored[row["id"]]["ref_logprob"] - naive.sum()) < 1e-4


def test_value_targets_are_pi_refs_greedy_outputs_scored_by_the_score_stage(tiny_run):
    cfg, ingest, score, reference = tiny_run
    targets = reference.read("value_targets").to_pylist()
    validation = [r for r in ingest.read("ingest").to_pylist() if r["split"] == "validation"]
    assert sorted(t["prompt_id"] for t in targets) == sorted({prompt_key(r["prompt"]) for r in validation})
    assert len(targets) == 10 and sum(t["holdout"] for t in targets) == 3
    path = reference_model_path(cfg, reference)
    model, tokenizer = load_causal_lm(path), load_tokenizer(path)
    prompts = [t["prompt"] for t in targets]
    greedy = generate(model, tokenizer, prompts, max_prompt_tokens=24, max_new_tokens=6, batch_size=1)
    assert [t["response"] for t in targets] == greedy
    scores = load_scorer(cfg, score).score(prompts, greedy, progress=False)
    for name in ("length", "sentiment", "reward"):
        np.testing.assert_allclose([t[name] for t in targets], scores[name], atol=1e-12)


def test_saved_head_reproduces_values_and_matches_the_pair_forward(tiny_run):
    cfg, ingest, _, reference = tiny_run
    head = load_value_head(reference.path(VALUE_HEAD_FILE))
    r_max = reference.metrics.r_max
    assert head.r_max == r_max == 3.0  # length (weight 1, upper 1) + sentiment (weight 2, upper 1)
    path = reference_model_path(cfg, reference)
    model, tokenizer = load_causal_lm(path), load_tokenizer(path)
    targets = reference.read("value_targets").to_pylist()
    with torch.no_grad():
        states = [
            model.get_decoder()(input_ids=torch.tensor([encode_prompt(tokenizer, t["prompt"], 24)])).last_hidden_state[0]
            for t in targets
        ]
    np.testing.assert_allclose(predict_values(head, states).numpy(), [t["value"] for t in targets], atol=1e-5)
    # V of a validation row (prompt positions of its prompt+response forward) = V of its prompt alone.
    by_prompt = {t["prompt_id"]: t["value"] for t in targets}
    values = {r["id"]: r["value"] for r in reference.read("reference").to_pylist()}
    checked = 0
    for row in ingest.read("ingest").to_pylist():
        if row["split"] == "validation":
            assert abs(values[row["id"]] - by_prompt[prompt_key(row["prompt"])]) < 1e-4
            checked += 1
    assert checked == 12
    assert all(0 < v < r_max for v in values.values())


def test_manifest_reports_the_value_fit_against_the_mean(tiny_run):
    cfg, _, _, reference = tiny_run
    metrics = reference.metrics
    assert metrics.rows == {"train": 24, "validation": 12}
    assert 0 <= metrics.value_chosen_epoch <= cfg.value.epochs
    assert len(metrics.value_holdout_mse_by_epoch) == cfg.value.epochs + 1
    assert metrics.value_holdout_mse == min(metrics.value_holdout_mse_by_epoch)
    targets = reference.read("value_targets").to_pandas()
    train_rewards = targets.loc[~targets.holdout, "reward"]
    held = targets.loc[targets.holdout]
    assert metrics.value_mean_baseline_holdout_mse == pytest.approx(((held.reward - train_rewards.mean()) ** 2).mean())
    assert metrics.value_holdout_mse == pytest.approx(((held.reward - held.value) ** 2).mean(), abs=1e-9)
    assert metrics.pi_ref == "base" and metrics.logprob_tokens_per_s > 0
    assert not reference.path(PI_REF_FOLDER).exists()


def test_sft_fine_tunes_pi_ref_on_the_training_rows(tiny_run, tmp_path):
    base_cfg, _, _, base_reference = tiny_run
    cfg = tiny_config(
        tmp_path, Path(base_cfg.reference.model),
        **{"reference.sft_epochs": 3, "reference.sft_learning_rate": 3e-3, "reference.sft_batch_size": 4},
    )
    _, _, reference = _run_through_reference(cfg)
    folder = reference_model_path(cfg, reference)
    assert folder == reference.path(PI_REF_FOLDER) and (folder / "model.safetensors").is_file()
    metrics = reference.metrics
    assert metrics.pi_ref == "sft" and metrics.sft_steps == 3 * 6
    assert metrics.sft_last_loss < metrics.sft_first_loss
    epoch_losses = metrics.sft_epoch_losses
    assert len(epoch_losses) == 3 and epoch_losses[-1] < epoch_losses[0]

    def train_mean(reader):
        return np.mean([r["ref_logprob"] for r in reader.read("reference").to_pylist() if r["split"] == "train"])

    # Fine-tuned on the training responses, pi_ref assigns them a clearly higher likelihood.
    assert train_mean(reference) > train_mean(base_reference) + 1.0


def test_a_local_model_folder_rewritten_in_place_is_not_taken_for_the_cached_one(tmp_path):
    """reference.model is a local folder: its files' bytes are in the reference, train and evaluate keys, so new
    weights at the same path recompute the reference stage; touching the files or another path's copy does not."""
    import os
    import shutil

    from pipeline.runner import STAGES, cache_key

    torch.set_num_threads(2)
    model = tiny_model_folder(tmp_path / "tiny", seed=0)
    cfg = tiny_config(tmp_path, model)
    ingest, _ = execute_stage(cfg, "ingest", {})
    score, _ = execute_stage(cfg, "score", {"ingest": ingest})
    upstream = {"ingest": ingest, "score": score}
    first, reused = execute_stage(cfg, "reference", upstream)
    assert not reused
    for path in model.rglob("*"):
        os.utime(path, ns=(1, 1))
    assert execute_stage(cfg, "reference", upstream)[1], "the same bytes, touched: still cached"

    shutil.rmtree(model)
    tiny_model_folder(model, seed=1)  # other weights under the same path
    second, reused = execute_stage(cfg, "reference", upstream)
    assert not reused and second.cache_key == cache_key(cfg, "reference", upstream) != first.cache_key
    assert StageReader(second.path).read("reference").column("ref_logprob") != StageReader(first.path).read("reference").column("ref_logprob")
    assert all(STAGES[s].external == STAGES["reference"].external for s in ("train", "evaluate"))
