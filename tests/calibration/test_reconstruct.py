"""Block reconstruction: the learnable layer, the cut-out blocks, and the loss it drives down."""

import dataclasses

import pytest
import torch

import ditq_compiler as dq
from ditq_compiler import zoo
from ditq_compiler.calibration import from_sampler
from ditq_compiler.calibration.recon_layer import ReconLayer
from ditq_compiler.calibration.reconstruct import (
    _cut_unit,
    _record,
    _set_modes,
    _Sweep,
    _sweeps,
    reconstruct,
)
from ditq_compiler.graph import unit_of
from ditq_compiler.trainable import swap_in_trainable_layers
from ditq_compiler.quant import QuantSpec, qparams_from_range, quantize

W4 = QuantSpec(4, False, "channel", observer="minmax")
A8 = QuantSpec(8, False, "tensor", axis=-1, observer="minmax")


def _layer(factors=None, shift=None):
    torch.manual_seed(0)
    weight, bias = torch.randn(6, 5), torch.randn(6)
    act = qparams_from_range(torch.tensor(-3.0), torch.tensor(3.0), A8)
    return ReconLayer(weight, bias, W4, A8, act, shift=shift, factors=factors), weight, bias


def test_rounding_starts_at_the_float_weight_and_hardens_to_valid_codes():
    layer, weight, _ = _layer()
    layer.weight_mode = "soft"
    # h(V) = W/s - floor(W/s) at the start (up to the 1e-4 clamp of the fraction), inside the grid
    s, z = layer.w_scale[:, None], layer.w_zero_point[:, None].float()
    inside = (weight >= (W4.qmin - z) * s) & (weight <= (W4.qmax - z) * s)
    assert inside.float().mean() >= 0.75  # the row maximum may sit just past the rounded zero point
    soft = layer.quantized_weight().detach()
    assert torch.allclose(soft[inside], weight[inside], atol=2e-4 * float(layer.w_scale.max()))
    codes, scale, zero_point = layer.weight_codes()
    assert codes.dtype == torch.int8 and int(codes.min()) >= -8 and int(codes.max()) <= 7
    layer.weight_mode = "hard"
    hard = layer.quantized_weight().detach()
    assert torch.equal(quantize(hard, scale, zero_point, W4), codes)
    nearest = quantize(weight, scale, zero_point, W4)
    assert int((codes.int() - nearest.int()).abs().max()) <= 1        # rounding moves at most one step


def test_hard_layer_matches_the_quant_linear_reference_op():
    layer, _, bias = _layer()
    layer.weight_mode, layer.act_quant = "hard", True
    with torch.no_grad():
        layer.rounding.copy_(torch.randn_like(layer.rounding))        # some learned rounding
    codes, scale, zero_point = layer.weight_codes()
    a_scale, a_zero_point = layer.activation_qparams()
    x = torch.randn(3, 4, 5) * 2
    expected = torch.ops.ditq.quant_linear(x, codes, scale, zero_point, bias, a_scale, a_zero_point, 8, False)
    torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=1e-5)


def test_migrated_layer_in_float_equals_affine_then_linear():
    factors, shift = torch.tensor([1.0, 3.0, 1.0, 1.0, 2.0]), torch.linspace(-1, 1, 5)
    layer, migrated_weight, bias = _layer(factors=factors, shift=shift)
    x = torch.randn(7, 5)
    expected = torch.nn.functional.linear((x - shift) / factors, migrated_weight, bias)
    torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=1e-5)
    assert torch.allclose(layer.base_weight * factors, migrated_weight)
    # only the migrated channels learn; the normal ones get no gradient and stay at 1
    layer(x).square().sum().backward()
    grad = layer.log_factors.grad
    assert bool((grad[[0, 2, 3]] == 0).all()) and bool((grad[[1, 4]] != 0).all())


def test_round_loss_is_zero_only_for_decided_rounding():
    layer, _, _ = _layer()
    assert layer.round_loss(2.0) > 0
    with torch.no_grad():
        layer.rounding.copy_(torch.where(layer.rounding >= 0, 10.0, -10.0))
    assert layer.round_loss(2.0) == 0


