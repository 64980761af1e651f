"""Each loss against a hand computation on a 2-row, 3-token toy case, loss value and gradient.

Row 0 has 3 response tokens, row 1 has 2 (the third position is padding). The gradient is taken
with respect to l_t^theta, the model's per-token log-probs.
"""

from dataclasses import replace
from math import exp, log

import pytest
import torch

from schemas.algorithms import ALGORITHM_REGISTRY
from schemas.train import ALGORITHMS, TrainConfig
from stages.losses import LOSSES, LossBatch, a_lol, loss_function, nll, nll_batch, pad_rows

EPS = 0.5  # clip to [0.5, 1.5]
BETA = 0.2

L_THETA = [[-0.5, -1.0, -2.0], [-0.1, -3.0]]
L_REF = [[-0.7, -0.9, -2.5], [-0.3, -2.4]]
R = [0.8, 0.3]
A = [0.5, 0.25]


def toy_batch(advantage=A) -> tuple[LossBatch, torch.Tensor]:
    theta, mask = pad_rows([torch.tensor(r, dtype=torch.float64) for r in L_THETA])
    theta.requires_grad_(True)
    ref, _ = pad_rows([torch.tensor(r, dtype=torch.float64) for r in L_REF])
    batch = LossBatch(
        token_logprobs=theta,
        ref_token_logprobs=ref,
        mask=mask,
        ref_logprob=torch.tensor([sum(r) for r in L_REF], dtype=torch.float64),
        reward=torch.tensor(R, dtype=torch.float64),
        advantage=torch.tensor(advantage, dtype=torch.float64),
    )
    return batch, theta


def run(algorithm: str, advantage=A):
    batch, theta = toy_batch(advantage)
    if ALGORITHM_REGISTRY[algorithm].needs_pairs:
        batch = replace(batch, group_size=2)  # the two rows as one pair: row 0 chosen, row 1 rejected
    cfg = TrainConfig(algorithm=algorithm, clip_epsilon=EPS, kl_beta=BETA if algorithm == "a_lol_kl" else None)
    out = loss_function(cfg)(batch)
    out.loss.backward()
    grad = [theta.grad[0].tolist(), theta.grad[1, :2].tolist()]
    assert theta.grad[1, 2].item() == 0.0, "padding gets no gradient"
    return out, grad


def clip(z):
    return min(max(z, 1 - EPS), 1 + EPS)


# Hand values. L_theta = (-3.5, -3.1), L_ref = (-4.1, -2.7).
# rho = (exp(0.6) = 1.822 -> clipped to 1.5, exp(-0.4) = 0.670 -> kept).
RHO = [exp(0.6), exp(-0.4)]
# rho_t: row 0 exp(0.2), exp(-0.1), exp(0.5) (-> 1.5); row 1 exp(0.2), exp(-0.6).
RHO_T = [[exp(0.2), exp(-0.1), exp(0.5)], [exp(0.2), exp(-0.6)]]
# R-GOLD weights max(exp(l_t), 0.1): row 1's exp(-3) = 0.0498 -> 0.1.
GOLD = [[exp(-0.5), exp(-1.0), exp(-2.0)], [exp(-0.1), 0.1]]

DPO_BETA = 0.1
SIG_NEG = 1 / (1 + exp(DPO_BETA))  # sigmoid(-beta x margin): the weight of DPO's gradient
S_W, S_L = -3.5 / 3, -3.1 / 2  # PRO's length-normalised log-probs of the chosen and rejected rows
P_L = exp(S_L) / (exp(S_W) + exp(S_L))

