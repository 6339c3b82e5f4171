"""The allow-list of ops a loaded artifact may call (``artifact/allowed_ops.py``) holds every op the compiler's
own graphs use, and the contracts of the quantized ops refuse what their fake kernels would let through.

Which ops a graph holds depends on the model (what ``torch.export`` captures, how its attention is masked)
and on a few recipe sections (attention decomposition, time groups, rotations, shift and migration);
bits, observers, and what reconstruction, distillation and mixed precision learn (constants, bits) change
no op. So each model is compiled with the presets whose sections put the most ops in its graph, made
fast (minmax observers, MSE search, one round, the learning sections left out), saved and loaded: a
representative subset, where every preset on every model would take minutes of the suite. The U-Net is
compiled with ``hadamard-only`` (its captured ops, cheaply) and ``bidm-w1a1-fpb`` (binary convs; the
timestep connection's ops load in ``tests/passes/test_connect_timesteps.py``); its quantized convs load in
``test_format1_migration.py`` (``unet-w8a8-int8``) and the conv contract is tested below.
``DITQ_ALL_PRESETS=1`` compiles every preset (learning a few iterations) on every model instead, each
that applies to the model (per-token activations on a U-Net's convs, for one, do not).
"""

import dataclasses
import os

import pytest
import torch
from torch import fx

import ditq_compiler as dq
from ditq_compiler import activation_ops, ops, toy  # noqa: F401  (they register the ditq:: ops)
from ditq_compiler.artifact import ArtifactError, allowed_ops, verify
from ditq_compiler.artifact.graph_json import target_name
from ditq_compiler.capture import auto_example_inputs
from ditq_compiler.recipe import RecipeError

MODELS = {
    "dit": (toy.small_dit, lambda: toy.random_dit_batches(count=1, batch_size=4)),
    "unet": (toy.small_unet, lambda: toy.random_unet_batches(count=1, batch_size=4)),
    "pixart": (toy.small_pixart, lambda: [((), auto_example_inputs(toy.small_pixart(), batch_size=4))]),
    "sd3": (toy.small_sd3, lambda: toy.random_sd3_batches(count=1, batch_size=4)),
}
# per model, the presets whose sections add the most ops (the U-Net has no post-GELU site for TQ-DiT's
# two-region quantizers and no per-token convs)
REPRESENTATIVE = {
    "dit": ("tq-dit-w6a6", "robuq-w4a4", "taq-dit-w4a8", "bidm-w1a1-fpb"),
    "unet": ("hadamard-only", "bidm-w1a1-fpb"),
    "pixart": ("tq-dit-w6a6", "ditq-w6a6"),
    "sd3": ("tq-dit-w6a6",),
}
ALL_PRESETS = bool(os.environ.get("DITQ_ALL_PRESETS"))
CASES = ([(model, preset) for model in MODELS for preset in dq.Recipe.presets()] if ALL_PRESETS
         else [(model, preset) for model, presets in REPRESENTATIVE.items() for preset in presets])
LEARNING = ("reconstruction", "distillation", "mixed_precision")   # they change constants and bits, not ops


def fast(preset: str, learn: bool = ALL_PRESETS) -> dq.Recipe:
    """The preset with the same ops and the least work."""
    recipe = dq.Recipe.load(preset)
    changes = {} if learn else {name: None for name in LEARNING}
    for name in ("weights", "activations"):
        spec = getattr(recipe, name)
        if spec is not None and spec.observer == "mse":
            changes[name] = dataclasses.replace(spec, observer="minmax")
    for name, fields in (("reconstruction", {"iterations": 2, "batch_size": 2}),
                         ("distillation", {"iterations": 2, "batch_size": 2}),
                         ("mixed_precision", {"search_iterations": 2}),
                         ("scale_search", {"rounds": 1, "eq_n": 3, "metric": "mse"}),
                         ("time_groups", {"groups": 2})):
        if getattr(recipe, name) is not None and changes.get(name, True) is not None:
            changes[name] = dataclasses.replace(getattr(recipe, name), **fields)
    return dataclasses.replace(recipe, **changes)


@pytest.mark.parametrize("model, preset", CASES, ids=[f"{m}-{p}" for m, p in CASES])
def test_every_op_of_the_compiler_s_graphs_is_allowed_and_the_artifact_loads(model, preset, tmp_path):
    factory, batches = MODELS[model]
    try:
        compiled = dq.compile(factory(), fast(preset), calibration=batches(), progress=False, cache_dir=False)
    except (RecipeError, dq.CalibrationError) as e:       # the preset does not apply to this model
        assert preset not in REPRESENTATIVE[model], e
        pytest.skip(f"{preset} does not apply to {model}: {str(e)[:100]}")
    graph = compiled.reference_graph_module.graph
    used = {target_name(n) for n in graph.nodes if n.op == "call_function"}   # raises on an op off the list
    assert {n.op for n in graph.nodes} <= {"placeholder", "get_attr", "call_function", "output", "call_module"}
    loaded = dq.load(compiled.save(tmp_path / "artifact"))
    inputs = loaded.provenance.example_inputs
    with torch.no_grad():
        assert torch.equal(loaded(**inputs).sample, compiled(**inputs).sample)
    assert used & set(allowed_ops.BUILTIN_CONTRACTS) or preset == "hadamard-only"