def test_unit_names_are_blocks_or_single_layers():
    assert unit_of("transformer_blocks.3.attn1.to_q") == "transformer_blocks.3"
    assert unit_of("down_blocks.0.resnets.1.conv1") == "down_blocks.0"
    assert unit_of("transformer_blocks.3#2") == "transformer_blocks.3"
    assert unit_of("proj_out_1") == "proj_out_1"


@pytest.fixture(scope="module")
def reference():
    model, scheduler = zoo.load("dit-digits"), zoo.scheduler("dit-digits")
    calibration = from_sampler(model, scheduler, num_inference_steps=20, guidance_scale=2.0, num_trajectories=16,
                               steps=10, samples_per_step=8, batch_size=16, progress=False)
    return model, calibration


def test_cut_out_block_reproduces_the_whole_graph(reference):
    from ditq_compiler.annotate import annotate
    from ditq_compiler.capture import capture
    from ditq_compiler.calibration.data import flat_inputs
    from ditq_compiler.graph import analyse

    model, calibration = reference
    batches = list(calibration)
    captured = capture(model, batches[0])
    gm = captured.graph_module
    annotations = annotate(gm, analyse(gm, captured.sample_input, captured.timestep_input), dq.Recipe.load("w4a8"))
    flat = [flat_inputs(captured.bind(a, k)) for a, k in batches]
    from ditq_compiler.calibration import observe_activations

    act = observe_activations(gm, annotations, flat, progress=False).activations
    layers = swap_in_trainable_layers(gm, annotations, act, ReconLayer.from_source, take_affine=True)
    _set_modes(layers, set(), "hard", False)
    block = [n for n, a in annotations.items() if a.name.startswith("transformer_blocks.2.")]
    unit = _cut_unit(gm, "transformer_blocks.2", block)
    assert len(unit.layers) == 6 and {n.op for n in unit.module.graph.nodes} >= {"placeholder", "call_module"}
    inputs, outputs = _record(_sweeps(gm, flat), unit.inputs), _record(_sweeps(gm, flat), unit.outputs)
    with torch.no_grad():
        got = unit.module(*[inputs[n.name] for n in unit.inputs])
    for node, value in zip(unit.outputs, got, strict=True):
        torch.testing.assert_close(value, outputs[node.name], atol=1e-5, rtol=1e-5)


@pytest.mark.slow
def test_joint_reconstruction_lowers_block_loss_and_beats_minmax(reference):
    model, calibration = reference
    recipe = dq.Recipe.load("taq-dit-w4a8")
    recipe = dataclasses.replace(recipe, reconstruction=dataclasses.replace(recipe.reconstruction, iterations=120))
    compiled = dq.compile(model, recipe, calibration=calibration, progress=False)
    baseline = dq.compile(model, "w4a8-minmax", calibration=calibration, progress=False)
    assert compiled.output_sqnr_db > baseline.output_sqnr_db + 2
    assert set(compiled.stage_seconds) == {"capture", "calibration", "reconstruction", "rewrite", "measure", "inspect"}
    assert "stages: capture" in compiled.summary() and "shift+migrate" in compiled.summary()


def test_reconstruction_loss_falls_in_every_block(reference):
    from ditq_compiler.annotate import annotate
    from ditq_compiler.calibration import observe_activations
    from ditq_compiler.capture import capture
    from ditq_compiler.calibration.data import flat_inputs
    from ditq_compiler.graph import analyse

    model, calibration = reference
    batches = list(calibration)
    captured = capture(model, batches[0])
    gm = captured.graph_module
    recipe = dq.Recipe.load("taq-dit-w4a8-separate")
    annotations = annotate(gm, analyse(gm, captured.sample_input, captured.timestep_input), recipe)
    flat = [flat_inputs(captured.bind(a, k)) for a, k in batches]
    act = observe_activations(gm, annotations, flat, progress=False).activations
    spec = dataclasses.replace(recipe.reconstruction, iterations=40)
    result = reconstruct(gm, annotations, act, flat, spec, progress=False)
    losses = {unit: (t["loss_before"], t["loss_after"]) for unit, t in result.trace.items()}
    assert len(losses) == 12  # 6 blocks x (weights, activations); (nearest rounding, learned) loss
    weights = {k: v for k, v in losses.items() if k.startswith("weights:")}
    assert all(after < before for before, after in weights.values()), weights
    # LSQ at lr 4e-5 barely moves the scales in 40 steps; it must not make things worse
    assert all(after < 1.02 * before for before, after in losses.values()), losses
    assert len(result.weights) == 36 and len(result.activations) == 36 and not result.factors


