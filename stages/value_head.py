"""The value head V(x): attention pooling over pi_ref's prompt states, fitted to pi_ref's own rewards.

    V(x) = sigmoid(w . Dropout(MHA(q, H_x, H_x)) + b) * R_max

H_x (P x hidden) are the frozen pi_ref's last-layer hidden states over the prompt tokens, q one
learned query vector, MHA multi-head attention (8 heads) whose keys and values are the prompt
states. Two fixes to the authors' code (../shared/method.md, Value estimate): padding is masked out
of the attention, and inference runs in eval mode (no dropout). Fitted with MSE; part of the
validation prompts is held out and the epoch with the lowest held-out MSE is kept.

Two choices that keep the fit stable on a real model's states (hidden size 576, norms around 45):
the states are standardised per dimension with the training prompts' statistics (fixed buffers,
saved with the head), and the output layer starts at zero weight with the bias at
sigmoid^-1(mean / R_max), so the untrained head predicts the mean training target. That start
counts as epoch 0: when no training epoch beats it on the held-out prompts, the head stays the
mean predictor rather than something worse.
"""

from __future__ import annotations

import copy
import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch
from safetensors.torch import load_file, save_file
from torch import nn

log = logging.getLogger("alol.reference")


class AttentionPoolingValueHead(nn.Module):
    """V(x) = sigmoid(linear(dropout(attention(query, states, states)))) * r_max, padding masked."""

    def __init__(self, hidden_size: int, heads: int = 8, dropout: float = 0.1, r_max: float = 1.0):
        super().__init__()
        if hidden_size % heads:
            raise ValueError(f"value.heads ({heads}) must divide the model's hidden size ({hidden_size})")
        if r_max <= 0:
            raise ValueError(f"R_max must be > 0 for V = sigmoid(.) x R_max, got {r_max}")
        self.hidden_size, self.heads, self.dropout_p, self.r_max = hidden_size, heads, dropout, float(r_max)
        self.query = nn.Parameter(torch.randn(1, 1, hidden_size) / math.sqrt(hidden_size))
        self.attention = nn.MultiheadAttention(hidden_size, heads, batch_first=True)
        self.dropout = nn.Dropout(dropout)
        self.out = nn.Linear(hidden_size, 1)
        self.register_buffer("feature_mean", torch.zeros(hidden_size))
        self.register_buffer("feature_std", torch.ones(hidden_size))

    def forward(self, states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """states (B, P, hidden), mask (B, P) true at real prompt tokens -> V (B,)."""
        states = (states - self.feature_mean) / self.feature_std
        query = self.query.expand(states.shape[0], -1, -1)
        pooled, _ = self.attention(query, states, states, key_padding_mask=~mask.bool(), need_weights=False)
        logit = self.out(self.dropout(pooled[:, 0])).squeeze(-1)
        return torch.sigmoid(logit) * self.r_max

    def start_at(self, states: Sequence[torch.Tensor], mean_target: float) -> None:
        """Standardise with the statistics of `states` (all their tokens) and predict `mean_target` for every prompt.

        Output weight 0 and bias sigmoid^-1(mean / R_max), the mean clipped into (0.1%, 99.9%) of R_max.
        """
        tokens = torch.cat([s.float() for s in states])
        share = min(max(mean_target / self.r_max, 1e-3), 1 - 1e-3)
        with torch.no_grad():
            self.feature_mean.copy_(tokens.mean(0))
            self.feature_std.copy_(tokens.std(0, unbiased=False).clamp_min(1e-6))
            self.out.weight.zero_()
            self.out.bias.fill_(math.log(share / (1 - share)))

    def hyperparameters(self) -> dict[str, float | int]:
        return {"hidden_size": self.hidden_size, "heads": self.heads, "dropout": self.dropout_p, "r_max": self.r_max}


def pad_states(states: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad per-prompt state matrices (P_i x hidden) into (B, max P, hidden) and a (B, max P) mask."""
    width = max(s.shape[0] for s in states)
    padded = states[0].new_zeros((len(states), width, states[0].shape[1]))
    mask = torch.zeros((len(states), width), dtype=torch.bool, device=states[0].device)
    for i, s in enumerate(states):
        padded[i, : s.shape[0]] = s
        mask[i, : s.shape[0]] = True
    return padded, mask


@torch.no_grad()
def predict_values(head: AttentionPoolingValueHead, states: Sequence[torch.Tensor], batch_size: int = 64) -> torch.Tensor:
    """V(x) for each prompt's states, in eval mode (no dropout); float64."""
    was_training = head.training
    head.eval()
    values = []
    for start in range(0, len(states), batch_size):
        padded, mask = pad_states([s.float() for s in states[start : start + batch_size]])
        values.append(head(padded, mask).double())
    head.train(was_training)
    return torch.cat(values) if values else torch.zeros(0, dtype=torch.float64)


def _mse(head: AttentionPoolingValueHead, states: Sequence[torch.Tensor], targets: torch.Tensor) -> float:
    return float(((predict_values(head, states) - targets) ** 2).mean())


@dataclass
class ValueFit:
    """The fitted head and what the fit reports (manifest metrics of the reference stage)."""

    head: AttentionPoolingValueHead
    chosen_epoch: int
    train_mse: float
    holdout_mse: float
    mean_baseline_train_mse: float
    mean_baseline_holdout_mse: float
    train_rows: int
    holdout_rows: int
    holdout_mask: list[bool]
    holdout_mse_by_epoch: list[float] = field(default_factory=list)
    """Held-out MSE after each epoch; index 0 is the start (the mean predictor)."""

    def metrics(self) -> dict[str, float | int | list[float]]:
        return {
            "value_chosen_epoch": self.chosen_epoch,
            "value_train_mse": self.train_mse,
            "value_holdout_mse": self.holdout_mse,
            "value_mean_baseline_train_mse": self.mean_baseline_train_mse,
            "value_mean_baseline_holdout_mse": self.mean_baseline_holdout_mse,
            "value_train_rows": self.train_rows,
            "value_holdout_rows": self.holdout_rows,
            "value_holdout_mse_by_epoch": self.holdout_mse_by_epoch,
        }


def split_holdout(n: int, holdout_fraction: float, generator: torch.Generator) -> list[bool]:
    """A random `holdout_fraction` of n rows (at least one; at least one left to train on)."""
    if n < 2:
        raise ValueError(f"the value head needs at least 2 validation prompts (one to train, one held out), got {n}")
    n_holdout = min(max(1, round(n * holdout_fraction)), n - 1)
    chosen = set(torch.randperm(n, generator=generator)[:n_holdout].tolist())
    return [i in chosen for i in range(n)]


def fit_value_head(
    states: Sequence[torch.Tensor],
    targets: Sequence[float],
    *,
    r_max: float,
    heads: int,
    dropout: float,
    epochs: int,
    learning_rate: float,
    batch_size: int,
    holdout_fraction: float,
    seed: int,
) -> ValueFit:
    """Fit V to (prompt states, R(x, y_ref)) pairs with MSE; keep the epoch with the lowest held-out MSE.

    Epoch 0 is the start, which predicts the mean training target (up to the clip of `start_at`), so the
    kept head is never worse on the held-out prompts than that. The baselines are the MSE of always
    predicting the mean training target, on each part.
    """
    if len(states) != len(targets):
        raise ValueError(f"{len(states)} prompt state matrices but {len(targets)} targets")
    y = torch.as_tensor(list(targets), dtype=torch.float64)
    if not torch.isfinite(y).all():
        raise ValueError("value targets contain NaN or infinite rewards; check the score stage's components")
    generator = torch.Generator().manual_seed(seed)
    holdout = split_holdout(len(states), holdout_fraction, generator)
    train_idx = [i for i, h in enumerate(holdout) if not h]
    hold_idx = [i for i, h in enumerate(holdout) if h]
    train_states, hold_states = [states[i].float() for i in train_idx], [states[i].float() for i in hold_idx]
    y_train, y_hold = y[train_idx], y[hold_idx]
    mean = float(y_train.mean())

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        head = AttentionPoolingValueHead(states[0].shape[1], heads, dropout, r_max)
        head.start_at(train_states, mean)
        optimizer = torch.optim.AdamW(head.parameters(), lr=learning_rate)
        best_state, best_epoch, best_mse = copy.deepcopy(head.state_dict()), 0, _mse(head, hold_states, y_hold)
        by_epoch = [best_mse]
        for epoch in range(1, epochs + 1):
            _train_epoch(head, optimizer, train_states, y_train, batch_size, generator)
            mse = _mse(head, hold_states, y_hold)
            by_epoch.append(mse)
            log.info("value head epoch %d: held-out MSE %.5f", epoch, mse)
            if mse < best_mse:
                best_state, best_epoch, best_mse = copy.deepcopy(head.state_dict()), epoch, mse
    head.load_state_dict(best_state)
    head.eval()
    return ValueFit(
        head=head,
        chosen_epoch=best_epoch,
        train_mse=_mse(head, train_states, y_train),
        holdout_mse=best_mse,
        mean_baseline_train_mse=float(((y_train - mean) ** 2).mean()),
        mean_baseline_holdout_mse=float(((y_hold - mean) ** 2).mean()),
        train_rows=len(train_idx),
        holdout_rows=len(hold_idx),
        holdout_mask=holdout,
        holdout_mse_by_epoch=by_epoch,
    )


def _train_epoch(
    head: AttentionPoolingValueHead,
    optimizer: torch.optim.Optimizer,
    states: Sequence[torch.Tensor],
    targets: torch.Tensor,
    batch_size: int,
    generator: torch.Generator,
) -> None:
    head.train()
    order = torch.randperm(len(states), generator=generator).tolist()
    for start in range(0, len(order), batch_size):
        batch = order[start : start + batch_size]
        padded, mask = pad_states([states[i] for i in batch])
        loss = ((head(padded, mask) - targets[batch].float()) ** 2).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()


def save_value_head(head: AttentionPoolingValueHead, path: str | Path) -> None:
    """Weights as safetensors; the hyperparameters go in the file's metadata."""
    tensors = {k: v.detach().contiguous().cpu() for k, v in head.state_dict().items()}
    save_file(tensors, str(path), metadata={"alol_value_head": json.dumps(head.hyperparameters())})


def load_value_head(path: str | Path) -> AttentionPoolingValueHead:
    """The head saved by `save_value_head`, in eval mode."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as fh:
        meta = (fh.metadata() or {}).get("alol_value_head")
    if meta is None:
        raise ValueError(f"{path}: not a value head written by alol (no alol_value_head metadata)")
    params = json.loads(meta)
    head = AttentionPoolingValueHead(int(params["hidden_size"]), int(params["heads"]), float(params["dropout"]), float(params["r_max"]))
    head.load_state_dict(load_file(str(path)))
    return head.eval()