def test_every_registered_ditq_op_is_on_the_list_with_a_contract():
    registered = {f"{name}.{overload}" for name in torch._C._dispatch_get_all_op_names() if name.startswith("ditq::")
                  for overload in getattr(torch.ops.ditq, name.split("::")[1]).overloads()}
    assert registered == set(allowed_ops.BUILTIN_CONTRACTS)
    assert all(allowed_ops.is_allowed(name) for name in registered)
    for name in allowed_ops.ATEN_OPS:             # every aten name resolves to an op of this torch
        op_name, overload = name.removeprefix("aten::").rsplit(".", 1)
        assert getattr(getattr(torch.ops.aten, op_name), overload) is not None, name
    assert not allowed_ops.is_allowed("aten::empty.memory_format")


# ---- the contracts of the quantized ops, on hand-made graphs ----------------------------------------
def one_op(op, x: torch.Tensor, *args) -> tuple[fx.GraphModule, list]:
    """A graph calling ``op`` on an input ``x`` and stored tensors (tensor args become get_attr nodes)."""
    root, graph = torch.nn.Module(), fx.Graph()
    values = [graph.placeholder("x")]
    for i, arg in enumerate(args):
        if isinstance(arg, torch.Tensor):
            root.register_buffer(f"t{i}", arg)
            values.append(graph.get_attr(f"t{i}"))
        else:
            values.append(arg)
    graph.output(graph.call_function(op, tuple(values)))
    return fx.GraphModule(root, graph), [x]


def refused(op, x, *args, match: str) -> None:
    gm, inputs = one_op(op, x, *args)
    with pytest.raises(ArtifactError, match=match):
        verify.check_graph(gm, inputs)


def test_the_contracts_accept_well_formed_calls():
    x = torch.randn(2, 3, 8)
    h = torch.tensor([[1.0, 1.0], [1.0, -1.0]]) / 2 ** 0.5
    for op, args in [(torch.ops.ditq.hadamard.default, (h, torch.eye(4))),
                     (torch.ops.ditq.quant_act.default, (None, torch.tensor([0.1]), torch.tensor([0]), 8)),
                     (torch.ops.ditq.quant_softmax_mrq.default, (None, torch.tensor([0.01]), 8)),
                     (torch.ops.ditq.quant_gelu_mrq.default, (None, torch.tensor([0.01]), torch.tensor([0.1]), 8))]:
        verify.check_graph(*one_op(op, x, *args))
    codes = torch.randint(-8, 8, (4, 2, 3, 3), dtype=torch.int8)
    verify.check_graph(*one_op(torch.ops.ditq.quant_conv2d.default, torch.randn(1, 2, 5, 5), codes, torch.ones(4),
                               torch.zeros(4, dtype=torch.int32), None, None, None, 0, False, [1, 1], [1, 1], [1, 1],
                               1))


def test_the_contracts_name_what_a_quantized_op_cannot_take():
    x = torch.randn(2, 3, 8)
    hadamard, act = torch.ops.ditq.hadamard.default, torch.ops.ditq.quant_act.default
    refused(hadamard, x, torch.eye(3), None, match=r"rotation factors of sizes \[3\] do not fit x's last dim 8")
    refused(hadamard, x, torch.ones(2, 3), None, match=r"left \(tensor 't0'\) must be a square matrix")
    refused(hadamard, x, torch.eye(2) * float("nan"), None, match=r"left \(tensor 't0'\) holds NaN or Inf")
    refused(act, x, None, torch.tensor([0.1, 0.2]), torch.tensor([0, 0]), 8,
            match=r"scale \(tensor 't1'\) has 2 time groups but the node has no group input")
    refused(act, x, None, torch.tensor([0.1]), torch.tensor([0, 0]), 8,
            match=r"zero_point \(tensor 't2'\) has 2 rows, scale \(tensor 't1'\) has 1")
    refused(act, x, None, torch.tensor([0.0]), torch.tensor([0]), 8,
            match=r"scale \(tensor 't1'\) holds 1 value\(s\) that are not finite and positive")
    refused(act, x, None, torch.tensor([0.1]), torch.tensor([0]), 99, match=r"bits is 99, outside 1..16")
    refused(torch.ops.ditq.quant_softmax_mrq.default, x, None, torch.tensor([-0.5]), 8,
            match=r"s1 \(tensor 't1'\) holds 1 value\(s\) that are not finite and positive \(e.g. -0.5\)")
    refused(torch.ops.ditq.quant_gelu_mrq.default, x, None, torch.tensor([0.1]), torch.tensor([0.1, 0.2]), 8,
            match=r"s_pos \(tensor 't2'\) has 2 rows")
    codes = torch.randint(-8, 8, (4, 2, 3, 3), dtype=torch.int8)
    conv = (torch.ones(4), torch.zeros(4, dtype=torch.int32), None, None, None, 0, False, [1, 1], [1, 1], [1, 1])
    refused(torch.ops.ditq.quant_conv2d.default, torch.randn(1, 3, 5, 5), codes, *conv, 1,
            match=r"w_codes \(tensor 't0'\) has shape \(4, 2, 3, 3\) with groups=1: it takes 2 input channels, x has "
                  r"shape \(1, 3, 5, 5\)")
    refused(torch.ops.ditq.quant_conv2d.default, torch.randn(1, 2, 5, 5), codes, *conv[:7], [0, 1], [1, 1], [1, 1],
            1, match=r"stride must be two integers >= 1, got \[0, 1\]")
