"""The algorithm registry: one entry per training algorithm, read by the config, the loss, the
sampler, the step budget and `alol compare`.

Adding an algorithm is one `AlgorithmSpec` here plus one loss function of the same name in
`stages.losses.LOSSES` (tests/test_losses.py checks that the two lists agree).
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class AlgorithmSpec:
    """What distinguishes one algorithm from another outside its loss formula.

    `weight_column`: the advantage-table column the sampler draws rows in proportion to (method.md,
    priority sampling). `shrinks_steps`: the step budget is int(steps x #(A > 0) / N) (the A-LoL family).
    `hyperparameters`: the `train.*` fields the loss function takes as keyword arguments.
    `compare_defaults`: values `alol compare` gives those of them that have no default of their own.
    `needs_pairs`: the algorithm trains on preference pairs (the data's `pair_id` / `preference`, or pairs built
    with pi_ref's responses: reference.pairs); a drawn row is a pair, drawn uniformly, and `weight_column` is unused.
    `reference_margin`: the loss differentiates through L_theta - L_ref (DPO), comparing pi_theta with pi_ref's
    cached fp32 log-probs like the clipped weights do.
    """

    name: str
    description: str
    weight_column: str
    shrinks_steps: bool = False
    hyperparameters: tuple[str, ...] = ()
    compare_defaults: dict[str, float] = field(default_factory=dict)
    needs_pairs: bool = False
    reference_margin: bool = False

    @property
    def clipped(self) -> bool:
        """Whether its importance weight is clipped to [1 - clip_epsilon, 1 + clip_epsilon]."""
        return "clip_epsilon" in self.hyperparameters

    @property
    def takes_ratio(self) -> bool:
        """Whether the loss reads a ratio of pi_theta to pi_ref's cached fp32 log-probs (a clipped weight or DPO's
        margin): such losses refuse mixed precision."""
        return self.clipped or self.reference_margin


ALGORITHM_REGISTRY: dict[str, AlgorithmSpec] = {
    spec.name: spec
    for spec in (
        AlgorithmSpec("nll", "negative log-likelihood of the data (behaviour cloning)", "weight_uniform"),
        AlgorithmSpec("wbc", "reward-weighted behaviour cloning", "weight_reward"),
        AlgorithmSpec("r_gold", "R-GOLD: reward times per-token pi_theta weights, no pi_ref", "weight_reward"),
        AlgorithmSpec("r_lol", "R-LoL: reward times the clipped sequence importance weight", "weight_reward",
                      hyperparameters=("clip_epsilon",)),
        AlgorithmSpec("a_lol", "A-LoL: positive advantage times the clipped sequence importance weight",
                      "weight_advantage", shrinks_steps=True, hyperparameters=("clip_epsilon",)),
        AlgorithmSpec("a_lol_ref_free", "A-LoL reference-free: positive advantage, no importance weight",
                      "weight_advantage", shrinks_steps=True),
        AlgorithmSpec("a_lol_seq", "A-LoL sequence: positive advantage times clipped per-token importance weights",
                      "weight_advantage", shrinks_steps=True, hyperparameters=("clip_epsilon",)),
        AlgorithmSpec("a_lol_kl", "A-LoL KL: positive advantage plus a KL penalty to pi_ref", "weight_advantage",
                      shrinks_steps=True, hyperparameters=("kl_beta",), compare_defaults={"kl_beta": 0.1}),
        AlgorithmSpec("dpo", "DPO: -log sigmoid(beta x pi_theta's log-ratio to pi_ref, chosen minus rejected)",
                      "weight_uniform", hyperparameters=("dpo_beta",), needs_pairs=True, reference_margin=True),
        AlgorithmSpec("pro", "PRO: list-wise softmax ranking of length-normalised log-probs plus SFT on the best response",
                      "weight_uniform", hyperparameters=("pro_sft_weight",), needs_pairs=True),
    )
}

ALGORITHMS: tuple[str, ...] = tuple(ALGORITHM_REGISTRY)
"""Algorithm names, in the order of the registry (and of `alol compare`'s table)."""

OPTIONAL_HYPERPARAMETERS: tuple[str, ...] = ("kl_beta",)
"""`train.*` fields that default to None: required by the algorithms that take them, refused by the others."""
