"""The SFT of pi_ref on two processes (reference.sft_processes: 2, torchrun launched by the reference stage, gloo on
CPU): each process takes half of every batch's rows, and the fine-tuned pi_ref (its weights, the reference
log-probs and the SFT losses) equals the one process's within float rounding; the setting is in no cache key."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from pipeline.runner import cache_key, execute_stage
from stages.io import StageReader
from stages.reference.sft import share_of_batch
from tests.support.train import config, run_stages, tiny_setup

SFT = {"reference.sft_epochs": 2, "reference.sft_batch_size": 5, "reference.sft_learning_rate": 1e-3}
"""32 training rows in batches of 5: six of 5 rows (shared 3 + 2) and one of 2 (1 + 1) per epoch."""


@pytest.fixture(scope="module")
def upstream(tmp_path_factory):
    torch.set_num_threads(1)
    tmp = tmp_path_factory.mktemp("sft-processes")
    model, data = tiny_setup(tmp)
    return tmp, model, data, run_stages(config(tmp, model, data, **SFT), ("ingest", "score"))


def test_share_of_batch_covers_the_batch_in_order():
    batch = list(range(7))
    assert [share_of_batch(batch, rank, 3) for rank in range(3)] == [[0, 1, 2], [3, 4], [5, 6]]
    assert [share_of_batch([9], rank, 2) for rank in range(2)] == [[9], []]


def test_sft_on_two_processes_equals_one_process(upstream):
    tmp, model, data, outputs = upstream
    one_cfg = config(tmp, model, data, **SFT, **{"run.name": "sft-one"})
    two_cfg = config(tmp, model, data, **SFT, **{"run.name": "sft-two", "reference.sft_processes": 2})
    assert cache_key(one_cfg, "reference", outputs) == cache_key(two_cfg, "reference", outputs)
    one, _ = execute_stage(one_cfg, "reference", outputs)
    two, cached = execute_stage(two_cfg, "reference", outputs)
    assert not cached and two.cache_key == one.cache_key
    one, two = StageReader(one.path), StageReader(two.path)

    assert one.metrics.pi_ref == two.metrics.pi_ref == "sft"
    assert one.metrics.sft_steps == two.metrics.sft_steps == 14
    assert (one.metrics.sft_processes, two.metrics.sft_processes) == (1, 2)
    np.testing.assert_allclose(two.metrics.sft_epoch_losses, one.metrics.sft_epoch_losses, rtol=1e-5)
    base = load_file(os.path.join(model, "model.safetensors"))
    first, second = load_file(one.path("pi_ref/model.safetensors")), load_file(two.path("pi_ref/model.safetensors"))
    assert first.keys() == second.keys()
    moved = max((first[name] - base[name]).abs().max().item() for name in first if name in base)
    assert moved > 1e-3, "the SFT changed the weights"
    # Each process computes the chat template's prompt prefix once for its share of a batch (stages.models.logprobs),
    # so the prefix's gradient is summed in other groups than on one process: up to 2e-5 apart after 14 AdamW steps
    # at lr 1e-3 (a process that drops a row of its share fails the losses' check above).
    for name in first:
        torch.testing.assert_close(second[name], first[name], rtol=0, atol=5e-5, msg=name)

    a, b = one.read("reference"), two.read("reference")
    assert a.column("id").to_pylist() == b.column("id").to_pylist()
    for column in ("ref_logprob", "ref_token_logprobs"):
        x, y = a.column(column).combine_chunks(), b.column(column).combine_chunks()
        if column == "ref_token_logprobs":
            assert x.value_lengths() == y.value_lengths()
            x, y = x.flatten(), y.flatten()
        np.testing.assert_allclose(y.to_numpy(), x.to_numpy(), rtol=1e-5, atol=1e-5, err_msg=column)
