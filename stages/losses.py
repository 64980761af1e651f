"""Per-row losses of A-LoL and its baselines, one short function each (../shared/method.md, Losses).

Notation: l_t = log pi(y_t | x, y_<t) over the response tokens (EOS included), L = sum_t l_t,
sg[.] = stop-gradient, rho = exp(L_theta - L_ref), rho_t = exp(l_t^theta - l_t^ref),
clip_e(z) = min(max(z, 1 - e), 1 + e), A+ = max(A, 0). A loss is the batch mean of per-row terms; the
pair algorithms' (dpo, pro) is the mean over groups of rows ranked best first (LossBatch.group_size: 2 for
a pair, rows 2k = chosen y_w and 2k + 1 = rejected y_l).

pi_ref's log-probs are not computed here: they come from the reference stage's table (eval mode,
fp32). The log-probs in an importance weight (rho, rho_t) must be taken the same way, so the train
stage passes `weight_token_logprobs` from a dropout-free no-grad forward when pi_theta has dropout
(LossBatch.weight_logprobs), and refuses mixed precision for the losses that take a ratio.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor

from schemas.algorithms import ALGORITHM_REGISTRY
from schemas.train import TrainConfig

GOLD_MIN_PROBABILITY = 0.1
"""R-GOLD's lower bound on the per-token weight pi_theta(y_t): sg[max(exp(l_t), 0.1)]."""


@dataclass(frozen=True)
class LossBatch:
    """One micro-batch; per-token tensors are B x T, right-padded, zero on padding."""

    token_logprobs: Tensor  # l_t^theta, differentiable
    ref_token_logprobs: Tensor  # l_t^ref (reference table)
    mask: Tensor  # 1.0 on response tokens, 0.0 on padding
    ref_logprob: Tensor  # L_ref per row (reference table)
    reward: Tensor  # R per row
    advantage: Tensor  # A = R - V per row
    weight_token_logprobs: Tensor | None = None  # l_t^theta of a dropout-free forward; None: token_logprobs'
    group_size: int = 1  # consecutive rows ranked best first per prompt (2 for pairs: chosen, rejected)

    @property
    def logprob(self) -> Tensor:
        """L_theta = sum_t l_t^theta per row."""
        return (self.token_logprobs * self.mask).sum(-1)

    @property
    def weight_logprobs(self) -> Tensor:
        """Detached l_t^theta for an importance weight, taken like l_t^ref (no dropout): B x T."""
        weights = self.token_logprobs if self.weight_token_logprobs is None else self.weight_token_logprobs
        return weights.detach() * self.mask


@dataclass(frozen=True)
class LossOutput:
    """The loss and, for losses with an importance weight, the detached unclipped weights it used
    (one per row, or one per response token) and which of them the clip moved."""

    loss: Tensor
    weights: Tensor | None = None
    clipped: Tensor | None = None


def clip(z: Tensor, epsilon: float) -> Tensor:
    """clip_e(z) = min(max(z, 1 - e), 1 + e)."""
    return z.clamp(1.0 - epsilon, 1.0 + epsilon)


def positive_part(advantage: Tensor) -> Tensor:
    """A+ = max(A, 0)."""
    return advantage.clamp(min=0.0)


def outside_clip(z: Tensor, epsilon: float) -> Tensor:
    return (z < 1.0 - epsilon) | (z > 1.0 + epsilon)


def ranked_groups(per_row: Tensor, group_size: int) -> Tensor:
    """Per-row values as groups x group_size, each group's rows best first (LossBatch.group_size)."""
    if group_size < 2 or per_row.shape[0] % group_size:
        raise ValueError(f"{per_row.shape[0]} rows do not form groups of {group_size} ranked responses")
    return per_row.view(-1, group_size)


def nll(b: LossBatch) -> LossOutput:
    """NLL: -L_theta."""
    return LossOutput((-b.logprob).mean())


def wbc(b: LossBatch) -> LossOutput:
    """Weighted behaviour cloning: R * (-L_theta)."""
    return LossOutput((b.reward * -b.logprob).mean())


def r_gold(b: LossBatch) -> LossOutput:
    """R-GOLD: R * sum_t sg[max(exp(l_t^theta), 0.1)] * (-l_t^theta); no pi_ref."""
    probability = b.token_logprobs.detach().exp()
    weight = probability.clamp(min=GOLD_MIN_PROBABILITY)
    per_row = b.reward * (weight * -b.token_logprobs * b.mask).sum(-1)
    real = b.mask.bool()
    return LossOutput(per_row.mean(), probability[real], (probability < GOLD_MIN_PROBABILITY)[real])


def r_lol(b: LossBatch, clip_epsilon: float) -> LossOutput:
    """R-LoL: R * sg[clip_e(rho)] * (-L_theta), rho = exp(L_theta - L_ref)."""
    logprob = b.logprob
    rho = (b.weight_logprobs.sum(-1) - b.ref_logprob).exp()
    per_row = b.reward * clip(rho, clip_epsilon) * -logprob
    return LossOutput(per_row.mean(), rho, outside_clip(rho, clip_epsilon))


def a_lol(b: LossBatch, clip_epsilon: float) -> LossOutput:
    """A-LoL: A+ * sg[clip_e(rho)] * (-L_theta), rho = exp(L_theta - L_ref)."""
    logprob = b.logprob
    rho = (b.weight_logprobs.sum(-1) - b.ref_logprob).exp()
    per_row = positive_part(b.advantage) * clip(rho, clip_epsilon) * -logprob
    return LossOutput(per_row.mean(), rho, outside_clip(rho, clip_epsilon))


