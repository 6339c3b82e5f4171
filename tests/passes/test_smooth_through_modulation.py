"""Smoothing through the modulation: where it applies, that it is exact, where it must not fire, and ONNX."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import fx

import ditq_compiler as dq
from ditq_compiler import meta, zoo
from ditq_compiler.annotate import annotate
from ditq_compiler.calibration.data import flat_inputs
from ditq_compiler.capture import auto_example_inputs, capture
from ditq_compiler.graph import analyse
from ditq_compiler.passes.smooth_through_modulation import SmoothThroughModulation, find_sites
from ditq_compiler.pipeline import PreconditionError, copy_graph, fetch_attr
from ditq_compiler.toy import random_dit_batches, random_sd3_batches, small_pixart, small_sd3, small_unet

ROLES = ("qkv", "fc1", "linear")


ALL_ROLES = dq.Recipe.from_dict({"name": "all", "quantize_roles": list(dq.recipe.ROLES)})


def _prepared(model, call, roles=ROLES):
    captured = capture(model, call)
    gm = captured.graph_module
    annotations = annotate(gm, analyse(gm, captured.sample_input, captured.timestep_input), ALL_ROLES)
    layers = {n: a.name for n, a in annotations.items() if a.role in roles}
    return gm, layers, flat_inputs(captured.bind(*call))


@pytest.fixture(scope="module")
def models():
    """(graph, quantized layers, one call) of dit-digits, a PixArt-style and an SD3-style transformer."""
    pixart, digits = small_pixart(), zoo.load("dit-digits")
    return {"dit-digits": _prepared(digits, ((), auto_example_inputs(digits, 3))),
            "pixart": _prepared(pixart, ((), auto_example_inputs(pixart, 2))),
            "sd3": _prepared(small_sd3(), random_sd3_batches(count=1)[0])}


def _output(gm, flat):
    with torch.no_grad():
        return torch.utils._pytree.tree_leaves(fx.Interpreter(gm).run(*flat))[0]


def _random_factors(sites, generator):
    return {s.consumers[0].name: torch.exp(torch.randn(s.channels, generator=generator)) for s in sites}


def test_sites_on_a_dit_block_are_qkv_and_fc1_folded_into_its_modulation(models):
    gm, layers, _ = models["dit-digits"]
    found = find_sites(gm, layers)
    assert len(found.sites) == 12 and not found.skipped            # 6 blocks x (q/k/v together, fc1)
    qkv = [s for s in found.sites if len(s.consumers) == 3]
    assert len(qkv) == 6 and all(s.placement == f"folded into {s.layers[0].split('.attn1')[0]}.norm1.linear"
                                 for s in qkv)
    assert all(s.multiplier.one_plus and s.shift is not None for s in found.sites)


def test_pixart_s_shared_modulation_is_divided_online_and_its_cross_attention_is_not_a_site(models):
    gm, layers, _ = models["pixart"]
    found = find_sites(gm, layers)
    assert {s.placement for s in found.sites} == {"online on the modulation (B x C per call)"}
    skipped = {k.layer: k.reason for k in found.skipped}
    assert "not of a norm" in skipped["transformer_blocks.0.attn2.to_k"]       # reads the caption projection
    assert "which the division would change" in skipped["transformer_blocks.0.attn2.to_q"]


@pytest.mark.parametrize("name", ["dit-digits", "pixart", "sd3"])
def test_smoothing_is_exact_and_rewrites_every_site(models, name):
    gm, layers, flat = models[name]
    gm = copy_graph(gm)
    found = find_sites(gm, layers)
    assert found.sites, f"{name}: no smoothing site"
    before = _output(gm, flat)
    result = SmoothThroughModulation(found.sites, _random_factors(found.sites, torch.Generator().manual_seed(0)))(gm)
    assert result.modified
    smoothed = [n for n in gm.graph.nodes if any(e["pass"] == "smooth_through_modulation" for e in meta.get(n).applied)]
    assert len(smoothed) == sum(len(s.consumers) for s in found.sites)
    after = _output(result.graph_module, flat)
    assert float((after - before).abs().max() / before.abs().max()) < 1e-5


@settings(max_examples=6, deadline=None, database=None)
@given(seed=st.integers(0, 2**31 - 1), spread=st.floats(0.25, 1.5))
def test_smoothing_is_exact_for_random_modulation_weights(models, seed, spread):
    """The fold holds for any modulation linear, timestep and class: random adaLN weights, random s (log-normal,
    up to about 100x either way, wider than a search picks)."""
    gm, layers, flat = models["dit-digits"]
    gm = copy_graph(gm)
    generator = torch.Generator().manual_seed(seed)
    for node in gm.graph.nodes:
        if node.op == "get_attr" and "norm1_linear" in node.target:
            value = fetch_attr(gm, node.target)
            owner, _, attr = node.target.rpartition(".")
            setattr(gm.get_submodule(owner) if owner else gm, attr,
                    torch.nn.Parameter(torch.randn(value.shape, generator=generator) * value.std(), False))
    found = find_sites(gm, layers)
    factors = {k: v ** spread for k, v in _random_factors(found.sites, generator).items()}
    before = _output(gm, flat)
    after = _output(SmoothThroughModulation(found.sites, factors)(gm).graph_module, flat)
    assert float((after - before).abs().max() / before.abs().max()) < 1e-5


class ReluMLP(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc1, self.fc2 = torch.nn.Linear(8, 16), torch.nn.Linear(16, 8)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


def test_no_norm_in_front_no_site_and_the_reason_is_given():
    gm, layers, _ = _prepared(ReluMLP(), ((torch.randn(2, 8),), {}), roles=dq.recipe.ROLES)
    assert len(layers) == 2
    found = find_sites(gm, layers)
    assert not found.sites and found.skipped
    assert all("not of a norm" in k.reason for k in found.skipped)
    assert SmoothThroughModulation([], {})(gm).modified is False


def test_a_unet_s_attention_smooths_into_its_group_norm_and_its_resnet_convs_do_not(models):
    model = small_unet()
    call = ((), {"sample": torch.randn(2, 1, 8, 8), "timestep": torch.tensor([3, 700]),
                 "class_labels": torch.tensor([1, 10])})
    captured = capture(model, call)
    gm = captured.graph_module
    annotations = annotate(gm, analyse(gm, captured.sample_input, captured.timestep_input), dq.Recipe.load("w8a8"))
    found = find_sites(gm, {n: a.name for n, a in annotations.items()})
    assert found.sites and {s.kind for s in found.sites} == {"norm affine"}
    conv1 = next(k for k in found.skipped if k.layer.endswith("resnets.0.conv1"))
    assert "silu" in conv1.reason
    flat = flat_inputs(captured.bind(*call))
    before = _output(gm, flat)
    after = _output(SmoothThroughModulation(found.sites, _random_factors(found.sites, torch.Generator()))(gm)
                    .graph_module, flat)
    assert float((after - before).abs().max() / before.abs().max()) < 1e-5


def test_wrong_factors_are_refused_naming_the_site(models):
    gm, layers, _ = models["dit-digits"]
    gm = copy_graph(gm)
    found = find_sites(gm, layers)
    bad = {found.sites[0].consumers[0].name: -torch.ones(found.sites[0].channels)}
    with pytest.raises(PreconditionError, match=r"s for 'transformer_blocks\.0\.attn1\.to_q \(\+2\)' must be"):
        SmoothThroughModulation(found.sites, bad)(gm)


def test_ditq_w8a8_exports_to_onnx_with_every_linear_on_an_integer_kernel(tmp_path):
    from ditq_compiler.backends.ort import OrtModel, profile
    from ditq_compiler.toy import small_dit
    batches = random_dit_batches(count=2)
    recipe = dq.Recipe.load("ditq-w8a8").to_dict()       # min-max ranges: the MSE search is not under test here
    recipe = dq.Recipe.from_dict({**recipe, "activations": {**recipe["activations"], "observer": "minmax"}})
    compiled = dq.compile(small_dit(), recipe, calibration=batches, progress=False, cache_dir=False)
    assert "smoothing: 4 input(s) smoothed" in compiled.summary()
    assert all("smooth" in r.transforms for r in compiled.layers if r.role in ("qkv", "fc1"))
    path = compiled.export_onnx(tmp_path / "dit.onnx")
    args, kwargs = batches[0]
    with torch.no_grad():
        reference = compiled(*args, **kwargs).sample
    out = torch.as_tensor(OrtModel(path)(*args, **kwargs).sample)
    assert float(10 * torch.log10(reference.square().sum() / (reference - out).square().sum())) >= 35
    report = profile(path, args, kwargs, threads=1)
    assert set(report.integer_layers()) == {r.name for r in compiled.layers}, report.table()
