"""The bit-allocation solver against brute force, its budget guarantee, and its errors."""

import itertools

import numpy as np
import pytest

from cascade.quant.allocate import Choice, InfeasibleBudget, allocate, minimum_bytes, total


def _random_problem(rng, n_layers, n_cands, max_bytes=1000):
    layers = {}
    for i in range(n_layers):
        nbytes = rng.integers(1, max_bytes, n_cands)
        loss = rng.random(n_cands) * 10
        layers[f"layers_{i}"] = [Choice(spec=f"s{j}", nbytes=int(b), loss=float(l))
                                 for j, (b, l) in enumerate(zip(nbytes, loss))]
    return layers


def _brute_force(layers, budget):
    best = (np.inf, None)
    for combo in itertools.product(*layers.values()):
        b = sum(c.nbytes for c in combo)
        loss = sum(c.loss for c in combo)
        if b <= budget and loss < best[0] - 1e-12:
            best = (loss, combo)
    return best


def test_a_hand_computed_case():
    """Two layers, 10 bytes: the sensitive layer gets the precision, the robust one the low bits."""
    layers = {"sensitive": [Choice(spec="int8", nbytes=8, loss=0.0), Choice(spec="int4", nbytes=4, loss=5.0),
                            Choice(spec="int2", nbytes=2, loss=20.0)],
              "robust": [Choice(spec="int8", nbytes=8, loss=0.0), Choice(spec="int4", nbytes=4, loss=0.1),
                         Choice(spec="int2", nbytes=2, loss=0.3)]}
    got = allocate(layers, 10)
    assert {n: c.spec for n, c in got.items()} == {"sensitive": "int8", "robust": "int2"}
    assert {n: c.spec for n, c in allocate(layers, 16).items()} == {"sensitive": "int8", "robust": "int8"}
    assert {n: c.spec for n, c in allocate(layers, 6).items()} == {"sensitive": "int4", "robust": "int2"}


@pytest.mark.parametrize("seed", range(12))
def test_it_finds_the_brute_force_optimum_on_toy_problems(seed):
    rng = np.random.default_rng(seed)
    layers = _random_problem(rng, n_layers=int(rng.integers(2, 6)), n_cands=int(rng.integers(2, 5)), max_bytes=60)
    lo, hi = minimum_bytes(layers), sum(max(c.nbytes for c in cs) for cs in layers.values())
    for budget in np.linspace(lo, hi, 5).astype(int):
        got = allocate(layers, int(budget))
        want_loss, _ = _brute_force(layers, budget)
        nbytes, loss = total(got)
        assert nbytes <= budget
        assert loss == pytest.approx(want_loss, abs=1e-9), (seed, budget)


@pytest.mark.parametrize("seed", range(6))
def test_a_coarse_table_never_exceeds_the_budget_and_stays_close(seed):
    """Sizes with no common unit and a 64-cell table: rounded up, the total still fits, and the
    loss is no worse than the exact optimum with the budget less one unit per layer."""
    rng = np.random.default_rng(100 + seed)
    layers = _random_problem(rng, n_layers=5, n_cands=3, max_bytes=997)
    lo, hi = minimum_bytes(layers), sum(max(c.nbytes for c in cs) for cs in layers.values())
    for budget in np.linspace(lo, hi, 7).astype(int)[1:]:
        got = allocate(layers, int(budget), resolution=64)
        nbytes, loss = total(got)
        assert nbytes <= budget
        unit = -(-int(budget) // 64)
        slack_loss, _ = _brute_force(layers, budget - len(layers) * unit)
        assert loss <= slack_loss + 1e-9 or slack_loss == np.inf


def test_an_infeasible_budget_names_the_minimum():
    layers = {"a": [Choice(spec="int4", nbytes=40, loss=1.0), Choice(spec="int8", nbytes=80, loss=0.0)],
              "b": [Choice(spec="int4", nbytes=30, loss=1.0)]}
    with pytest.raises(InfeasibleBudget, match="at least 70 bytes") as e:
        allocate(layers, 69)
    assert e.value.minimum == 70
    assert {n: c.spec for n, c in allocate(layers, 70).items()} == {"a": "int4", "b": "int4"}


@pytest.mark.parametrize("layers, budget, match", [
    ({}, 10, "nothing to allocate"),
    ({"a": []}, 10, "no candidate"),
    ({"a": [Choice(spec="x", nbytes=1, loss=float("nan"))]}, 10, "finite"),
    ({"a": [Choice(spec="x", nbytes=1, loss=0.0)]}, -1, "non-negative"),
    ({"a": [("x", 1, 0.0)]}, 10, "Choice"),
])
def test_bad_input_is_one_clear_error(layers, budget, match):
    with pytest.raises(ValueError, match=match):
        allocate(layers, budget)