def _compile_small(model_name, recipe_name, iterations):
    """A compile of a zoo or toy model with few reconstruction iterations: its graph's tensors."""
    from ditq_compiler import toy

    if model_name == "dit-digits":
        model, scheduler = zoo.load("dit-digits"), zoo.scheduler("dit-digits")
        batches = from_sampler(model, scheduler, num_inference_steps=20, guidance_scale=2.0, num_trajectories=4,
                               steps=4, samples_per_step=4, batch_size=8, progress=False)
    else:
        model, batches = toy.small_unet(), toy.random_unet_batches(count=2)
    recipe = dq.Recipe.load(recipe_name)
    recipe = dataclasses.replace(recipe, reconstruction=dataclasses.replace(recipe.reconstruction,
                                                                            iterations=iterations, batch_size=4))
    compiled = dq.compile(model, recipe, calibration=batches, progress=False, cache_dir=False)
    return compiled.graph_module.state_dict()


@pytest.mark.parametrize("model_name, recipe_name", [("dit-digits", "taq-dit-w4a8"),
                                                     ("dit-digits", "taq-dit-w4a8-separate"),
                                                     ("small-unet", "taq-dit-w4a8")])
def test_carried_recording_equals_recording_from_the_model_input(monkeypatch, model_name, recipe_name):
    """Unit k+1's inputs carried on from unit k give bitwise the compile of re-running the graph from
    the model input for every unit (the O(depth^2) recording): with shift + learned migration factors
    (joint), the two-phase baseline, and a U-Net's skip connections. The carried sweeps never start
    over and run each node a bounded number of times, not once per later unit."""
    runs, starts, sweeps = [], [0], []
    restart, init, run, advance = _Sweep.restart, _Sweep.__init__, _Sweep._run, _Sweep.advance

    def counting_restart(self):
        starts[0] += 1
        return restart(self)

    def counting_run(self, nodes, wanted):
        runs.append(len(nodes))
        return run(self, nodes, wanted)

    def counting_init(self, gm, flat, asks):
        sweeps.append(len(gm.graph.nodes))
        init(self, gm, flat, asks)

    carried_bytes = []

    def measuring_advance(self, nodes):
        values = advance(self, nodes)
        if self.asks:   # the carried sweeps, not the target forks
            carried_bytes.append(sum(v.numel() * v.element_size() for v in self.env.values()
                                     if isinstance(v, torch.Tensor)))
        return values

    monkeypatch.setattr(_Sweep, "restart", counting_restart)
    monkeypatch.setattr(_Sweep, "_run", counting_run)
    monkeypatch.setattr(_Sweep, "__init__", counting_init)
    monkeypatch.setattr(_Sweep, "advance", measuring_advance)
    carried = _compile_small(model_name, recipe_name, iterations=6)
    assert starts[0] == len(sweeps), "a carried sweep had to start over"
    # each float and quantized sweep (one per batch and phase) runs the graph at most once, and the
    # target forks add at most one more in all (a fork runs one unit); from scratch it is ~depth/2
    assert sum(runs) <= 1.5 * sum(sweeps), (sum(runs), sum(sweeps))
    if model_name == "dit-digits":   # what is carried is one block's boundary, not one per block so far
        assert max(carried_bytes) <= 1.05 * carried_bytes[len(carried_bytes) // 4], carried_bytes

    def from_scratch(self, wanted):
        self.restart()
        return advance(self, wanted)

    monkeypatch.setattr(_Sweep, "advance", from_scratch)
    starts[0], sweeps[:] = 0, []
    scratch = _compile_small(model_name, recipe_name, iterations=6)
    assert starts[0] > 2 * len(sweeps)   # the reference really recorded every unit from the model input
    assert carried.keys() == scratch.keys()
    if (model_name, recipe_name) == ("dit-digits", "taq-dit-w4a8"):   # learned migration factors in play
        assert any(name.endswith("_migrated_weight") for name in carried)
    for name in carried:
        assert torch.equal(carried[name], scratch[name]), name
