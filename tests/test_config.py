"""Configuration: profiles, overrides, every bad field reported by dotted path, fingerprints."""

from __future__ import annotations

import subprocess
import sys

import pytest

from schemas.config import PROFILES, AlolConfig, ConfigError, load_config, parse_override


@pytest.mark.parametrize("profile", PROFILES)
def test_shipped_profiles_load(profile):
    cfg = load_config(profile)
    assert cfg.run.name == profile


def test_every_field_has_a_description():
    def walk(model, prefix):
        for name, field in model.model_fields.items():
            assert field.description, f"{prefix}{name} has no description"
            annotation = field.annotation
            if isinstance(annotation, type) and hasattr(annotation, "model_fields"):
                walk(annotation, f"{prefix}{name}.")

    for name, field in AlolConfig.model_fields.items():
        walk(field.annotation, f"{name}.")


def test_overrides_are_yaml_typed_and_nested():
    cfg = load_config("smoke", overrides=["train.learning_rate=1e-4", "data.split_fractions.train=0.6",
                                          "data.split_fractions.test=0.3", "train.lora_rank=8"])
    assert cfg.train.learning_rate == pytest.approx(1e-4)
    assert cfg.data.split_fractions.train == pytest.approx(0.6)
    assert cfg.train.lora_rank == 8


def test_user_file_merges_field_by_field(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("train:\n  algorithm: a_lol_seq\n")
    cfg = load_config("smoke", path)
    assert cfg.train.algorithm == "a_lol_seq"
    assert cfg.train.steps == load_config("smoke").train.steps, "unmentioned fields keep the profile's values"


def test_all_bad_fields_listed_by_dotted_path():
    with pytest.raises(ConfigError) as err:
        load_config("smoke", overrides={"train.clip_epsilon": 1.5, "data.on_invalid": "ignore", "train.typo": 1,
                                        "evaluate.max_new_tokens": -1})
    paths = {p for p, _ in err.value.problems}
    assert {"train.clip_epsilon", "data.on_invalid", "train.typo", "evaluate.max_new_tokens"} <= paths


def test_nonsense_combinations_refused():
    with pytest.raises(ConfigError, match="kl_beta"):
        load_config("smoke", overrides={"train.algorithm": "a_lol_kl"})
    with pytest.raises(ConfigError, match="sum to 1"):
        load_config("smoke", overrides={"data.split_fractions.train": 0.9})
    with pytest.raises(ConfigError, match="data.path is required"):
        load_config("smoke", overrides={"data.source": "file"})


def test_the_final_split_is_read_only_when_there_is_one_and_it_is_asked_for():
    assert load_config("default").evaluate.split == "test" and load_config("default").data.final_fraction == 0.5
    with pytest.raises(ConfigError, match="data.final_fraction > 0"):
        load_config("smoke", overrides={"evaluate.split": "final"})
    assert load_config("smoke", overrides={"evaluate.split": "final", "data.final_fraction": 0.5}).evaluate.split == "final"


def test_judges_must_be_independent_of_the_training_reward():
    cfg = load_config("default")
    assert [(j.name, j.kind) for j in cfg.evaluate.judges] == [("fluency", "fluency"), ("inoffensive", "profanity")]
    assert cfg.evaluate.judges[0].options.model == "gemma3-270m"
    assert not {j.kind for j in cfg.evaluate.judges} & {c.kind for c in cfg.score.components}
    with pytest.raises(ConfigError, match="score component 'safety'"):
        load_config("smoke", overrides={"evaluate.judges": [{"name": "toxic", "kind": "toxicity"}]})
    # The same kind with other options is another judge (a different Jigsaw label).
    other = load_config("smoke", overrides={"evaluate.judges": [{"name": "insult", "kind": "toxicity", "options": {"label": "insult"}}]})
    assert other.evaluate.judges[0].options.label == "insult"
    with pytest.raises(ConfigError, match="repeated or already columns"):
        load_config("smoke", overrides={"evaluate.judges": [{"name": "reward", "kind": "length"}]})
    with pytest.raises(ConfigError, match="evaluate.judges.0.kind"):
        load_config("smoke", overrides={"evaluate.judges": [{"name": "t", "kind": "tfidf"}]})
    with pytest.raises(ConfigError, match="options.max_prompt_tokens"):
        load_config("smoke", overrides={"evaluate.judges": [{"name": "f", "kind": "fluency", "options": {"max_prompt_tokens": 0}}]})


@pytest.mark.parametrize("bad", ["train", "train.algorithm", "=3"])
def test_malformed_override(bad):
    with pytest.raises(ConfigError):
        parse_override(bad)


def test_bad_yaml_file_names_the_line(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("train:\n  algorithm: [a_lol\n")
    with pytest.raises(ConfigError) as err:
        load_config("smoke", path)
    assert "broken.yaml" in str(err.value) and "line" in str(err.value)


def test_fingerprint_tracks_content_only():
    a, b = load_config("smoke"), load_config("smoke")
    assert a.train.fingerprint() == b.train.fingerprint()
    b.train.learning_rate = 3e-5
    assert a.train.fingerprint() != b.train.fingerprint()
    assert a.data.fingerprint() == b.data.fingerprint()


def test_cli_config_error_exits_2_without_traceback():
    proc = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "run", "--profile", "smoke", "--set", "train.clip_epsilon=2",
         "--set", "train.steps=0"],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2
    assert "train.clip_epsilon" in proc.stderr and "train.steps" in proc.stderr
    assert "Traceback" not in proc.stderr
