"""Train stage on a tiny random Llama: budget, schedule, config checks, accumulation invariance,
sampling per family, one model in memory, checkpoint choice against pi_ref, LoRA, cache reuse."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from accelerate import Accelerator
from safetensors.torch import load_file

from pipeline.runner import STAGES, execute_stage
from schemas.algorithms import ALGORITHM_REGISTRY
from schemas.config import ConfigError, load_config
from schemas.train import ALGORITHMS, TRAIN_LOG_SCHEMA, TrainConfig
from stages import train
from stages.catalog import policy_model_path
from stages.io import StageReader, StageWriter
from stages.losses import loss_function
from stages.models.logprobs import response_token_logprobs
from stages.models.store import load_causal_lm, load_tokenizer
from stages.models.tokenize import encode_pair, token_digest
from stages.train.errors import TrainError
from stages.train.policy import build_policy, learning_rate_factor
from stages.train.resume import RESUME_FOLDER
from stages.train.rows import load_train_rows, step_budget
from stages.train.step import PolicyForward, backward_micro_batches, encode_micro_batch
from tests.support.outputs import commit_output
from tests.support.train import UPSTREAM, build_upstream, config, readers, tiny_setup


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(tmp folder, model folder, data file, upstream outputs) shared by the stage tests."""
    torch.set_num_threads(1)  # tiny matrices: a second thread only waits for a core on a busy machine
    tmp = tmp_path_factory.mktemp("train")
    model, data = tiny_setup(tmp)
    return tmp, model, data, build_upstream(config(tmp, model, data))


def run_train(tiny, folder_name: str, **extra):
    tmp, model, data, outputs = tiny
    cfg = config(tmp, model, data, **extra)
    writer = StageWriter(tmp / "out" / folder_name)
    result = train.run(cfg, readers(outputs), writer)
    writer.commit(stage="train", cache_key="t" * 64, result=result, config_fingerprints={}, config={}, inputs={},
                  code_version="test", versions={})
    return cfg, result, StageReader(tmp / "out" / folder_name)


# --------------------------------------------------------------------------- small functions


def test_step_budget_shrinks_by_the_positive_fraction_for_the_a_lol_family_only():
    for algorithm in ALGORITHMS:
        cfg = TrainConfig(algorithm=algorithm, steps=100, kl_beta=0.1 if algorithm == "a_lol_kl" else None)
        expected = 37 if algorithm.startswith("a_lol") else 100
        assert step_budget(cfg, positive_rows=37, rows=100) == expected
    assert step_budget(TrainConfig(steps=10), positive_rows=1, rows=1000) == 1


def test_learning_rate_schedule():
    linear = TrainConfig(steps=10, warmup_steps=2, schedule="linear")
    factors = [learning_rate_factor(s, linear, 10) for s in range(10)]
    assert factors == pytest.approx([1 / 3, 2 / 3, 1.0, 7 / 8, 6 / 8, 5 / 8, 4 / 8, 3 / 8, 2 / 8, 1 / 8])
    constant = TrainConfig(steps=10, warmup_steps=1, schedule="constant")
    assert [learning_rate_factor(s, constant, 10) for s in range(3)] == [0.5, 1.0, 1.0]
    # The A-LoL shrink can leave fewer steps than the warm-up: the warm-up ends before the last step.
    assert learning_rate_factor(1, TrainConfig(steps=10, warmup_steps=5), 2) == 1.0


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"train.algorithm": "a_lol_kl"}, "needs train.kl_beta"),
        ({"train.kl_beta": 0.1}, "only used by a_lol_kl"),
        ({"train.clip_epsilon": 0.0}, "greater than 0"),
        ({"train.clip_epsilon": 1.5}, "less than or equal to 1"),
        ({"train.warmup_steps": 64, "train.steps": 64}, "warmup_steps"),
        ({"train.lora_alpha": 16}, "lora_rank is not"),
        ({"train.algorithm": "ppo"}, "train.algorithm"),
    ],
)
def test_config_refuses_combinations_that_make_no_sense(settings, message):
    with pytest.raises(ConfigError, match=message):
        load_config("default", overrides=settings)


# --------------------------------------------------------------------------- accumulation invariance


