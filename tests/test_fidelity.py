"""Method fidelity (issue 14): which rows train on preference data, a dropout-free importance weight,
no ratio across precisions, and the train stage refusing rows it tokenises unlike the reference stage.

Each test runs the tiny pipeline of tests/support/train.py (a random Llama, the "cats" reward).
"""

from __future__ import annotations

import re
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from accelerate import Accelerator

from pipeline.runner import execute_stage
from stages import train
from stages.io import StageReader, StageWriter
from stages.models.logprobs import response_token_logprobs
from stages.sampler import PrioritySampler
from stages.train.errors import TrainError
from stages.train.rows import load_train_rows, step_budget
from stages.models.store import load_causal_lm
from stages.train.step import Trainer, encode_micro_batch, has_active_dropout, micro_batch_loss
from tests.support.models import tiny_model_folder
from tests.support.train import (
    build_upstream,
    config,
    readers,
    with_attention_dropout,
    write_preference_rows,
    write_rows,
)


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)  # tiny matrices: a second thread only waits for a core on a busy machine


def _upstream(tmp, data, **extra):
    model = tiny_model_folder(tmp / "tiny")
    cfg = config(tmp, model, data, **extra)
    return cfg, build_upstream(cfg)


def _train(cfg, outputs, folder):
    writer = StageWriter(folder)
    result = train.run(cfg, readers(outputs), writer)
    writer.commit(stage="train", cache_key="t" * 64, result=result, config_fingerprints={}, config={}, inputs={},
                  code_version="test", versions={})
    return result, StageReader(folder)


# --------------------------------------------------------------------------- 1. which rows train


def test_preference_data_trains_on_chosen_rows_and_counts_them_only(tmp_path):
    cfg, outputs = _upstream(tmp_path, write_preference_rows(tmp_path / "pairs.jsonl"))
    inputs = readers(outputs)
    ingest = {r["id"]: r for r in inputs["ingest"].read("ingest", columns=["id", "split", "preference"]).to_pylist()}
    chosen = {i for i, r in ingest.items() if r["split"] == "train" and r["preference"] == "chosen"}
    assert len(chosen) == 16 and sum(r["split"] == "train" for r in ingest.values()) == 32

    nll = load_train_rows("nll", inputs)
    drawn = nll.table["id"].take(PrioritySampler(nll.weight, seed=0).draw(2000)).to_pylist()
    assert set(drawn) == chosen, "nll draws every chosen row and never a rejected one"
    for algorithm in ("wbc", "a_lol"):
        assert set(load_train_rows(algorithm, inputs).table["id"].to_pylist()) <= chosen, algorithm

    # The positive fraction is over the chosen rows; over every row it would differ (rejected rows have A > 0 too).
    score = {r["id"]: r["reward"] for r in inputs["score"].read("score", columns=["id", "reward"]).to_pylist()}
    value = {r["id"]: r["value"] for r in inputs["reference"].read("reference", columns=["id", "value"]).to_pylist()}
    positive = {i for i in ingest if ingest[i]["split"] == "train" and score[i] - value[i] > 0}
    assert len(positive - chosen) > 0, "the toy data gives rejected rows with A > 0"
    metrics = inputs["advantage"].metrics
    assert (metrics.rows, metrics.positive_rows, metrics.rejected_rows_left_out) == (16, len(positive & chosen), 16)
    assert (nll.train_rows, nll.positive_rows) == (16, len(positive & chosen))
    a_lol = config(tmp_path, cfg.reference.model, cfg.data.path, **{"train.steps": 64}).train
    assert step_budget(a_lol, nll.positive_rows, nll.train_rows) == 64 * len(positive & chosen) // 16

    # advantage.rows: all keeps every training row (an explicit choice).
    every = config(tmp_path, cfg.reference.model, cfg.data.path, **{"advantage.rows": "all"})
    output, reused = execute_stage(every, "advantage", {"score": outputs["score"], "reference": outputs["reference"]})
    assert not reused
    table = StageReader(output.path).read("advantage")
    assert table.num_rows == 32 and StageReader(output.path).metrics.positive_rows == len(positive)


# --------------------------------------------------------------------------- 2. the importance weight


@pytest.fixture(scope="module")
def dropout_run(tmp_path_factory):
    """The tiny pipeline's upstream with pi_ref a Llama whose attention dropout is 0.1 (active in train mode)."""
    torch.set_num_threads(1)
    tmp = tmp_path_factory.mktemp("dropout")
    model = with_attention_dropout(tiny_model_folder(tmp / "tiny"), 0.1)
    cfg = config(tmp, model, write_rows(tmp / "rows.jsonl"))
    return tmp, cfg, build_upstream(cfg)