def a_lol_ref_free(b: LossBatch) -> LossOutput:
    """A-LoL reference-free: A+ * (-L_theta)."""
    return LossOutput((positive_part(b.advantage) * -b.logprob).mean())


def a_lol_seq(b: LossBatch, clip_epsilon: float) -> LossOutput:
    """A-LoL sequence (per-token ratios): A+ * sum_t sg[clip_e(rho_t)] * (-l_t^theta), rho_t = exp(l_t^theta - l_t^ref)."""
    rho_t = (b.weight_logprobs - b.ref_token_logprobs).exp()
    per_row = positive_part(b.advantage) * (clip(rho_t, clip_epsilon) * -b.token_logprobs * b.mask).sum(-1)
    real = b.mask.bool()
    return LossOutput(per_row.mean(), rho_t[real], outside_clip(rho_t, clip_epsilon)[real])


def a_lol_kl(b: LossBatch, kl_beta: float) -> LossOutput:
    """A-LoL KL: A+ * (-L_theta) + beta * (L_theta - sg[L_ref]).

    L_ref is a constant, so the gradient is -(A+ - beta) * grad L_theta: a step raises log pi_theta(y|x)
    with weight A+ - beta, lowers it where A+ < beta, and never reads a ratio to pi_ref (so, unlike the
    clipped losses, it neither needs a dropout-free weight forward nor refuses mixed precision); the
    penalty term's value is a single-sample estimate of beta * KL(pi_theta || pi_ref) only for y drawn
    from pi_theta, which offline rows are not.
    """
    logprob = b.logprob
    per_row = positive_part(b.advantage) * -logprob + kl_beta * (logprob - b.ref_logprob.detach())
    return LossOutput(per_row.mean())


def dpo(b: LossBatch, dpo_beta: float) -> LossOutput:
    """DPO: -log sigmoid(beta * [(L_theta(y_w) - L_ref(y_w)) - (L_theta(y_l) - L_ref(y_l))]) per pair (y_w, y_l)."""
    if b.group_size != 2:
        raise ValueError(f"dpo trains on pairs; got groups of {b.group_size} responses")
    log_ratio = ranked_groups(b.logprob - b.ref_logprob, 2)
    return LossOutput(-F.logsigmoid(dpo_beta * (log_ratio[:, 0] - log_ratio[:, 1])).mean())


def pro(b: LossBatch, pro_sft_weight: float) -> LossOutput:
    """PRO, for a ranking y_1 > ... > y_n of one prompt's responses (a pair: n = 2):
    sum_{k<n} -log( exp(s_k) / sum_{j>=k} exp(s_j) ) + w * (-s_1),  s = L_theta / T (length-normalised),
    so the SFT term is the per-token NLL of the best response (the k = n term is -log 1 = 0). No pi_ref."""
    s = ranked_groups(b.logprob / b.mask.sum(-1), b.group_size)
    log_tail = torch.logcumsumexp(s.flip(-1), dim=-1).flip(-1)  # log sum_{j>=k} exp(s_j)
    ranking = (log_tail - s)[:, :-1].sum(-1)
    return LossOutput((ranking - pro_sft_weight * s[:, 0]).mean())


LOSSES: dict[str, Callable[..., LossOutput]] = {
    "nll": nll,
    "wbc": wbc,
    "r_gold": r_gold,
    "r_lol": r_lol,
    "a_lol": a_lol,
    "a_lol_ref_free": a_lol_ref_free,
    "a_lol_seq": a_lol_seq,
    "a_lol_kl": a_lol_kl,
    "dpo": dpo,
    "pro": pro,
}
"""Algorithm name -> its loss; the other facts of each algorithm are in schemas.algorithms.ALGORITHM_REGISTRY."""


def loss_function(cfg: TrainConfig) -> Callable[[LossBatch], LossOutput]:
    """The loss of `cfg.algorithm` with its hyper-parameters (the registry's `hyperparameters`) bound from `cfg`."""
    spec = ALGORITHM_REGISTRY[cfg.algorithm]
    return partial(LOSSES[cfg.algorithm], **{name: getattr(cfg, name) for name in spec.hyperparameters})


def pad_rows(rows: list[Tensor], width: int | None = None) -> tuple[Tensor, Tensor]:
    """Stack variable-length 1-D tensors into B x T (right padding with 0) and the 0/1 mask."""
    width = width or max(len(r) for r in rows)
    values = torch.stack([torch.nn.functional.pad(r, (0, width - len(r))) for r in rows])
    mask = torch.zeros(len(rows), width, dtype=values.dtype, device=values.device)
    for i, r in enumerate(rows):
        mask[i, : len(r)] = 1.0
    return values, mask


def nll_batch(token_logprobs: list[Tensor]) -> LossBatch:
    """The LossBatch of `nll`, which reads only l_t^theta and the mask: the rows right-padded
    (pad_rows), zeros for what comes from elsewhere (pi_ref's log-probs, R, A)."""
    values, mask = pad_rows(token_logprobs)
    per_row = torch.zeros(len(token_logprobs), dtype=values.dtype, device=values.device)
    return LossBatch(
        token_logprobs=values, ref_token_logprobs=torch.zeros_like(values), mask=mask,
        ref_logprob=per_row, reward=per_row, advantage=per_row,
    )
