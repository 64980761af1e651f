"""DPO and PRO through the pipeline on a tiny random Llama: pairs built from pi_ref's own responses on
prompt/response data, the data's pairs on preference data, and the refusals when there are none."""

from __future__ import annotations

import pytest
import torch

from pipeline import sql
from pipeline.storage import RunStore
from schemas.config import ConfigError, load_config
from stages.catalog import PI_REF_ID_SUFFIX, PI_REF_RESPONSES_TABLE
from stages.io import StageReader
from stages.models.logprobs import response_token_logprobs
from stages.models.store import load_causal_lm, load_tokenizer
from stages.models.tokenize import encode_pair, token_digest
from stages.train.errors import TrainError
from tests.support.train import UPSTREAM, cats_reward, config, run_stages, tiny_setup, write_preference_rows

PAIR_TRAINING = {"train.steps": 3, "train.eval_every": 3, "train.learning_rate": 1e-2}


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """The tiny prompt/response pipeline through train with dpo (reference.pairs auto: built on pair-less data)."""
    torch.set_num_threads(1)
    tmp = tmp_path_factory.mktemp("pairs")
    model, data = tiny_setup(tmp)
    cfg = config(tmp, model, data, **{"train.algorithm": "dpo", "reference.pairs": "auto", **PAIR_TRAINING})
    return cfg, model, run_stages(cfg, (*UPSTREAM, "train"))


def test_config_refuses_pair_algorithms_without_pairs_in_one_line(tmp_path):
    for algorithm in ("dpo", "pro"):
        with pytest.raises(ConfigError, match=r"reference\.pairs is none.*set reference\.pairs: built") as error:
            load_config("smoke", overrides=[f"train.algorithm={algorithm}", "reference.pairs=none"])
        assert len(str(error.value).splitlines()) == 2, "the heading and one line"
    with pytest.raises(ConfigError, match=r"reference\.pairs is data and the data has none"):
        load_config("smoke", overrides=["train.algorithm=dpo", "reference.pairs=data"])  # chatterbot: no pairs
    load_config("smoke", overrides=["train.algorithm=nll", "reference.pairs=none"])  # the others need none
    load_config("smoke", overrides=["train.algorithm=dpo", "reference.pairs=data", "data.source=file",
                                    "data.path=x.jsonl", "data.format=preference"])


def test_pi_ref_responses_are_its_greedy_outputs_with_reward_log_probs_and_hash(built):
    cfg, model_folder, outputs = built
    reference, ingest = StageReader(outputs["reference"].path), StageReader(outputs["ingest"].path)
    assert reference.metrics.pairs == "built"
    own = reference.read(PI_REF_RESPONSES_TABLE).to_pylist()
    train_ids = sorted(r["id"] for r in ingest.read("ingest").to_pylist() if r["split"] == "train")
    assert sorted(r["row_id"] for r in own) == train_ids, "one pi_ref response per training row"
    assert all(r["id"] == r["row_id"] + PI_REF_ID_SUFFIX for r in own)
    assert reference.metrics.pi_ref_responses == len(train_ids)
    prompts = {r["id"]: r["prompt"] for r in ingest.read("ingest").to_pylist()}
    tokenizer, model = load_tokenizer(model_folder), load_causal_lm(model_folder).eval()
    for row in own[:6]:
        assert row["reward"] == pytest.approx(cats_reward([None], [row["response"]])[0])
        p, r = encode_pair(tokenizer, prompts[row["row_id"]], row["response"], cfg.reference.max_prompt_tokens,
                           cfg.reference.max_response_tokens)
        assert row["token_hash"] == token_digest(p, r) and row["response_tokens"] == len(r)
        with torch.no_grad():
            naive = response_token_logprobs(model, [p], [r])[0]
        torch.testing.assert_close(torch.tensor(row["ref_token_logprobs"]), naive, atol=1e-5, rtol=1e-5)
        assert row["ref_logprob"] == pytest.approx(float(naive.sum()), abs=1e-4)


