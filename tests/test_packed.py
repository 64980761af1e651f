"""MKL-packed linear layers for inference (stages.models.packed)."""

import pytest
import torch

from stages.models.packed import mkl_packing_available, packed_linears
from stages.models.store import load_causal_lm
from tests.support.models import tiny_model_folder

needs_mkl = pytest.mark.skipif(not mkl_packing_available(), reason="torch built without MKL's packed GEMM")


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return load_causal_lm(tiny_model_folder(tmp_path_factory.mktemp("packed") / "tiny"))


def plain_linears(model) -> list[torch.nn.Linear]:
    return [m for m in model.modules() if type(m) is torch.nn.Linear]


@needs_mkl
@pytest.mark.parametrize("rows", [1, 3, 8])
def test_packed_layers_give_the_plain_layers_logits_and_are_restored(model, rows):
    ids = torch.randint(5, 300, (rows, 11))
    with torch.no_grad():
        plain = model(input_ids=ids).logits
        with packed_linears(model, rows=4) as packed:
            assert packed == len(plain_linears(model)) > 0  # every layer, the tied output head included
            assert all("forward" in m.__dict__ for m in plain_linears(model))
            inside = model(input_ids=ids).logits
        after = model(input_ids=ids).logits
    assert not torch.equal(inside, torch.zeros_like(inside))
    torch.testing.assert_close(inside, plain, rtol=1e-5, atol=1e-5)
    assert all("forward" not in m.__dict__ for m in plain_linears(model))
    assert torch.equal(after, plain)


@needs_mkl
def test_packed_layers_use_the_weights_of_when_the_block_began():
    """The packed copy is taken on entry: a layer packed with other weights gives other outputs."""
    layer = torch.nn.Linear(6, 5, bias=True)
    x = torch.randn(2, 6)
    with torch.no_grad():
        expected = layer(x)
        with packed_linears(layer, rows=2):
            torch.testing.assert_close(layer(x), expected, rtol=1e-6, atol=1e-6)
        layer.weight.mul_(2)
        with packed_linears(layer, rows=2):
            torch.testing.assert_close(layer(x), torch.nn.functional.linear(x, layer.weight, layer.bias), rtol=1e-6, atol=1e-6)


def test_packing_refuses_gradients_and_skips_other_precisions(model):
    with pytest.raises(RuntimeError, match="gradients are enabled"):
        with packed_linears(model, rows=2):
            pass
    half = torch.nn.Sequential(torch.nn.Linear(4, 4).to(torch.bfloat16))
    with torch.no_grad(), packed_linears(half, rows=2) as packed:
        assert packed == 0
        assert "forward" not in half[0].__dict__


@needs_mkl
def test_layers_are_restored_when_the_block_fails(model):
    with pytest.raises(ValueError, match="inside"):
        with torch.no_grad(), packed_linears(model, rows=2):
            raise ValueError("inside")
    assert all("forward" not in m.__dict__ for m in plain_linears(model))


@needs_mkl
def test_under_cpu_autocast_the_layers_compute_as_autocast_does(model):
    """Under bf16 autocast (train.mixed_precision bf16: accelerate runs the model's forward in it, validation
    decoding included) a packed fp32 layer would get bf16 inputs; the layers then run as autocast runs them."""
    ids = torch.randint(5, 300, (3, 11))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        plain = model(input_ids=ids).logits
        with packed_linears(model, rows=3):
            inside = model(input_ids=ids).logits
    assert inside.dtype == plain.dtype
    assert torch.equal(inside, plain)
