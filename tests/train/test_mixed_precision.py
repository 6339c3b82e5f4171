"""AMPN: the exact knapsack allocation, the budget, and activation bits chosen inside compile()."""

import dataclasses
import itertools
import math

import pytest
import torch

import ditq_compiler as dq
from ditq_compiler.recipe import RecipeError
from ditq_compiler.train.mixed_precision import allocate

CANDIDATES = (2, 3, 4, 6, 8)


def _brute_force(sensitivity, cost, budget):
    names = list(sensitivity)
    best, best_bits = math.inf, None
    for bits in itertools.product(CANDIDATES, repeat=len(names)):
        if sum(cost[n] * b for n, b in zip(names, bits, strict=False)) <= budget * sum(cost.values()) + 1e-9:
            total = sum(sensitivity[n][b] for n, b in zip(names, bits, strict=False))
            if total < best:
                best, best_bits = total, dict(zip(names, bits, strict=False))
    return best, best_bits


@pytest.mark.parametrize("seed", range(6))
def test_allocation_is_the_exact_optimum_under_the_weighted_budget(seed):
    g = torch.Generator().manual_seed(seed)
    names = [f"l{i}" for i in range(4)]
    cost = {n: float(c) for n, c in zip(names, torch.randint(1, 5, (4,), generator=g).tolist(), strict=False)}
    # sensitivities that fall with bits (halving per bit, random size per layer), as measured ones do
    sensitivity = {n: {b: float(torch.rand((), generator=g)) * 2.0 ** (4 - b) for b in CANDIDATES} for n in names}
    for budget in (2.0, 3.0, 3.5, 4.0):
        bits = allocate(sensitivity, cost, budget)
        assert sum(cost[n] * b for n, b in bits.items()) <= budget * sum(cost.values()) + 1e-9
        best, _ = _brute_force(sensitivity, cost, budget)
        assert sum(sensitivity[n][b] for n, b in bits.items()) == pytest.approx(best)


def test_the_sensitive_layer_gets_the_bits():
    sensitivity = {"robust": {b: 0.01 * 2.0 ** -b for b in CANDIDATES},
                   "fragile": {b: 10.0 * 2.0 ** -b for b in CANDIDATES}}
    bits = allocate(sensitivity, {"robust": 1.0, "fragile": 1.0}, budget=5.0)
    assert bits == {"robust": 2, "fragile": 8}
    # weighted by cost: a layer four times as expensive pays four times as much per bit
    bits = allocate(sensitivity, {"robust": 1.0, "fragile": 4.0}, budget=3.0)
    assert (1 * bits["robust"] + 4 * bits["fragile"]) / 5 <= 3.0 and bits["fragile"] >= 3


def test_a_budget_below_every_candidate_is_an_error():
    with pytest.raises(ValueError, match="budget"):
        allocate({"a": {4: 0.0, 8: 0.0}}, {"a": 1.0}, budget=3.0)


def test_compile_chooses_per_layer_activation_bits_within_the_budget(dit, dit_batches):
    recipe = dq.Recipe.load("robuq-w1.58a3")
    recipe = dataclasses.replace(recipe, distillation=dataclasses.replace(recipe.distillation, iterations=5),
                                 mixed_precision=dataclasses.replace(recipe.mixed_precision, search_iterations=5))
    compiled = dq.compile(dit, recipe, calibration=dit_batches[:2], progress=False)
    allocation = compiled.allocation
    assert allocation.average_bits <= 3.0 + 1e-9 and len(allocation.bits) == 12
    assert set(allocation.bits.values()) <= set(CANDIDATES) and len(set(allocation.bits.values())) > 1
    by_layer = {r.name: r.activations for r in compiled.layers}
    for _node, bits in allocation.bits.items():
        assert f"int{bits} asym per-token" in by_layer.values()
    assert "mixed precision (AMPN, sensitivity distilled): average activation bits" in compiled.summary()
    assert {"mixed precision", "distillation"} <= set(compiled.stage_seconds)


@pytest.mark.parametrize("section, path", [
    ({"mixed_precision": {"budget": 9}}, "recipe.mixed_precision.budget"),
    ({"mixed_precision": {"candidates": [2, 2, 4]}}, "recipe.mixed_precision.candidates"),
    ({"mixed_precision": {"candidates": [1, 4]}}, "recipe.mixed_precision.candidates[0]"),
    ({"mixed_precision": {"sensitivity": "hessian"}}, "recipe.mixed_precision.sensitivity"),
    ({"mixed_precision": {"weighting": "params"}}, "recipe.mixed_precision.weighting"),
    ({"mixed_precision": {}}, "recipe.mixed_precision.sensitivity"),      # 'distilled' needs a distillation
])
def test_bad_mixed_precision_sections_name_the_field(section, path):
    data = {"activations": {"bits": 4, "granularity": "token"}, **section}
    with pytest.raises(RecipeError) as err:
        dq.Recipe.from_dict(data)
    assert str(err.value).startswith(path), str(err.value)


def test_mixed_precision_needs_per_token_activations():
    with pytest.raises(RecipeError, match="recipe.mixed_precision: chooses per-token"):
        dq.Recipe.from_dict({"mixed_precision": {"sensitivity": "ptq"}})
