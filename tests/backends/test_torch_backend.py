"""The torch int8 backend agrees with the fake-quant reference within one quantization step."""

import copy

import pytest
import torch

import ditq_compiler as dq
from ditq_compiler.backends.torch import Int8Linear, cpu_has_vnni, lower_int8, pair_sum_bound
from ditq_compiler.pipeline import fetch_attr

W7A8 = {"name": "w7a8", "weights": {"bits": 7, "observer": "mse"}, "activations": {"bits": 8, "observer": "mse"}}


@pytest.fixture(scope="module")
def w7a8_pair(dit, dit_batches):
    recipe = dq.Recipe.from_dict(W7A8)
    reference = dq.compile(dit, recipe, calibration=dit_batches[:4], progress=False)
    int8 = dq.compile(dit, recipe, calibration=dit_batches[:4], progress=False, backend="torch-int8")
    return reference, int8


def int8_modules(compiled):
    return [(name, m) for name, m in compiled.graph_module.named_children() if isinstance(m, Int8Linear)]


def test_w7a8_layers_run_on_int8_kernels(w7a8_pair):
    _, int8 = w7a8_pair
    assert len(int8_modules(int8)) == 12  # W7A8 fits FBGEMM's int16 pair sums on any x86 CPU
    assert all(layer.kernel.startswith("int8") for layer in int8.layers)


def _layer_pairs(reference, int8):
    """(Int8Linear module, reference args of ditq::quant_linear) for every lowered layer."""
    ref_nodes = {n.name: n for n in reference.graph_module.graph.nodes}
    pairs = []
    for name, module in int8_modules(int8):
        node = ref_nodes[name.removeprefix("ditq_int8_")]
        pairs.append((name, module, [fetch_attr(reference.graph_module, a.target) if isinstance(a, torch.fx.Node)
                                     else a for a in node.args[1:]]))
    assert len(pairs) == 12, "every W7A8 layer must be lowered for the parity check to mean anything"
    return pairs


def test_int8_layers_exact_on_tie_free_inputs(w7a8_pair):
    gen = torch.Generator().manual_seed(0)
    for name, module, args in _layer_pairs(*w7a8_pair):
        codes = torch.randint(module.qmin, module.qmax + 1, (48, module.in_features), generator=gen)
        jitter = torch.rand(codes.shape, generator=gen) * 0.8 - 0.4  # never on a rounding tie
        x = (codes - module.a_zero_point + jitter) * module.a_scale
        product_step = module.a_scale * float(module.w_scale.max())
        with torch.no_grad():
            diff = float((module(x) - torch.ops.ditq.quant_linear(x, *args)).abs().max())
        assert diff <= 0.5 * product_step, f"{name}: {diff} > half a product step {product_step}"


def test_int8_layers_within_one_activation_step_of_the_reference(w7a8_pair):
    """On real-valued inputs the kernel may round an exact tie the other way: one step, no more."""
    gen = torch.Generator().manual_seed(1)
    for name, module, args in _layer_pairs(*w7a8_pair):
        x = torch.randn(3, 16, module.in_features, generator=gen) * module.a_scale * 40
        ratio = x / module.a_scale
        ties = ((ratio - ratio.floor() - 0.5).abs() < 1e-5).float()  # fp32 ties, up to reciprocal rounding
        w_hat = module.w_codes_t.t().float() * module.w_scale[:, None]
        allowed = module.a_scale * (ties @ w_hat.abs().t()) + 0.5 * module.a_scale * float(module.w_scale.max())
        diff = (module(x) - torch.ops.ditq.quant_linear(x, *args)).abs()
        assert bool((diff <= allowed).all()), f"{name}: {float((diff - allowed).max())} beyond one step at ties"


def test_int8_model_output_matches_reference(w7a8_pair, dit_batches):
    reference, int8 = w7a8_pair
    kwargs = dit_batches[5][1]
    assert dq.quant.sqnr_db(reference(**kwargs).sample, int8(**kwargs).sample) >= 60


def test_w8a8_without_vnni_keeps_the_reference_by_the_pair_sum_bound(compiled_dit_w8a8):
    _, kernels = lower_int8(copy.deepcopy(compiled_dit_w8a8.graph_module), vnni=False)
    assert len(kernels) == 12
    assert all(k.startswith("reference (no VNNI: int16 pair sums reach") for k in kernels.values())


def test_probe_catches_a_saturating_kernel(compiled_dit_w8a8):
    """Claiming VNNI on this CPU skips the bound; FBGEMM then saturates and the probe must notice."""
    if cpu_has_vnni():
        pytest.skip("this CPU has AVX512-VNNI: FBGEMM does not saturate here")
    gm, kernels = lower_int8(copy.deepcopy(compiled_dit_w8a8.graph_module), vnni=True)
    assert all("steps on this CPU" in k for k in kernels.values()), kernels
    assert not any(isinstance(m, Int8Linear) for m in gm.children())


def test_pair_sum_bound():
    codes = torch.tensor([[127, -128, 3], [63, -64, 0]], dtype=torch.int8)
    assert pair_sum_bound(codes, 127) == (128 + 127) * 255
    assert pair_sum_bound(codes[1:], 127) == (64 + 63) * 255 <= 32767


def test_weight_only_layers_are_not_lowered(dit, dit_batches):
    compiled = dq.compile(dit, dq.Recipe.from_dict({"name": "w8", "activations": False}), progress=False,
                          backend="torch-int8")
    assert all(layer.kernel == "reference (activations not static per-tensor)" for layer in compiled.layers)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device for torch._int_mm")
def test_int_mm_path_on_cuda_matches_exact_integer_result():
    gen = torch.Generator().manual_seed(0)
    codes = torch.randint(-127, 128, (64, 128), generator=gen, dtype=torch.int8)
    module = Int8Linear(codes, torch.full((64,), 0.01), None, torch.tensor(0.05), torch.tensor(3), 8).cuda()
    x = torch.randn(32, 128, generator=gen).cuda()
    q = (torch.round(module._clamp(x) / 0.05) + 3)
    exact = ((q - 3).double() @ codes.double().t().cuda()) * 0.05 * 0.01
    assert float((module(x).double() - exact).abs().max()) <= 0.5 * 0.05 * 0.01
