"""The algorithm registry (schemas/algorithms.py) is the one place an algorithm is described: adding
one is an AlgorithmSpec plus a loss function of the same name in stages.losses.LOSSES."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from pipeline.compare import algorithm_overrides
from schemas.advantage import ADVANTAGE_SCHEMA
from schemas.algorithms import ALGORITHM_REGISTRY, ALGORITHMS, OPTIONAL_HYPERPARAMETERS
from schemas.config import load_config
from schemas.train import TrainConfig
from stages.losses import LOSSES, loss_function

REPO = Path(__file__).resolve().parent.parent
# The registry and the loss table name every algorithm; the config names its default.
MAY_NAME = {"schemas/algorithms.py": set(ALGORITHMS), "stages/losses.py": set(ALGORITHMS), "schemas/train.py": {"a_lol"}}


def test_every_entry_has_its_loss_and_nothing_else_does():
    assert set(LOSSES) == set(ALGORITHM_REGISTRY) == set(ALGORITHMS)
    assert all(name == spec.name for name, spec in ALGORITHM_REGISTRY.items())


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_each_entry_is_complete_and_consistent(algorithm):
    spec = ALGORITHM_REGISTRY[algorithm]
    assert spec.weight_column in ADVANTAGE_SCHEMA.names
    assert set(spec.hyperparameters) <= set(TrainConfig.model_fields)
    assert {h for h in spec.hyperparameters if h in OPTIONAL_HYPERPARAMETERS} <= set(spec.compare_defaults)
    pairs = {"reference.pairs": "built"} if spec.needs_pairs else {}
    cfg = load_config("smoke", overrides=algorithm_overrides(pairs, algorithm))
    assert cfg.train.algorithm == algorithm
    bound = loss_function(cfg.train)
    assert bound.func is LOSSES[algorithm]
    assert bound.keywords == {name: getattr(cfg.train, name) for name in spec.hyperparameters}
    assert spec.clipped == ("clip_epsilon" in bound.keywords)


def test_the_a_lol_family_is_what_the_registry_says():
    shrink = {name for name, spec in ALGORITHM_REGISTRY.items() if spec.shrinks_steps}
    assert shrink == {"a_lol", "a_lol_ref_free", "a_lol_seq", "a_lol_kl"}
    assert {name for name, spec in ALGORITHM_REGISTRY.items() if spec.clipped} == {"r_lol", "a_lol", "a_lol_seq"}


def test_optional_hyperparameters_are_required_by_their_algorithms_and_refused_by_the_others():
    with pytest.raises(ValueError, match="a_lol_kl needs train.kl_beta"):
        TrainConfig(algorithm="a_lol_kl")
    with pytest.raises(ValueError, match="train.kl_beta is only used by a_lol_kl, not nll"):
        TrainConfig(algorithm="nll", kl_beta=0.1)


def _string_constants(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    return {node.value for node in ast.walk(tree) if isinstance(node, ast.Constant) and isinstance(node.value, str)}


def test_no_other_module_spells_an_algorithm_name():
    """Special cases by name (`if algorithm == "a_lol_kl"`) are how an algorithm ends up in six places."""
    offenders = {}
    for package in ("schemas", "stages", "pipeline"):
        for path in (REPO / package).rglob("*.py"):
            relative = path.relative_to(REPO).as_posix()
            named = _string_constants(path) & set(ALGORITHMS) - MAY_NAME.get(relative, set())
            if named:
                offenders[relative] = sorted(named)
    assert not offenders, offenders