def _rows(tokenizer, model, n=8, seed=0):
    """n micro-batch rows with pi_ref log-probs = the model's own perturbed by noise (so weights vary and clip)."""
    rng = np.random.default_rng(seed)
    words = "hello there how are you cats dogs music name joke".split()
    rows = []
    for i in range(n):
        prompt = [{"role": "user", "content": " ".join(rng.choice(words, size=2 + i % 4))}]
        response = " ".join(rng.choice(words, size=1 + i % 5))
        p, r = encode_pair(tokenizer, prompt, response, 24, 8)
        with torch.no_grad():
            own = response_token_logprobs(model, [p], [r])[0].numpy()
        ref = (own + rng.normal(0, 0.4, size=own.shape)).astype(np.float32)
        rows.append({"id": f"r{i}", "prompt": prompt, "response": response, "response_tokens": len(r),
                     "token_hash": token_digest(p, r),
                     "ref_token_logprobs": ref.tolist(), "ref_logprob": float(ref.sum()),
                     "reward": float(rng.uniform(0, 1)), "advantage": float(rng.uniform(-0.5, 1))})
    return rows


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_one_batch_of_8_equals_8_batches_of_1_with_accumulation(tiny, algorithm):
    model, tokenizer = load_causal_lm(tiny[1]), load_tokenizer(tiny[1])
    model.train()
    cfg = load_config("smoke", overrides={"reference.max_prompt_tokens": 24, "reference.max_response_tokens": 8,
                                          "train.algorithm": algorithm, "train.clip_epsilon": 0.2, "reference.pairs": "built",
                                          "train.kl_beta": 0.3 if algorithm == "a_lol_kl" else None})
    rows = _rows(tokenizer, model)
    loss_fn = loss_function(cfg.train)
    accelerator = Accelerator(cpu=True)
    policy = PolicyForward(model, model)

    def gradient(batches):
        model.zero_grad(set_to_none=True)
        sums = backward_micro_batches(accelerator, model, policy, batches, loss_fn)
        return {n: p.grad.clone() for n, p in model.named_parameters()}, sums

    group = 2 if ALGORITHM_REGISTRY[algorithm].needs_pairs else 1  # dpo, pro: 4 pairs as 1 batch or 4 batches
    whole, whole_sums = gradient([encode_micro_batch(rows, tokenizer, cfg, group)])
    split, split_sums = gradient(
        [encode_micro_batch(rows[k : k + group], tokenizer, cfg, group) for k in range(0, len(rows), group)]
    )
    assert any(g.abs().sum() > 0 for g in whole.values())
    for name in whole:  # float32 round-off only: differences below 1e-5 of each gradient's largest entry
        scale = whole[name].abs().max().item()
        torch.testing.assert_close(split[name], whole[name], rtol=0, atol=1e-5 * scale, msg=name)
    assert split_sums.loss / split_sums.micro_batches == pytest.approx(whole_sums.loss, rel=1e-5)
    assert split_sums.weight_count == whole_sums.weight_count
    if algorithm in ("a_lol", "a_lol_seq", "r_lol"):
        assert 0 < whole_sums.clipped < whole_sums.weight_count, "the toy case exercises the clip"


@pytest.mark.parametrize("algorithm", ["a_lol", "dpo"])
def test_gradient_checkpointing_gives_the_same_gradients(tiny, algorithm):
    """train.gradient_checkpointing recomputes activations in the backward pass: the same loss and gradients
    (float32 round-off only) as the plain step, and the model really checkpoints."""
    tokenizer = load_tokenizer(tiny[1])
    cfg = load_config("smoke", overrides={"reference.max_prompt_tokens": 24, "reference.max_response_tokens": 8,
                                          "train.algorithm": algorithm, "reference.pairs": "built"})
    group = 2 if ALGORITHM_REGISTRY[algorithm].needs_pairs else 1
    results = []
    for checkpointing in (False, True):
        train_cfg = cfg.train.model_copy(update={"gradient_checkpointing": checkpointing})
        model = build_policy(tiny[1], train_cfg, seed=0)
        assert model.is_gradient_checkpointing == checkpointing
        rows = _rows(tokenizer, model)
        policy = PolicyForward(model, model)
        model.zero_grad(set_to_none=True)
        sums = backward_micro_batches(Accelerator(cpu=True), model, policy, [encode_micro_batch(rows, tokenizer, cfg, group)],
                                      loss_function(train_cfg))
        results.append((sums.loss, {n: p.grad.clone() for n, p in model.named_parameters()}))
    (plain_loss, plain), (checkpointed_loss, checkpointed) = results
    assert checkpointed_loss == pytest.approx(plain_loss, rel=1e-6)
    assert any(g.abs().sum() > 0 for g in plain.values())
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], rtol=0, atol=1e-6 * plain[name].abs().max().item(), msg=name)


# --------------------------------------------------------------------------- the stage


