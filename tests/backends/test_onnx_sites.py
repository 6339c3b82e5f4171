"""ONNX lowering of TQ-DiT's activation-site quantizers and RobuQ's rotation, one op at a time, run by ONNX Runtime.

Each case wraps one op in a module whose tables are buffers and whose time group is computed from a
``timestep`` input as ``passes/attach_time_groups.py`` does, exports it, and compares ONNX Runtime with the
op itself. The quantizers' lowerings repeat the reference's float32 steps, so their outputs must be
equal bit for bit, on inputs that put values on rounding ties, on region boundaries and beyond the grid.
"""

from __future__ import annotations

import onnx
import pytest
import torch

import ditq_compiler.activation_ops  # noqa: F401  (registers ditq::quant_act, ...)
import ditq_compiler.ops  # noqa: F401
from ditq_compiler.backends.onnx import OnnxExportError, check_tensorrt_qdq, export_graph, lower_graph, make_target
from ditq_compiler.backends.ort import OrtModel, profile
from ditq_compiler.capture import capture
from ditq_compiler.quant import QuantSpec, quantize, sqnr_db, weight_qparams
from ditq_compiler.quant.hadamard import hadamard_factors

BOUNDARIES = torch.tensor([250.0, 500.0, 750.0])        # 4 time groups
TIMESTEPS = torch.tensor([10.0, 980.0, 600.0])            # groups 0, 3, 2
K, N = 64, 48


class Site(torch.nn.Module):
    """``op(x, group, *tables, bits)``, the group from the timestep (or None for one-row tables); optionally a
    ``ditq::quant_linear`` with ``a_bits = 0`` reading the quantized value, as TQ-DiT's linear-input sites do."""

    def __init__(self, op, tables: list[torch.Tensor], bits: int, linear: list | None = None):
        super().__init__()
        self.op, self.bits, self.grouped = op, bits, tables[0].numel() > 1
        self.register_buffer("boundaries", BOUNDARIES.clone())
        self.names = [f"table{i}" for i in range(len(tables))]
        for name, table in zip(self.names, tables, strict=True):
            self.register_buffer(name, table)
        self.linear = linear
        for i, value in enumerate(linear or []):
            if isinstance(value, torch.Tensor):
                self.register_buffer(f"w{i}", value)

    def forward(self, x, timestep):
        group = (timestep.unsqueeze(-1) > self.boundaries).sum(-1) if self.grouped else None
        y = self.op(x, group, *[getattr(self, n) for n in self.names], self.bits)
        if self.linear is None:
            return y
        args = [getattr(self, f"w{i}") if isinstance(v, torch.Tensor) else v for i, v in enumerate(self.linear)]
        return torch.ops.ditq.quant_linear.default(y, *args)


def _export(module: torch.nn.Module, x: torch.Tensor, target: str, tmp_path) -> torch.Tensor:
    inputs = {"x": x, "timestep": TIMESTEPS}
    captured = capture(module, inputs)
    path = export_graph(captured.graph_module, captured, tmp_path / f"{target}.onnx", target)
    if target == "tensorrt":
        assert check_tensorrt_qdq(onnx.load(str(path))) == []
    return path


def _ties(scale: torch.Tensor, lo: int, hi: int, shape=(3, 5, 40)) -> torch.Tensor:
    """Per sample b (group g_b): values k s_g and (k + 1/2) s_g for codes k from 3 below lo to 3 above hi."""
    groups = (TIMESTEPS.unsqueeze(-1) > BOUNDARIES).sum(-1) if scale.numel() > 1 else torch.zeros(3, dtype=torch.long)
    gen = torch.Generator().manual_seed(0)
    halves = torch.randint(2 * (lo - 3), 2 * (hi + 3) + 1, shape, generator=gen).float() / 2
    return halves * scale.reshape(-1)[groups].reshape(-1, 1, 1)


UNIFORM = [  # (bits, scales, zero points)
    (8, torch.tensor([0.05]), torch.tensor([5])),
    (6, torch.tensor([0.05]), torch.tensor([-3])),
    (8, torch.tensor([0.05, 0.02, 0.11, 0.07]), torch.tensor([5, -20, 0, 100])),
    (4, torch.tensor([0.05, 0.02, 0.11, 0.07]), torch.tensor([1, -3, 0, 7])),
    (8, torch.tensor([0.05, 0.02, 0.11, 0.07]), torch.tensor([0, 0, 0, 0])),
]


@pytest.mark.parametrize("bits, scales, zeros", UNIFORM, ids=lambda v: str(v.tolist()) if torch.is_tensor(v) else v)
def test_uniform_site_is_exact_in_ort_for_both_targets(bits, scales, zeros, tmp_path):
    module = Site(torch.ops.ditq.quant_act.default, [scales, zeros.int()], bits)
    x = _ties(scales, -(2 ** (bits - 1)) - int(zeros.max()), 2 ** (bits - 1) - int(zeros.min()))
    reference = module(x, TIMESTEPS)
    for target in ("ort", "tensorrt"):
        torch.testing.assert_close(OrtModel(_export(module, x, target, tmp_path))(x, TIMESTEPS), reference,
                                   rtol=0, atol=0)


