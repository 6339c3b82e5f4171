"""The error budget: bypassing activation quantizers, their classes, and which class it blames."""

import dataclasses

import pytest
import torch

import ditq_compiler as dq
from ditq_compiler.inspection.error_budget import bypass, error_budget, quantizer_classes

ops = torch.ops.ditq


def _recipe(base: str, **changes) -> dq.Recipe:
    return dq.Recipe.from_dict({**dq.Recipe.load(base).to_dict(), **changes})


def _sample(compiled_or_graph, compiled, batch):
    args, kwargs = batch
    call = compiled.captured.bind(args, kwargs)
    return compiled_or_graph(**call)[0]


def test_bypassing_every_activation_quantizer_leaves_exactly_the_weight_only_model(dit, dit_batches):
    full = dq.compile(dit, _recipe("w8a8-minmax"), calibration=dit_batches, progress=False)
    weight_only = dq.compile(dit, _recipe("w8a8-minmax", activations=False), calibration=dit_batches, progress=False)
    classes = quantizer_classes(full.graph_module)
    assert {"input of qkv", "input of attn_out", "input of fc1", "input of fc2"} <= set(classes)
    assert quantizer_classes(weight_only.graph_module) == {}
    bypassed = bypass(full.graph_module, [n for members in classes.values() for n in members])
    for batch in dit_batches[:2]:
        torch.testing.assert_close(_sample(bypassed, full, batch), _sample(weight_only.graph_module, full, batch),
                                   rtol=0, atol=0)
    # the compiled model itself is untouched: its graph still quantizes the activations
    assert all(n.args[7] == 8 for n in full.graph_module.graph.nodes if n.target is ops.quant_linear.default)


def test_the_budget_blames_the_class_quantized_coarsest(dit, dit_batches):
    recipe = _recipe("w8a8-minmax", overrides=[{"role": "fc1", "activations": {"bits": 3}}])
    compiled = dq.compile(dit, recipe, calibration=dit_batches, progress=False)
    budget = error_budget(compiled, dit, dit_batches, progress=False)
    assert budget.rows[0].quantizers == "input of fc1" and budget.rows[0].count == 2
    assert budget.rows[0].share > 0.5 > budget.rows[1].share
    assert abs(budget.rows[0].only_db - budget.all_db) < 1.5      # fc1's inputs alone nearly the whole error
    assert budget.weights_db > budget.rows[0].without_db > budget.all_db
    assert budget.rows[0].without_db - budget.all_db > 3      # removing them gains a lot, unlike any other class
    assert all(r.without_db - budget.all_db < 1.5 for r in budget.rows[1:])
    assert "| input of fc1 | 2 |" in budget.markdown()


def test_standalone_tq_dit_quantizers_are_classed_by_operand(dit, dit_batches):
    recipe = _recipe("tq-dit-w8a8", time_groups={"groups": 1, "sites": ["post_softmax"]})
    recipe = dataclasses.replace(recipe, time_groups=None,
                                 scale_search=dataclasses.replace(recipe.scale_search, metric="mse", eq_n=4, rounds=1))
    compiled = dq.compile(dit, recipe, calibration=dit_batches, progress=False)
    classes = quantizer_classes(compiled.graph_module)
    assert {"attention q", "attention k^T", "attention P", "attention v", "input of fc2"} <= set(classes)
    assert len(classes["attention P"]) == 2            # one post-softmax quantizer per block
    budget = error_budget(compiled, dit, dit_batches[:2], progress=False)
    assert {r.quantizers for r in budget.rows} == set(classes)
    assert all(r.only_db >= budget.all_db - 0.5 for r in budget.rows)


def test_a_model_without_activation_quantizers_is_refused(dit, dit_batches):
    weight_only = dq.compile(dit, _recipe("w8a8-minmax", activations=False), calibration=dit_batches, progress=False)
    with pytest.raises(ValueError, match="quantizes no activations"):
        error_budget(weight_only, dit, dit_batches)
    with pytest.raises(ValueError, match="needs calibration batches"):
        error_budget(weight_only, dit, [])