def test_each_family_draws_from_its_own_rows(tiny):
    _, _, _, outputs = tiny
    inputs = readers(outputs)
    advantage = inputs["advantage"].read("advantage").to_pandas().set_index("id")
    for algorithm, expected in (
        ("a_lol", advantage.index[advantage["advantage"] > 0]),
        ("a_lol_seq", advantage.index[advantage["advantage"] > 0]),
        ("wbc", advantage.index[advantage["reward"] > 0]),
        ("nll", advantage.index),
    ):
        rows = load_train_rows(algorithm, inputs)
        assert sorted(rows.table["id"].to_pylist()) == sorted(expected), algorithm
        assert rows.train_rows == len(advantage) and rows.positive_rows == (advantage["advantage"] > 0).sum()
    a_lol = load_train_rows("a_lol", inputs)
    np.testing.assert_allclose(a_lol.weight, advantage.loc[a_lol.table["id"].to_pylist(), "advantage"])


def test_a_lol_trains_only_pi_theta_and_beats_pi_ref(tiny, monkeypatch):
    from transformers import AutoModelForCausalLM, PreTrainedModel

    built = []
    original_init = PreTrainedModel.__init__

    def counting_init(self, *args, **kwargs):
        built.append(type(self).__name__)
        original_init(self, *args, **kwargs)

    monkeypatch.setattr(PreTrainedModel, "__init__", counting_init)
    cfg, result, out = run_train(tiny, "a_lol")
    monkeypatch.undo()
    # pi_theta (and its inner decoder) is the only model the train stage builds: pi_ref is a table.
    assert built == ["LlamaForCausalLM", "LlamaModel"]

    m = result.metrics
    assert m.steps == 6 == cfg.train.steps * m.positive_rows // m.train_rows
    assert m.policy_is_reference is False and m.best_step == 6
    assert m.best_validation_reward > m.reference_validation_reward
    log = out.read("train_log")
    assert log.schema.equals(TRAIN_LOG_SCHEMA)
    rows = log.to_pylist()
    assert [r["step"] for r in rows] == list(range(1, 7))
    assert rows[0]["importance_weight_mean"] == pytest.approx(1.0, abs=1e-3), "pi_theta starts as pi_ref: rho = 1"
    assert all(r["advantage_mean"] > 0 for r in rows), "A-LoL never draws A <= 0"
    assert all(np.isfinite(r["loss"]) and r["grad_norm"] > 0 and r["tokens"] > 0 for r in rows)
    # Wall-clock figures are metrics (the manifest), never columns of the hashed train_log.
    assert not [c for c in log.column_names if c.endswith(("_seconds", "_per_s"))]
    assert len(m.step_tokens_per_s) == m.steps and all(s > 0 for s in m.step_tokens_per_s)
    assert m.tokens_per_s_median == pytest.approx(np.median(m.step_tokens_per_s))
    assert 0 < m.validation_seconds < m.train_seconds
    assert [r["validation_reward"] is not None for r in rows] == [False] * 5 + [True]
    assert rows[-1]["validation_reward"] == m.best_validation_reward

    policy = AutoModelForCausalLM.from_pretrained(out.path("policy"))
    assert (out.path("policy") / "model.safetensors").is_file() and (out.path("policy") / "tokenizer.json").is_file()
    reference = load_file(tiny[1] / "model.safetensors")
    trained = policy.state_dict()
    assert any(not torch.equal(trained[k], v) for k, v in reference.items())
    assert policy_model_path(cfg, out, readers(tiny[3])["reference"]) == out.path("policy")
    assert not list((tiny[0] / "cache" / RESUME_FOLDER).glob("*")), "resume state removed on success"


def test_nothing_beats_pi_ref_keeps_pi_ref(tiny):
    cfg, result, out = run_train(tiny, "tiny-lr", **{"train.learning_rate": 1e-12, "train.algorithm": "nll",
                                                     "train.steps": 2})
    m = result.metrics
    assert m.policy_is_reference is True and m.best_step is None
    assert m.best_validation_reward == pytest.approx(m.reference_validation_reward)
    assert not out.path("policy").exists()
    assert policy_model_path(cfg, out, readers(tiny[3])["reference"]) == tiny[1]


@pytest.mark.parametrize("algorithm", ["a_lol_seq", "a_lol_kl", "r_gold"])
def test_other_losses_run_through_the_stage(tiny, algorithm):
    extra = {"train.algorithm": algorithm, "train.steps": 4, "train.eval_every": 2}
    if algorithm == "a_lol_kl":
        extra["train.kl_beta"] = 0.1
    _, result, out = run_train(tiny, algorithm, **extra)
    rows = out.read("train_log").to_pylist()
    assert len(rows) == result.metrics.steps == (2 if algorithm.startswith("a_lol") else 4)
    assert [r["validation_reward"] is not None for r in rows][-1]
    has_weight = algorithm in ("a_lol_seq", "r_gold")
    assert all((r["importance_weight_mean"] is not None) == has_weight for r in rows)
    if algorithm == "a_lol_seq":
        assert rows[0]["importance_weight_mean"] == pytest.approx(1.0, abs=1e-3)


