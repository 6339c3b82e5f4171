"""ONNX lowering of single quantized layers: every weight / activation variant, both targets, run by ONNX Runtime.

Each case wraps one ``ditq::quant_linear`` / ``ditq::quant_conv2d`` in a module, captures and exports
it, and compares ONNX Runtime against the op itself (the fake-quant reference). Static activations
are drawn off rounding ties, so the integer codes agree exactly and only float summation order
differs: SQNR >= 70 dB. The kernel ONNX Runtime ran is checked against what the lowering is for.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass

import numpy as np
import onnx
import pytest
import torch

import ditq_compiler.ops  # noqa: F401
from ditq_compiler.backends.onnx import (LOWERINGS, OnnxExportError, check_tensorrt_qdq,
                                         export_graph, lower_graph, make_target, register_lowering, write_checked)
from ditq_compiler.backends.ort import OrtModel, profile
from ditq_compiler.capture import capture
from ditq_compiler.quant import QuantSpec, quantize, sqnr_db, weight_qparams

K, N = 64, 48
CONV_C, CONV_O = 8, 6


class OneOp(torch.nn.Module):
    """``op(x, *args)`` with the tensor arguments held as buffers (constants after capture)."""

    def __init__(self, op, args):
        super().__init__()
        self.op, self.spec = op, []
        for i, a in enumerate(args):
            if isinstance(a, torch.Tensor):
                self.register_buffer(f"c{i}", a)
                self.spec.append(f"c{i}")
            else:
                self.spec.append(("value", a))

    def forward(self, x):
        return self.op(x, *[getattr(self, s) if isinstance(s, str) else s[1] for s in self.spec])


@dataclass
class Case:
    name: str
    conv: bool
    w_bits: int
    w_symmetric: bool
    w_granularity: str           # tensor / channel / group
    a_bits: int                  # 0: weight-only
    per_token: bool = False
    a_zero: int = 5
    bias: bool = True
    conv_args: tuple = ([1, 1], [1, 1], [1, 1], 1)
    ort_kernel: str = "MatMulIntegerToFloat"
    tensorrt_error: str | None = None


CASES = [
    Case("w8-channel-a8", False, 8, True, "channel", 8),
    Case("w4-affine-channel-a8", False, 4, False, "channel", 8),
    Case("w8-tensor-a8-nobias", False, 8, True, "tensor", 8, bias=False),
    Case("w6-channel-a6", False, 6, True, "channel", 6, a_zero=-3),
    Case("w8-affine-channel-a8", False, 8, False, "channel", 8, tensorrt_error="asymmetric 8-bit weights"),
    Case("w4-group16-a8", False, 4, True, "group", 8, ort_kernel="MatMul", tensorrt_error="per-group weights"),
    Case("w8-channel-a8-token", False, 8, True, "channel", 8, per_token=True, ort_kernel="MatMulInteger",
         tensorrt_error="per-token activations"),
    Case("w4-affine-group16-a4-token", False, 4, False, "group", 4, per_token=True, ort_kernel="MatMul",
         tensorrt_error="per-token activations"),
    Case("w4-channel-weight-only", False, 4, True, "channel", 0, ort_kernel="MatMulNBits"),
    Case("conv-w8-channel-a8", True, 8, True, "channel", 8, ort_kernel="ConvInteger"),
    Case("conv-w4-affine-channel-a6", True, 4, False, "channel", 6, a_zero=-7, ort_kernel="ConvInteger"),
    Case("conv-w8-affine-channel-a8", True, 8, False, "channel", 8, ort_kernel="Conv",
         tensorrt_error="asymmetric 8-bit weights"),
    Case("conv-w8-tensor-weight-only", True, 8, True, "tensor", 0, ort_kernel="Conv"),
    Case("conv-w8-stride2-groups2-a8", True, 8, True, "channel", 8, conv_args=([2, 2], [0, 0], [1, 1], 2),
         ort_kernel="ConvInteger"),
]


def _layer(case: Case, gen: torch.Generator) -> tuple[OneOp, torch.Tensor]:
    """The module and an input drawn off rounding ties (static activations), or plain normal (per token)."""
    if case.conv:
        groups = case.conv_args[3]
        weight = torch.randn(CONV_O, CONV_C // groups, 3, 3, generator=gen) * 0.2
    else:
        weight = torch.randn(N, K, generator=gen) * 0.1
    spec = QuantSpec(case.w_bits, case.w_symmetric, case.w_granularity, axis=0,
                     group_size=16 if case.w_granularity == "group" else None)
    w_scale, w_zp = weight_qparams(weight, spec)
    codes = quantize(weight, w_scale, w_zp, spec)
    bias = torch.randn(weight.shape[0], generator=gen) if case.bias else None
    a_scale, a_zp = torch.tensor(0.05), torch.tensor(case.a_zero, dtype=torch.int32)
    static = case.a_bits and not case.per_token
    args = [codes, w_scale, w_zp, bias, a_scale if static else None, a_zp if static else None,
            case.a_bits, case.per_token]
    shape = (2, CONV_C, 6, 6) if case.conv else (2, 5, K)
    if static:
        qmin, qmax = -(2 ** (case.a_bits - 1)), 2 ** (case.a_bits - 1) - 1
        codes_x = torch.randint(qmin - 4, qmax + 5, shape, generator=gen)   # a few beyond the grid: clamping
        x = (codes_x - case.a_zero + torch.rand(shape, generator=gen) * 0.8 - 0.4) * 0.05
    else:
        x = torch.randn(shape, generator=gen)
    if case.conv:
        return OneOp(torch.ops.ditq.quant_conv2d.default, [*args, *case.conv_args]), x
    return OneOp(torch.ops.ditq.quant_linear.default, args), x


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_single_layer_lowering_runs_in_ort_like_the_reference(case, tmp_path):
    module, x = _layer(case, torch.Generator().manual_seed(CASES.index(case)))
    captured = capture(module, {"x": x})
    reference = module(x)
    for target in ("ort", "tensorrt"):
        lowered_torch = None
        if target == "tensorrt" and case.tensorrt_error:
            with pytest.raises(OnnxExportError, match=case.tensorrt_error):
                export_graph(captured.graph_module, captured, tmp_path / f"{target}.onnx", target)
            assert not (tmp_path / f"{target}.onnx").exists()
            continue
        lowered_torch = lower_graph(captured.graph_module, make_target(target))(x=x)
        assert sqnr_db(reference, lowered_torch) >= 70, f"{target}: the lowered torch graph differs"
        path = export_graph(captured.graph_module, captured, tmp_path / f"{target}.onnx", target)
        ort_out = OrtModel(path)(x)
        assert ort_out.shape == reference.shape
        assert sqnr_db(reference, ort_out) >= 70, f"{target}: ONNX Runtime differs from the reference"
        assert ort_out.dtype == torch.float32
        if target == "ort":
            kernels = profile(path, (x,)).layers
            assert [k.kernel for k in kernels.values()] == [case.ort_kernel], kernels
        else:
            assert check_tensorrt_qdq(onnx.load(str(path))) == []


def test_ort_flavour_stores_four_bit_codes_as_int4(tmp_path):
    case = Case("w4", False, 4, False, "channel", 8)
    module, x = _layer(case, torch.Generator().manual_seed(0))
    captured = capture(module, {"x": x})
    model = onnx.load(str(export_graph(captured.graph_module, captured, tmp_path / "w4.onnx", "ort")))
    int4 = [t for t in model.graph.initializer if t.data_type == onnx.TensorProto.INT4]
    assert [tuple(t.dims) for t in int4] == [(K, N)]
    widen = [n for n in model.graph.node if n.op_type == "Cast" and n.input[0] == int4[0].name]
    assert len(widen) == 1 and widen[0].attribute[0].i == onnx.TensorProto.INT8


def test_tensorrt_flavour_is_symmetric_int8_with_zero_points_zero(tmp_path):
    """Affine activations (z = 5) and asymmetric 4-bit weights still give only int8 zero-point-0 Q/DQ."""
    case = Case("w4-affine", False, 4, False, "channel", 8)
    module, x = _layer(case, torch.Generator().manual_seed(1))
    captured = capture(module, {"x": x})
    model = onnx.load(str(export_graph(captured.graph_module, captured, tmp_path / "trt.onnx", "tensorrt")))
    initializers = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    qdq = [n for n in model.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")]
    assert len(qdq) == 3                                                    # Q, DQ of x; DQ of the weight
    for node in qdq:
        zero = initializers[node.input[2]]
        assert zero.dtype == np.int8 and not zero.any(), node.name
    assert all(initializers[n.input[0]].dtype == np.int8 for n in qdq if n.input[0] in initializers)
    assert not any(n.op_type in ("MatMulInteger", "ConvInteger") for n in model.graph.node)


def test_tensorrt_check_catches_affine_and_uint8_qdq(tmp_path):
    module, x = _layer(Case("w8", False, 8, True, "channel", 8), torch.Generator().manual_seed(2))
    captured = capture(module, {"x": x})
    ort_model = onnx.load(str(export_graph(captured.graph_module, captured, tmp_path / "ort.onnx", "ort")))
    problems = check_tensorrt_qdq(ort_model)
    assert problems and all("zero point UINT8" in p for p in problems)      # the ort flavour's uint8 activations


def test_unlowered_ops_are_listed_together_before_any_file_is_written(tmp_path):
    @torch.library.custom_op("ditq_test::mystery", mutates_args=())
    def mystery(x: torch.Tensor) -> torch.Tensor:
        return x * 2

    mystery.register_fake(lambda x: torch.empty_like(x))

    class TwoMysteries(torch.nn.Module):
        def forward(self, x):
            return torch.ops.ditq_test.mystery(torch.ops.ditq_test.mystery(x) + 1)

    captured = capture(TwoMysteries(), {"x": torch.randn(2, 3)})
    with pytest.raises(OnnxExportError, match=r"\(2 node\(s\)\)") as error:
        export_graph(captured.graph_module, captured, tmp_path / "m.onnx", "ort")
    assert str(error.value).count("ditq_test.mystery.default): no ONNX lowering is registered") == 2
    assert list(tmp_path.iterdir()) == []


def test_registering_a_lowering_twice_is_an_error():
    with pytest.raises(ValueError, match="already registered"):
        register_lowering(torch.ops.ditq.quant_linear.default)(lambda ctx, node: node)
    assert LOWERINGS[torch.ops.ditq.quant_linear.default].__name__ == "lower_quant_linear"


def test_lowering_errors_name_the_layer():
    module, x = _layer(Case("tok", False, 8, True, "channel", 8, per_token=True), torch.Generator().manual_seed(3))
    captured = capture(module, {"x": x})
    with pytest.raises(OnnxExportError, match=r"layer 'quant_linear'.*per-token"):
        lower_graph(captured.graph_module, make_target("tensorrt"))
    with pytest.raises(ValueError, match="target must be one of"):
        make_target("coreml")
    with pytest.raises(ValueError, match="int8 activations only"):
        make_target("tensorrt", "uint8")


def test_failed_check_writes_nothing_and_leaves_no_temporary_files(tmp_path):
    import onnx_ir as ir

    module, x = _layer(Case("w8", False, 8, True, "channel", 8), torch.Generator().manual_seed(4))
    captured = capture(module, {"x": x})
    path = export_graph(captured.graph_module, captured, tmp_path / "good.onnx", "ort")
    model = ir.load(str(path))
    matmul = next(n for n in model.graph if n.op_type == "MatMulInteger" or n.op_type == "MatMul")
    matmul.attributes["transA"] = ir.AttrInt64("transA", 1)                # MatMul has no such attribute
    with pytest.raises(OnnxExportError, match="fails the ONNX checker"):
        write_checked(model, tmp_path / "bad.onnx", None)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["good.onnx"]


def test_external_data_and_dynamic_batch(tmp_path):
    module, x = _layer(Case("w8", False, 8, True, "channel", 8), torch.Generator().manual_seed(5))
    captured = capture(module, {"x": x})
    inline = export_graph(captured.graph_module, captured, tmp_path / "inline.onnx", "ort").stat().st_size
    path = export_graph(captured.graph_module, captured, tmp_path / "ext.onnx", "ort", external_data=True)
    assert (tmp_path / "ext.onnx.data").stat().st_size >= K * N         # the int8 codes live outside
    assert path.stat().st_size <= inline - K * N + 256                  # + the external-data references
    model = OrtModel(path)
    for batch in (1, 3):
        xb = torch.randn(batch, 5, K)
        assert sqnr_db(module(xb), model(xb)) >= 60
    meta = {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
    assert json.loads(meta["ditq.inputs"]) == ["x"] and meta["ditq.target"] == "ort"


@pytest.mark.parametrize("per_token", [False, True], ids=["static", "per-token"])
def test_without_vnni_saturable_8bit_weights_become_uint8(per_token, tmp_path):
    """On a CPU without VNNI the u8 x s8 kernel saturates int16 pair sums: such layers get u8 x u8 weights."""
    case = Case("w8", False, 8, True, "channel", 8, per_token=per_token)
    module, x = _layer(case, torch.Generator().manual_seed(6))
    captured = capture(module, {"x": x})
    kernel = "MatMulInteger" if per_token else "MatMulIntegerToFloat"
    for vnni, dtype in ((True, np.int8), (False, np.uint8)):
        path = export_graph(captured.graph_module, captured, tmp_path / f"{vnni}.onnx", "ort", vnni=vnni)
        model = onnx.load(str(path))
        weights = [onnx.numpy_helper.to_array(t) for t in model.graph.initializer if tuple(t.dims) == (K, N)]
        assert len(weights) == 1 and weights[0].dtype == dtype
        meta = {p.key: p.value for p in model.metadata_props}
        assert meta["ditq.needs_vnni"] == str(vnni).lower()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")                      # the needs-VNNI warning, on a CPU without it
            assert sqnr_db(module(x), OrtModel(path)(x)) >= 70
        assert [k.kernel for k in profile(path, (x,)).layers.values()] == [kernel]


def test_a_quantized_linear_on_a_2d_input_still_runs_the_integer_kernel(tmp_path):
    """(batch, dim) inputs, as adaLN modulation has: ONNX Runtime must not turn MatMul + Add into a float Gemm."""
    module, _ = _layer(Case("w8", False, 8, True, "channel", 8), torch.Generator().manual_seed(7))
    x = (torch.randint(-128, 128, (3, K)) - 5 + torch.rand(3, K) * 0.8 - 0.4) * 0.05
    captured = capture(module, {"x": x})
    path = export_graph(captured.graph_module, captured, tmp_path / "2d.onnx", "ort")
    assert sqnr_db(module(x), OrtModel(path)(x)) >= 70
    assert [k.kernel for k in profile(path, (x,)).layers.values()] == ["MatMulIntegerToFloat"]
