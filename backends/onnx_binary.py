"""ONNX lowerings of the binarized (W1A1) ops, ``ditq::binary_linear`` and ``ditq::binary_conv2d``.

ONNX has no 1-bit tensor type and no XNOR-popcount GEMM, so a binarized layer runs in float with exact
integer products (``ditq_compiler.binary``): the activation signs ``Where(x >= tau, 1, -1)``, a MatMul (or Conv)
with the constant +-1 weight matrix (every product and partial sum an integer below 2^24, so float32 is exact),
the activation scale from ``ReduceMean(Abs(...))`` (after the per-channel clip of FPB), and the weight scale
and bias. The CPU popcount kernel (``backend="cpu-binary"``) is where the bits pay; this lowering is for running
and checking the model in ONNX Runtime.
"""

from __future__ import annotations

import torch
from torch import Tensor, fx

import ditq_compiler.binary  # noqa: F401  (registers the ditq:: binary ops)
from ditq_compiler.backends.onnx_lowering import ONNX, LoweringContext, LoweringError, register_lowering
from ditq_compiler.binary import SCALE_MODES

aten = torch.ops.aten


def _signs(ctx: LoweringContext, x: fx.Node, tau: Tensor | None, conv: bool) -> fx.Node:
    one, minus = ctx.constant("one", torch.tensor(1.0)), ctx.constant("minus_one", torch.tensor(-1.0))
    threshold = 0.0 if tau is None else ctx.constant("tau", tau.float().reshape(1, -1, 1, 1) if conv else tau.float())
    return ctx.call(aten.where.self, ctx.call(aten.ge.Tensor if isinstance(threshold, fx.Node) else aten.ge.Scalar,
                                              x, threshold), one, minus)


def _scale(ctx: LoweringContext, x: fx.Node, mode: int, mu_min: Tensor | None, mu_max: Tensor | None,
           conv: bool) -> fx.Node | None:
    """A(x) of ``ditq_compiler.binary.activation_scale`` (None for mode none)."""
    if mode == SCALE_MODES["none"]:
        return None
    channel = 1 if conv else -1
    if mode == SCALE_MODES["clipped"]:
        dims = [2, 3] if conv else list(range(1, _rank(ctx) - 1))
        if not dims:
            raise LoweringError("a clipped activation scale needs a token or pixel dim")
        shape = (1, -1, 1, 1) if conv else (-1,)
        lo = ctx.call(aten.mul.Tensor, ctx.call(aten.amin.default, x, dims, True),
                      ctx.constant("mu_min", mu_min.float().reshape(shape)))
        hi = ctx.call(aten.mul.Tensor, ctx.call(aten.amax.default, x, dims, True),
                      ctx.constant("mu_max", mu_max.float().reshape(shape)))
        x = ctx.call(aten.minimum.default, ctx.call(aten.maximum.default, x, lo), hi)
    return ctx.call(aten.mean.dim, ctx.call(aten.abs.default, x), [channel], True)


def _rank(ctx: LoweringContext) -> int:
    """The rank of a binary linear's input (its output has the same), from the shapes propagated on the graph."""
    for node in (ctx.node.args[0], ctx.node):
        value = node.meta.get("val") if isinstance(node, fx.Node) else None
        if isinstance(value, Tensor):
            return value.dim()
    raise LoweringError(f"node '{ctx.node.name}': the rank of the binary linear's input is unknown (no shape was "
                        "propagated on the graph)")


@register_lowering(torch.ops.ditq.binary_linear.default)
def lower_binary_linear(ctx: LoweringContext, node: fx.Node) -> fx.Node:
    """``(sign(x - tau) @ W_b^T) * A(x) * sigma + b`` with float MatMul on +-1 values."""
    _, w_bits, w_scale, tau, mu_min, mu_max, mode, bias = ctx.args()
    x = ctx.input(0)
    weight = ctx.constant("w_signs_t", (1.0 - 2.0 * w_bits.float()).t().contiguous())
    y = ctx.call(ONNX.matmul.default, _signs(ctx, x, tau, False), weight, ctx.layer)
    scale = _scale(ctx, x, mode, mu_min, mu_max, False)
    if scale is not None:
        y = ctx.call(aten.mul.Tensor, y, scale)
    y = ctx.call(aten.mul.Tensor, y, ctx.constant("w_scale", w_scale.float()))
    return y if bias is None else ctx.call(aten.add.Tensor, y, ctx.constant("bias", bias.float()))


@register_lowering(torch.ops.ditq.binary_conv2d.default)
def lower_binary_conv2d(ctx: LoweringContext, node: fx.Node) -> fx.Node:
    """``Conv(sign(x - tau), W_b) * Conv(A(x), k) * sigma + b`` (zero padding counts 0 in both)."""
    _, w_bits, w_scale, k, tau, mu_min, mu_max, mode, bias, stride, padding, dilation, groups = ctx.args()
    x = ctx.input(0)
    conv = [list(stride), list(padding), list(dilation)]
    weight = ctx.constant("w_signs", 1.0 - 2.0 * w_bits.float())
    y = ctx.call(ONNX.conv.default, _signs(ctx, x, tau, True), weight, *conv, groups, ctx.layer)
    scale = _scale(ctx, x, mode, mu_min, mu_max, True)
    if scale is not None:
        kernel = ctx.constant("k", k.float().reshape(1, 1, *k.shape))
        y = ctx.call(aten.mul.Tensor, y, ctx.call(ONNX.conv.default, scale, kernel, *conv, 1, ""))
    y = ctx.call(aten.mul.Tensor, y, ctx.constant("w_scale", w_scale.float().reshape(1, -1, 1, 1)))
    return y if bias is None else ctx.call(aten.add.Tensor, y, ctx.constant("bias", bias.float().reshape(1, -1, 1, 1)))