def test_lora_policy_is_a_merged_transformers_folder(tiny):
    from transformers import AutoModelForCausalLM

    _, result, out = run_train(tiny, "lora", **{"train.lora_rank": 4, "train.learning_rate": 5e-2})
    assert result.metrics.policy_is_reference is False
    folder = out.path("policy")
    assert (folder / "model.safetensors").is_file() and not (folder / "adapter_config.json").exists()
    names = set(load_file(folder / "model.safetensors"))
    assert not any("lora" in n for n in names)
    policy = AutoModelForCausalLM.from_pretrained(folder)
    reference = load_file(tiny[1] / "model.safetensors")
    changed = [k for k, v in policy.state_dict().items() if k in reference and not torch.equal(v, reference[k])]
    assert changed and all("proj" in k for k in changed), "LoRA changes only the adapted linear layers"


def test_changing_only_train_settings_reuses_every_upstream_stage(tiny):
    tmp, model, data, outputs = tiny
    cfg = config(tmp, model, data, **{"train.algorithm": "wbc", "train.steps": 3, "train.learning_rate": 1e-3})
    for stage in UPSTREAM:
        output, reused = execute_stage(cfg, stage, {n: outputs[n] for n in STAGES[stage].upstream})
        assert reused and output.path == outputs[stage].path, stage


def test_no_drawable_row_is_an_error_naming_the_advantage_table(tiny, tmp_path):
    import pyarrow as pa

    inputs = readers(tiny[3])
    table = inputs["advantage"].read("advantage")
    zeros = pa.array([0.0] * table.num_rows)
    table = table.set_column(table.schema.get_field_index("weight_advantage"), "weight_advantage", zeros)
    inputs["advantage"] = commit_output(tmp_path / "advantage", "advantage", tables={"advantage": table})
    with pytest.raises(TrainError, match=r"advantage/\*\.parquet: none of the 32 training rows has a positive"):
        load_train_rows("a_lol", inputs)
    assert len(load_train_rows("nll", inputs).weight) == 32


def test_training_goes_on_after_validations_mid_run(tiny):
    """Validation decodes with pi_theta under inference mode and packed weights (stages.models.generate)
    between optimiser steps: the steps after each one still train (no inference tensor left in the
    model, every layer back on its own forward)."""
    _, result, out = run_train(tiny, "validate-often", **{"train.eval_every": 2})
    rows = out.read("train_log").to_pylist()
    assert [r["validation_reward"] is not None for r in rows] == [False, True] * (len(rows) // 2) and len(rows) >= 4
    assert all(np.isfinite(r["loss"]) and r["grad_norm"] > 0 for r in rows)


def test_mixed_precision_bf16_trains_and_validates_on_the_cpu(tiny, tmp_path):
    """train.mixed_precision bf16 on the CPU: accelerate runs the model's forward in bf16 autocast, the validation
    decodes included (packed fp32 layers and fp32 key/value slots used to fail there). In a process of its own,
    since accelerate keeps one precision per process."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    tmp, model, data, outputs = tiny
    target = tmp_path / "bf16"
    script = "\n".join([
        "import json, sys",
        "from pathlib import Path",
        "from stages import train",
        "from stages.io import StageReader, StageWriter",
        "from tests.support.train import config",
        "args = json.loads(sys.argv[1])",
        "cfg = config(Path(args['tmp']), Path(args['model']), Path(args['data']), **args['overrides'])",
        "inputs = {name: StageReader(path) for name, path in args['inputs'].items()}",
        "import pyarrow.parquet as pq",
        "out = StageWriter(Path(args['target']))",
        "steps = train.run(cfg, inputs, out).metrics.steps",
        "log = pq.read_table(out.dir / 'train_log').to_pylist()",
        "print(json.dumps({'steps': steps, 'validated': [r['validation_reward'] is not None for r in log]}))",
    ])
    args = {
        "tmp": str(tmp), "model": str(model), "data": str(data), "target": str(target),
        "inputs": {name: str(outputs[name].path) for name in UPSTREAM},
        "overrides": {"train.algorithm": "nll", "train.mixed_precision": "bf16", "train.steps": 4, "train.eval_every": 2},
    }
    root = Path(__file__).resolve().parent.parent
    done = subprocess.run([sys.executable, "-c", script, json.dumps(args)], capture_output=True, text=True, cwd=root,
                          env={**os.environ, "PYTHONPATH": str(root)})
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout.strip().splitlines()[-1]) == {"steps": 4, "validated": [False, True, False, True]}