EXPECTED = {
    "nll": ((3.5 + 3.1) / 2, [[-0.5] * 3, [-0.5] * 2]),
    "wbc": ((0.8 * 3.5 + 0.3 * 3.1) / 2, [[-0.4] * 3, [-0.15] * 2]),
    "r_gold": (
        (0.8 * (GOLD[0][0] * 0.5 + GOLD[0][1] * 1.0 + GOLD[0][2] * 2.0) + 0.3 * (GOLD[1][0] * 0.1 + 0.1 * 3.0)) / 2,
        [[-0.8 * g / 2 for g in GOLD[0]], [-0.3 * g / 2 for g in GOLD[1]]],
    ),
    "r_lol": (
        (0.8 * 1.5 * 3.5 + 0.3 * RHO[1] * 3.1) / 2,
        [[-0.8 * 1.5 / 2] * 3, [-0.3 * RHO[1] / 2] * 2],
    ),
    "a_lol": (
        (0.5 * 1.5 * 3.5 + 0.25 * RHO[1] * 3.1) / 2,
        [[-0.5 * 1.5 / 2] * 3, [-0.25 * RHO[1] / 2] * 2],
    ),
    "a_lol_ref_free": ((0.5 * 3.5 + 0.25 * 3.1) / 2, [[-0.25] * 3, [-0.125] * 2]),
    "a_lol_seq": (
        (
            0.5 * (RHO_T[0][0] * 0.5 + RHO_T[0][1] * 1.0 + 1.5 * 2.0)
            + 0.25 * (RHO_T[1][0] * 0.1 + RHO_T[1][1] * 3.0)
        )
        / 2,
        [[-0.5 * RHO_T[0][0] / 2, -0.5 * RHO_T[0][1] / 2, -0.5 * 1.5 / 2], [-0.25 * r / 2 for r in RHO_T[1]]],
    ),
    "a_lol_kl": (
        (0.5 * 3.5 + BETA * (-3.5 + 4.1) + 0.25 * 3.1 + BETA * (-3.1 + 2.7)) / 2,
        [[(-0.5 + BETA) / 2] * 3, [(-0.25 + BETA) / 2] * 2],
    ),
    # One pair; margin (L_theta - L_ref)(y_w) - (L_theta - L_ref)(y_l) = 0.6 - (-0.4) = 1, beta 0.1 (the default).
    "dpo": (log(1 + exp(-DPO_BETA)), [[-DPO_BETA * SIG_NEG] * 3, [DPO_BETA * SIG_NEG] * 2]),
    # s = (-3.5 / 3, -3.1 / 2); ranking term log(e^s_w + e^s_l) - s_w, SFT term -0.05 s_w.
    "pro": (
        log(exp(S_W) + exp(S_L)) - S_W - 0.05 * S_W,
        [[(-P_L - 0.05) / 3] * 3, [P_L / 2] * 2],
    ),
}


def test_every_algorithm_has_a_loss_and_a_hand_case():
    assert set(LOSSES) == set(ALGORITHMS) == set(EXPECTED)


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_loss_and_gradient_match_hand_computation(algorithm):
    out, grad = run(algorithm)
    loss, expected_grad = EXPECTED[algorithm]
    assert out.loss.item() == pytest.approx(loss, rel=1e-12)
    for got, want in zip(grad, expected_grad):
        assert got == pytest.approx(want, rel=1e-12)


def test_importance_weight_statistics():
    out, _ = run("a_lol")
    assert out.weights.tolist() == pytest.approx(RHO)
    assert out.clipped.tolist() == [True, False]
    out, _ = run("a_lol_seq")
    assert out.weights.tolist() == pytest.approx(RHO_T[0] + RHO_T[1]), "padding is not a token"
    assert out.clipped.tolist() == [False, False, True, False, False]
    out, _ = run("r_gold")
    assert out.clipped.tolist() == [False, False, False, False, True]
    assert run("nll")[0].weights is None


@pytest.mark.parametrize("algorithm", ["a_lol", "a_lol_ref_free", "a_lol_seq", "a_lol_kl"])
def test_negative_advantage_contributes_nothing_but_the_kl_term(algorithm):
    out, grad = run(algorithm, advantage=[0.5, -0.4])
    expected_row1 = [BETA / 2] * 2 if algorithm == "a_lol_kl" else [0.0, 0.0]
    assert grad[1] == pytest.approx(expected_row1, abs=1e-15)


