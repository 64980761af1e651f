"""The attention-pooling value head: masking, eval mode, fitting a planted function, epoch choice, save/load."""

from __future__ import annotations

import pytest
import torch

from stages.value_head import (
    AttentionPoolingValueHead,
    fit_value_head,
    load_value_head,
    pad_states,
    predict_values,
    save_value_head,
)

HIDDEN = 32


def _toy_prompts(n: int, seed: int) -> tuple[list[torch.Tensor], list[float], float]:
    """Prompts of 3-12 random token states; R = R_max * sigmoid(2 * mean_t <x_t, w>), a function of the prompt."""
    w = torch.randn(HIDDEN, generator=torch.Generator().manual_seed(1234)) / HIDDEN**0.5
    g = torch.Generator().manual_seed(seed)
    r_max = 3.0
    states, targets = [], []
    for _ in range(n):
        length = int(torch.randint(3, 13, (1,), generator=g))
        x = torch.randn(length, HIDDEN, generator=g)
        states.append(x)
        targets.append(r_max * torch.sigmoid(2 * (x @ w).mean() * 3).item())
    return states, targets, r_max


def test_padding_content_does_not_change_v():
    torch.manual_seed(0)
    head = AttentionPoolingValueHead(HIDDEN, heads=8, dropout=0.1, r_max=2.0).eval()
    states = [torch.randn(n, HIDDEN) for n in (2, 7, 5, 11)]
    padded, mask = pad_states(states)
    with torch.no_grad():
        clean = head(padded, mask)
        noisy = padded.clone()
        noisy[~mask] = torch.randn(int((~mask).sum()), HIDDEN) * 100
        assert torch.allclose(head(noisy, mask), clean, atol=1e-6)
        # Without the mask the padding would leak in: the check above is not vacuous.
        assert not torch.allclose(head(noisy, torch.ones_like(mask)), clean, atol=1e-3)
        # Each row alone (no padding at all) gives the same value.
        alone = torch.stack([head(s[None], torch.ones(1, len(s), dtype=torch.bool))[0] for s in states])
    assert torch.allclose(alone, clean, atol=1e-6)
    assert torch.all((clean > 0) & (clean < 2.0))


def test_inference_is_in_eval_mode():
    torch.manual_seed(0)
    head = AttentionPoolingValueHead(HIDDEN, heads=4, dropout=0.5, r_max=1.0)
    states = [torch.randn(6, HIDDEN) for _ in range(8)]
    head.train()
    padded, mask = pad_states(states)
    assert not torch.allclose(head(padded, mask), head(padded, mask))  # dropout is live in training
    first, second = predict_values(head, states), predict_values(head, states)
    assert torch.equal(first, second)
    assert head.training  # predict_values restores the caller's mode


def test_head_learns_a_planted_function_of_the_prompt():
    states, targets, r_max = _toy_prompts(300, seed=1)
    fit = fit_value_head(
        states, targets, r_max=r_max, heads=8, dropout=0.1, epochs=20, learning_rate=3e-3,
        batch_size=32, holdout_fraction=0.2, seed=0,
    )
    assert fit.holdout_rows == 60 and fit.train_rows == 240 and sum(fit.holdout_mask) == 60
    assert fit.holdout_mse < 0.05 * fit.mean_baseline_holdout_mse
    assert fit.train_mse < 0.05 * fit.mean_baseline_train_mse
    assert len(fit.holdout_mse_by_epoch) == 21  # the start (epoch 0) and 20 epochs
    assert fit.chosen_epoch == min(range(21), key=fit.holdout_mse_by_epoch.__getitem__) > 0
    assert fit.holdout_mse == min(fit.holdout_mse_by_epoch)
    # The start predicts the mean training target: its held-out MSE is the mean baseline.
    assert fit.holdout_mse_by_epoch[0] == pytest.approx(fit.mean_baseline_holdout_mse, rel=1e-5)
    # Fresh prompts from the same function: the head generalises, it did not memorise.
    fresh, fresh_targets, _ = _toy_prompts(100, seed=2)
    mse = float(((predict_values(fit.head, fresh) - torch.tensor(fresh_targets, dtype=torch.float64)) ** 2).mean())
    variance = float(torch.tensor(fresh_targets).var())
    assert mse < 0.05 * variance


def test_large_unnormalised_states_and_noise_targets_never_end_worse_than_the_mean():
    """States like a real LM's (norm ~50, a few outlier dimensions) and targets unrelated to them."""
    g = torch.Generator().manual_seed(4)
    scale = torch.ones(576)
    scale[[3, 99, 400]] = 40.0
    states = [torch.randn(int(torch.randint(20, 60, (1,), generator=g)), 576, generator=g) * 2 * scale for _ in range(30)]
    targets = (2.5 + 0.3 * torch.randn(30, generator=g)).tolist()
    fit = fit_value_head(states, targets, r_max=4.0, heads=8, dropout=0.1, epochs=10, learning_rate=1e-3,
                         batch_size=32, holdout_fraction=0.2, seed=0)
    assert fit.holdout_mse <= fit.mean_baseline_holdout_mse * (1 + 1e-5)
    assert torch.all((predict_values(fit.head, states) - 2.5).abs() < 1.0)  # no saturation at 0 or R_max


def test_fit_is_reproducible_with_the_same_seed():
    states, targets, r_max = _toy_prompts(40, seed=3)
    kwargs = dict(r_max=r_max, heads=8, dropout=0.1, epochs=3, learning_rate=1e-3, batch_size=8, holdout_fraction=0.25)
    a = fit_value_head(states, targets, seed=5, **kwargs)
    b = fit_value_head(states, targets, seed=5, **kwargs)
    assert a.holdout_mask == b.holdout_mask
    assert torch.equal(predict_values(a.head, states), predict_values(b.head, states))


def test_save_and_load_round_trip(tmp_path):
    torch.manual_seed(0)
    head = AttentionPoolingValueHead(HIDDEN, heads=8, dropout=0.1, r_max=4.0)
    states = [torch.randn(n, HIDDEN) for n in (3, 9)]
    save_value_head(head, tmp_path / "value_head.safetensors")
    loaded = load_value_head(tmp_path / "value_head.safetensors")
    assert loaded.hyperparameters() == head.hyperparameters() and not loaded.training
    assert torch.equal(predict_values(loaded, states), predict_values(head, states))


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="must divide"):
        AttentionPoolingValueHead(30, heads=8)
    with pytest.raises(ValueError, match="R_max"):
        AttentionPoolingValueHead(HIDDEN, heads=8, r_max=0.0)
    with pytest.raises(ValueError, match="at least 2"):
        fit_value_head([torch.randn(3, HIDDEN)], [1.0], r_max=1.0, heads=8, dropout=0.1, epochs=1,
                       learning_rate=1e-3, batch_size=4, holdout_fraction=0.2, seed=0)
    with pytest.raises(ValueError, match="NaN"):
        fit_value_head([torch.randn(3, HIDDEN)] * 3, [1.0, float("nan"), 0.0], r_max=1.0, heads=8, dropout=0.1,
                       epochs=1, learning_rate=1e-3, batch_size=4, holdout_fraction=0.2, seed=0)