def _linear_args(gen: torch.Generator) -> list:
    weight = torch.randn(N, K, generator=gen) * 0.1
    spec = QuantSpec(8, True, "channel", axis=0)
    w_scale, w_zp = weight_qparams(weight, spec)
    return [quantize(weight, w_scale, w_zp, spec), w_scale, w_zp, torch.randn(N, generator=gen), None, None, 0, False]


@pytest.mark.parametrize("site", ["uniform-one-row", "uniform-time-grouped", "gelu-one-row", "gelu-time-grouped"])
@pytest.mark.parametrize("target", ["ort", "tensorrt"])
def test_a_site_feeding_a_linear_keeps_the_integer_kernel(site, target, tmp_path):
    """The linear multiplies the site's codes (constant scale); a group's scale and zero point come after the
    product. A two-region quantizer gives two integer GEMMs (one per Q/DQ branch) whose outputs are added."""
    groups = 4 if site.endswith("grouped") else 1
    gen = torch.Generator().manual_seed(1)
    if site.startswith("uniform"):
        scales, zeros = torch.tensor([0.05, 0.02, 0.11, 0.07])[:groups], torch.tensor([5, -20, 0, 100])[:groups]
        module = Site(torch.ops.ditq.quant_act.default, [scales, zeros.int()], 8, _linear_args(gen))
        x = _ties(scales, -128 - int(zeros.max()), 127 - int(zeros.min()), (3, 5, K))
    else:
        s_neg = torch.tensor([0.002, 0.001, 0.004, 0.003])[:groups]
        s_pos = torch.tensor([0.05, 0.02, 0.11, 0.07])[:groups]
        module = Site(torch.ops.ditq.quant_gelu_mrq.default, [s_neg, s_pos], 8, _linear_args(gen))
        x = _gelu_inputs(s_neg, s_pos, 128, (K - 2) // 2)
    path = _export(module, x, target, tmp_path)
    assert sqnr_db(module(x, TIMESTEPS), OrtModel(path)(x, TIMESTEPS)) >= 70
    report = profile(path, (x, TIMESTEPS))
    if target == "ort":   # ONNX Runtime runs the tensorrt flavour's int8 activations in float: not its target
        assert [k.kernel for k in report.layers.values()] == ["MatMulIntegerToFloat"], report.table()
        assert report.op_counts.get("MatMulIntegerToFloat") == (2 if site.startswith("gelu") else 1)
        assert "MatMul" not in report.op_counts


def _gelu_inputs(s_neg: torch.Tensor, s_pos: torch.Tensor, n: int, half: int = 20) -> torch.Tensor:
    """2 half + 2 values per row: each sign's grid and ties beyond its range, 0 and -0."""
    negative = _ties(s_neg, -n, 0, (3, 5, half)).clamp(max=0)
    positive = _ties(s_pos, 0, n - 1, (3, 5, half)).clamp(min=0)
    return torch.cat([negative, positive, torch.zeros(3, 5, 1), torch.full((3, 5, 1), -1e-30)], -1)


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("groups", [1, 4])
def test_gelu_two_region_is_exact_in_ort_for_both_targets(bits, groups, tmp_path):
    s_neg = torch.tensor([0.002, 0.001, 0.004, 0.003])[:groups]
    s_pos = torch.tensor([0.05, 0.02, 0.11, 0.07])[:groups]
    module = Site(torch.ops.ditq.quant_gelu_mrq.default, [s_neg, s_pos], bits)
    x = _gelu_inputs(s_neg, s_pos, 2 ** (bits - 1))
    reference = module(x, TIMESTEPS)
    for target in ("ort", "tensorrt"):
        torch.testing.assert_close(OrtModel(_export(module, x, target, tmp_path))(x, TIMESTEPS), reference,
                                   rtol=0, atol=0)


def _softmax_inputs(s1: torch.Tensor, n: int) -> torch.Tensor:
    """Both regions' ties and grids, the split n s1 and its float32 neighbours, 0 and 1."""
    s2 = 1.0 / n
    low = _ties(s1.clamp(max=s2), 0, n - 1, (3, 5, 30)).clamp(0, 1)
    high = _ties(torch.full_like(s1, s2), 0, n, (3, 5, 30)).clamp(0, 1)
    rows = (TIMESTEPS.unsqueeze(-1) > BOUNDARIES).sum(-1) if s1.numel() > 1 else torch.zeros(3, dtype=torch.long)
    split = (n * s1.clamp(max=s2))[rows].reshape(3, 1, 1).expand(3, 5, 1)
    edges = torch.cat([split, torch.nextafter(split, torch.zeros(())), torch.nextafter(split, torch.ones(())),
                       torch.zeros(3, 5, 1), torch.ones(3, 5, 1)], -1)
    return torch.cat([low, high, edges], -1)


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("groups", [1, 4])
def test_softmax_two_region_is_exact_in_ort(bits, groups, tmp_path):
    n = 2 ** (bits - 1)
    s1 = torch.tensor([0.2, 0.05, 0.9, 1.5])[:groups] / n ** 2      # splits n s1 at 0.2 / n .. (the last: clamped)
    module = Site(torch.ops.ditq.quant_softmax_mrq.default, [s1], bits)
    x = _softmax_inputs(s1, n)
    reference = module(x, TIMESTEPS)
    assert (reference > 0).any() and (x >= n * s1.clamp(max=1 / n).min()).any()
    targets = ("ort", "tensorrt") if bits < 8 else ("ort",)
    for target in targets:
        torch.testing.assert_close(OrtModel(_export(module, x, target, tmp_path))(x, TIMESTEPS), reference,
                                   rtol=0, atol=0)


def test_tensorrt_rejects_what_has_no_symmetric_int8_form_and_names_the_nodes(tmp_path):
    """8-bit post-softmax: code n = 128 of the upper region (x = 1) does not fit int8 with zero point 0."""
    module = Site(torch.ops.ditq.quant_softmax_mrq.default, [torch.tensor([0.2 / 128 ** 2])], 8)
    captured = capture(module, {"x": torch.rand(3, 5, 8), "timestep": TIMESTEPS})
    with pytest.raises(OnnxExportError, match=r"quant_softmax_mrq.*codes \[\d+, 128\] do not fit int8 with zero "
                                              r"point 0, which target 'tensorrt' requires"):
        lower_graph(captured.graph_module, make_target("tensorrt"))


@pytest.mark.parametrize("width, sides", [(64, "both"), (48, "both"), (24, "left"), (32, "right")])
def test_online_hadamard_runs_as_two_constant_matmuls(width, sides, tmp_path):
    left, right = hadamard_factors(width)
    left, right = (left if sides != "right" else None), (right if sides != "left" else None)

    class Rotate(torch.nn.Module):
        def forward(self, x, timestep):
            return torch.ops.ditq.hadamard.default(x, left, right)

    x = torch.randn(3, 7, width, generator=torch.Generator().manual_seed(2))
    path = _export(Rotate(), x, "ort", tmp_path)
    torch.testing.assert_close(OrtModel(path)(x, TIMESTEPS), Rotate()(x, TIMESTEPS), rtol=1e-5, atol=1e-5)
    ops = [n.op_type for n in onnx.load(str(path)).graph.node]
    assert ops.count("MatMul") == (2 if sides == "both" else 1), ops


def test_per_token_ternary_linear_with_a_learned_clip(tmp_path):
    """RobuQ's layer: ternary codes, A4 per token on c [min, max] (c = 0.8 saturates the extremes), a bias."""
    gen = torch.Generator().manual_seed(3)
    codes = torch.randint(-1, 2, (N, K), generator=gen).to(torch.int8)
    w_scale, clip = torch.rand(N, generator=gen) * 0.1 + 0.01, torch.tensor(0.8)
    args = [codes, w_scale, torch.zeros(N, dtype=torch.int32), torch.randn(N, generator=gen), clip, None, 4, True]

    class Layer(torch.nn.Module):
        def __init__(self):
            super().__init__()
            for i, a in enumerate(args):
                if isinstance(a, torch.Tensor):
                    self.register_buffer(f"a{i}", a)

        def forward(self, x):
            return torch.ops.ditq.quant_linear.default(
                x, *[getattr(self, f"a{i}") if isinstance(a, torch.Tensor) else a for i, a in enumerate(args)])

    x = torch.randn(2, 9, K, generator=gen)
    captured = capture(Layer(), {"x": x})
    path = export_graph(captured.graph_module, captured, tmp_path / "ternary.onnx", "ort")
    reference = Layer()(x)
    without_clip = torch.ops.ditq.quant_linear.default(x, *args[:4], None, None, 4, True)
    assert sqnr_db(reference, without_clip) < 40                    # the clip matters ...
    assert sqnr_db(reference, OrtModel(path)(x)) >= 70               # ... and the export applies it
    assert [k.kernel for k in profile(path, (x,)).layers.values()] == ["MatMulInteger"]


def test_sites_are_lowered_in_the_torch_graph_too():
    """The lowered FX graph (ONNX-mirror ops run in torch) already equals the reference: a check before ONNX."""
    scales, zeros = torch.tensor([0.05, 0.02, 0.11, 0.07]), torch.tensor([5, -20, 0, 100]).int()
    module = Site(torch.ops.ditq.quant_act.default, [scales, zeros], 8)
    x = _ties(scales, -228, 147)
    captured = capture(module, {"x": x, "timestep": TIMESTEPS})
    lowered = lower_graph(captured.graph_module, make_target("ort"))
    names = {n.target for n in lowered.graph.nodes if n.op == "call_function"}
    assert torch.ops.ditq.quant_act.default not in names
    out = lowered(x=x, timestep=TIMESTEPS)
    out = out[0] if isinstance(out, (tuple, list)) else out
    torch.testing.assert_close(out, module(x, TIMESTEPS), rtol=0, atol=0)