def test_weights_are_detached_so_the_ratio_gets_no_gradient_of_its_own():
    # With the weight inside the graph the gradient of a_lol would gain A+ * rho * L terms.
    batch, theta = toy_batch()
    a_lol(batch, clip_epsilon=1.0).loss.backward()
    assert theta.grad[1, :2].tolist() == pytest.approx([-0.25 * RHO[1] / 2] * 2, rel=1e-12)


def test_nll_batch_gives_the_summed_token_nll_of_unpadded_rows():
    """The SFT of pi_ref: nll over rows of different lengths is mean over rows of -sum_t l_t, and each
    real token's gradient is exactly -1/B (what the per-row sums give)."""
    rows = [torch.tensor(r, dtype=torch.float32, requires_grad=True) for r in ([-0.5, -1.0, -2.0], [-0.1, -3.0], [-4.0])]
    batch = nll_batch(rows)
    assert batch.token_logprobs.shape == batch.mask.shape == (3, 3)
    assert batch.mask.tolist() == [[1, 1, 1], [1, 1, 0], [1, 0, 0]]
    loss = nll(batch).loss
    assert loss.item() == pytest.approx((3.5 + 3.1 + 4.0) / 3, rel=1e-6)
    grads = torch.autograd.grad(loss, rows)
    expected = torch.autograd.grad(-torch.stack([r.sum() for r in rows]).mean(), rows)
    for got, want in zip(grads, expected):
        assert torch.equal(got, want)


@pytest.mark.parametrize("algorithm", ["r_lol", "a_lol", "a_lol_seq"])
def test_ratio_reads_the_dropout_free_log_probs_and_the_gradient_the_training_ones(algorithm):
    """With weight_token_logprobs = L_REF every weight is 1; the gradient is that of the unweighted loss."""
    batch, theta = toy_batch()
    batch = replace(batch, weight_token_logprobs=batch.ref_token_logprobs.clone())
    cfg = TrainConfig(algorithm=algorithm, clip_epsilon=EPS)
    out = loss_function(cfg)(batch)
    torch.testing.assert_close(out.weights, torch.ones_like(out.weights))
    out.loss.backward()
    scale = R if algorithm == "r_lol" else A
    expected = [-scale[0] / 2] * 3 + [-scale[1] / 2] * 2  # d/dl_t of mean_i s_i * (-L_i), weights 1
    assert theta.grad[0].tolist() + theta.grad[1, :2].tolist() == pytest.approx(expected)


def test_pro_is_list_wise_over_a_ranking_of_three():
    """Rows y_1 > y_2 > y_3 of one prompt: -log softmax(s)_1 - log softmax(s_2, s_3)_2 - w s_1, s = L / T."""
    theta = torch.tensor([[-1.0, -2.0], [-0.5, -0.5], [-3.0, -1.0]], dtype=torch.float64, requires_grad=True)
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0], [1.0, 1.0]], dtype=torch.float64)
    zeros = torch.zeros(3, dtype=torch.float64)
    batch = LossBatch(token_logprobs=theta * mask, ref_token_logprobs=theta.detach() * 0, mask=mask,
                      ref_logprob=zeros, reward=zeros, advantage=zeros, group_size=3)
    s = [-1.5, -0.5, -2.0]
    expected = (log(sum(exp(v) for v in s)) - s[0]) + (log(exp(s[1]) + exp(s[2])) - s[1]) - 0.05 * s[0]
    out = loss_function(TrainConfig(algorithm="pro"))(batch)
    assert out.loss.item() == pytest.approx(expected, rel=1e-12)
    with pytest.raises(ValueError, match="groups of 2"):
        loss_function(TrainConfig(algorithm="pro"))(replace(batch, group_size=2))
    with pytest.raises(ValueError, match="dpo trains on pairs"):
        loss_function(TrainConfig(algorithm="dpo"))(batch)