@pytest.mark.parametrize("algorithm", ["a_lol", "a_lol_seq", "r_lol"])
def test_importance_weight_is_one_at_step_0_despite_dropout(dropout_run, algorithm):
    tmp, cfg, outputs = dropout_run
    cfg = config(tmp, cfg.reference.model, cfg.data.path, **{"train.algorithm": algorithm})
    trainer = Trainer(cfg, readers(outputs), Accelerator(cpu=True))
    batch = encode_micro_batch(trainer.rows.take(range(min(8, len(trainer.rows.weight)))), trainer.tokenizer, cfg)
    with torch.no_grad():
        first = response_token_logprobs(trainer.policy, batch.prompt_ids, batch.response_ids)
        second = response_token_logprobs(trainer.policy, batch.prompt_ids, batch.response_ids)
    assert trainer.model.training and trainer.weight_forward
    assert max((a - b).abs().max().item() for a, b in zip(first, second)) > 1e-3, "dropout is active in train mode"
    out = micro_batch_loss(trainer.policy, batch, trainer.loss_fn, trainer.weight_forward)
    np.testing.assert_allclose(out.weights.numpy(), 1.0, atol=1e-5, rtol=0)
    assert trainer.model.training, "back in train mode after the weight's forward"
    assert out.loss.requires_grad


def test_train_log_weight_is_one_at_the_first_step_with_dropout(dropout_run):
    tmp, cfg, outputs = dropout_run
    cfg = config(tmp, cfg.reference.model, cfg.data.path, **{"train.steps": 2})
    _, out = _train(cfg, outputs, tmp / "out" / "a_lol")
    assert out.read("train_log")["importance_weight_mean"][0].as_py() == pytest.approx(1.0, abs=1e-5)


def test_no_extra_forward_without_dropout_or_without_a_ratio(dropout_run, tmp_path):
    tmp, cfg, outputs = dropout_run
    kl = config(tmp, cfg.reference.model, cfg.data.path, **{"train.algorithm": "a_lol_kl", "train.kl_beta": 0.1})
    assert not Trainer(kl, readers(outputs), Accelerator(cpu=True)).weight_forward, "a_lol_kl takes no ratio"
    plain = load_causal_lm(tiny_model_folder(tmp_path / "plain")).train()
    assert not has_active_dropout(plain), "a Llama without dropout: one forward"
    dropout = load_causal_lm(cfg.reference.model)
    assert not has_active_dropout(dropout) and has_active_dropout(dropout.train())


class _MixedPrecision(SimpleNamespace):
    """An accelerator stub at bf16 (accelerate keeps one precision per process, so a real one cannot switch)."""

    def __init__(self):
        super().__init__(num_processes=1, mixed_precision="bf16", device=torch.device("cpu"))

    def prepare(self, model, optimizer):
        return model, optimizer

    def unwrap_model(self, model):
        return model


@pytest.mark.parametrize("algorithm", ["a_lol", "a_lol_seq", "r_lol"])
def test_ratio_losses_refuse_a_precision_other_than_the_cached_reference(dropout_run, algorithm):
    tmp, cfg, outputs = dropout_run
    cfg = config(tmp, cfg.reference.model, cfg.data.path, **{"train.algorithm": algorithm})
    with pytest.raises(TrainError, match=rf"{algorithm} weights rows by a ratio .* train.mixed_precision bf16"):
        Trainer(cfg, readers(outputs), _MixedPrecision())


def test_losses_without_a_ratio_accept_mixed_precision(dropout_run):
    tmp, cfg, outputs = dropout_run
    cfg = config(tmp, cfg.reference.model, cfg.data.path, **{"train.algorithm": "a_lol_kl", "train.kl_beta": 0.1})
    assert Trainer(cfg, readers(outputs), _MixedPrecision()).total_steps > 0


# --------------------------------------------------------------------------- 4. tokenisation drift


def test_a_changed_chat_template_stops_training_naming_the_row(tmp_path):
    cfg, outputs = _upstream(tmp_path, write_rows(tmp_path / "rows.jsonl"))
    template = tmp_path / "tiny" / "chat_template.jinja"
    text = template.read_text(encoding="utf-8")
    assert "<|im_start|>assistant\n" in text
    # Same responses, other prompt tokens: the response lengths still agree with the reference table.
    template.write_text(text.replace("<|im_start|>assistant\n", "<|im_start|>assistant\n\n"), encoding="utf-8")
    with pytest.raises(TrainError, match=r"row id [0-9a-f]+: its prompt and response tokenise to other ids") as error:
        _train(cfg, outputs, tmp_path / "out")
    row_id = re.search(r"row id ([0-9a-f]+)", str(error.value)).group(1)
    splits = dict(zip(*readers(outputs)["reference"].read("reference", columns=["id", "split"]).to_pydict().values()))
    assert splits[row_id] == "train"
