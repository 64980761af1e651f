"""The tiny test model (tests/support/models.py) is a real transformers folder."""

from __future__ import annotations

from tests.support.models import tiny_model_folder


def test_tiny_folder_loads_with_safetensors(tmp_path):
    from stages.models.store import load_causal_lm, load_tokenizer, resolve_model

    folder = resolve_model(str(tiny_model_folder(tmp_path / "tiny")), tmp_path / "cache")
    assert (folder / "model.safetensors").is_file()
    model = load_causal_lm(folder)
    tokenizer = load_tokenizer(folder)
    assert not model.training
    assert model.config.vocab_size == len(tokenizer)
    assert 50_000 < sum(p.numel() for p in model.parameters()) < 500_000