def test_built_pairs_rank_the_data_against_pi_ref_by_reward(built):
    cfg, _, outputs = built
    train = StageReader(outputs["train"].path)
    pairs = train.read("pairs").to_pylist()
    metrics = train.metrics
    assert metrics.pair_source == "built" and metrics.algorithm == "dpo"
    assert len(pairs) + metrics.tied_pairs_left_out == metrics.train_rows == 32
    assert len(pairs) == metrics.drawable_rows > 0
    for pair in pairs:
        assert pair["chosen_reward"] > pair["rejected_reward"]
        assert {pair["chosen_id"], pair["rejected_id"]} == {pair["pair_id"], pair["pair_id"] + PI_REF_ID_SUFFIX}
    # "cats" rows have reward > 0 and the random pi_ref says no "cats": the data wins those pairs.
    assert any(p["chosen_id"] == p["pair_id"] for p in pairs)
    log = train.read("train_log").to_pylist()
    assert len(log) == 3 and all(r["importance_weight_mean"] is None for r in log)
    assert log[0]["loss"] == pytest.approx(torch.nn.functional.softplus(torch.tensor(0.0)).item(), abs=1e-4), (
        "at step 0 pi_theta = pi_ref, so every DPO margin is 0 and the loss is log 2"
    )
    count = sql.query(RunStore.of(cfg), f"SELECT count(*) FROM {PI_REF_RESPONSES_TABLE}").fetchall()[0][0]
    assert count == 32, "alol sql sees pi_ref's responses"


def test_preference_data_trains_pro_on_its_own_pairs_and_builds_nothing(tmp_path):
    torch.set_num_threads(1)
    model, _ = tiny_setup(tmp_path)
    data = write_preference_rows(tmp_path / "pairs.jsonl")
    cfg = config(tmp_path, model, data, **{"train.algorithm": "pro", **PAIR_TRAINING})
    outputs = run_stages(cfg, (*UPSTREAM, "train"))
    reference = StageReader(outputs["reference"].path)
    assert reference.metrics.pairs == "data" and reference.read(PI_REF_RESPONSES_TABLE).num_rows == 0
    ingest = [r for r in StageReader(outputs["ingest"].path).read("ingest").to_pylist() if r["split"] == "train"]
    expected = {
        pair_id: ({r["id"] for r in ingest if r["pair_id"] == pair_id and r["preference"] == "chosen"},
                  {r["id"] for r in ingest if r["pair_id"] == pair_id and r["preference"] == "rejected"})
        for pair_id in {r["pair_id"] for r in ingest}
    }
    pairs = StageReader(outputs["train"].path).read("pairs").to_pylist()
    assert len(pairs) == len(expected) == 16
    for pair in pairs:
        assert ({pair["chosen_id"]}, {pair["rejected_id"]}) == expected[pair["pair_id"]]


def test_dpo_on_data_without_pairs_and_building_off_stops_before_training(tmp_path):
    model, data = tiny_setup(tmp_path)
    cfg = config(tmp_path, model, data, **{"train.algorithm": "dpo", "reference.pairs": "data"})  # format auto
    with pytest.raises(TrainError, match=r"found none .* set reference\.pairs: built or auto"):
        run_stages(cfg, (*UPSTREAM, "train"))


def test_dpo_refuses_dropout_in_pi_theta(tmp_path):
    from tests.support.train import with_attention_dropout

    with pytest.raises(ConfigError, match=r"set train\.lora_dropout: 0"):
        load_config("smoke", overrides=["train.algorithm=dpo", "reference.pairs=built", "train.lora_rank=4", "train.lora_dropout=0.05"])
    model, data = tiny_setup(tmp_path)
    cfg = config(tmp_path, with_attention_dropout(model, 0.1), data, **{"train.algorithm": "dpo", "reference.pairs": "built"})
    with pytest.raises(TrainError, match="has active dropout"):
        run_stages(cfg, (*UPSTREAM, "train"))
