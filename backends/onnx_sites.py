"""ONNX lowerings of the standalone activation quantizers (TQ-DiT's sites) and of the online Hadamard rotation (RobuQ).

Registered into ``backends/onnx.py``'s table; the quantizers' semantics are in
``ditq_compiler.activation_ops`` and ``ditq_compiler.quant.multi_region``. Every lowering below
reproduces the reference's float32 arithmetic step for step (``x / s``, round half to even,
clamp, ``* s``), so codes agree exactly; QuantizeLinear divides by its scale and rounds half to
even as ``torch.round`` does.

Parameter rows. A table of G = 1 rows (or no group input) is a constant: the quantizer becomes
plain constant Q/DQ. A table of G > 1 rows is selected by the sample's time group ``g`` (computed in
the graph from the timestep input by ``passes/attach_time_groups.py``: Unsqueeze, Greater, ReduceSum):
``s_g = Gather(table, g)`` viewed (B, 1, .., 1). ``s_g`` is not a constant, and an int8 kernel needs
one, so the scale moves outside the quantizer (DESIGN.md):

    ditq::quant_act, G > 1:   v = x / s_g;  k = clamp(round(v) + z_g, qmin, qmax)
                              codes = DQ(Q(k, scale 1, zp c), scale 1, zp c)        (= k exactly: k is an integer)
                              x_hat = (codes - z_g) * s_g
    G = 1:                    x_hat = DQ(Q(x, s, z), s, z)  (x clipped to the k-bit grid first when k < 8)
                              (``tensorrt``, z != 0: the G > 1 form with constant s, z: zero point 0 and exact,
                              where quantizing ``x + z s`` would move values on rounding ties)

``z_g`` is added after Round (``round(v) + z`` is exact, ``round(v + z)`` is not near ties), and
``c`` is the target's constant code offset (128 for uint8, 0 for int8). The node returned carries a
``QuantizedInput`` (``codes``, ``shift = z_g``, ``scale = s_g``), so a ``ditq::quant_linear`` it feeds
multiplies ``codes`` (constant scale 1) by its DequantizeLinear weight, which ONNX Runtime fuses
into ``MatMulIntegerToFloat`` and TensorRT into an int8 GEMM, and applies
``y = (codes W^T - z_g colsum(W)) s_g + b`` after the product (exact: z_g and s_g are constant along
the reduction). Elsewhere (the attention matmuls' operands) ``x_hat`` itself is used.

Two-region quantizers, each branch a uniform quantizer ``s clamp(round(x / s), lo, hi)`` lowered as
one Q/DQ (``Clip(x, lo s, hi s) -> Q(s) -> DQ(s)`` with a constant step; ``x / s -> Clip(lo, hi) ->
Q(1) -> DQ(1) -> Mul(s)`` with a per-sample one; clipping before rounding is the same as clamping the
code after, as the bounds are integers):

    post-GELU (two Q/DQ and an Add, exact because each branch is 0 on the other sign):
        q(x) = s_neg clamp(round(x / s_neg), -n, 0) + s_pos clamp(round(x / s_pos), 0, n - 1)
    post-softmax (two Q/DQ and a Where; its branches do not vanish on each other's region: the lower
    one saturates at (n - 1) s1 above the split, the upper one at c0 s2 below it, so they select):
        q(x) = Where(x < n s1,  s1 clamp(round(x / s1), 0, n - 1),  s2 clamp(round(x / s2), c0, n))
        with s2 = 1/n, c0 = ceil(n s1 / s2) (a per-group table when s1 is), n s1 as the reference computes it.

The branches feed a float MatMul (the attention's P V, or fc2 after GELU): a sum or selection of two
quantized tensors is not one integer operand. Each branch's zero point is the one that fits its code
range in the target's dtype (0 when it can). ``tensorrt`` takes zero point 0 only: the 8-bit
post-softmax upper region's code n = 128 (x = 1) has no int8 form, an error naming the node.

Hadamard (``ditq::hadamard(x, L, R)``): ``Reshape(x, (.., |L|, |R|)) -> MatMul(., R^T) -> MatMul(L, .)
-> Reshape(.., n)`` with the two constant blocks (``ditq_compiler.quant.hadamard``; for non-power-of-two
widths ``L`` is the Paley block), float MatMuls in front of the next quantizer.
"""

from __future__ import annotations

from typing import Union

import torch
from torch import Tensor, fx

from ditq_compiler.backends.onnx_lowering import (ONNX, LoweringContext, LoweringError, QuantizedInput, code_offset,
                                                  register_lowering, signed_range, static_activation)
from ditq_compiler.quant.multi_region import levels

aten = torch.ops.aten
TINY = torch.finfo(torch.float32).tiny
Param = Union[Tensor, fx.Node]       # a 0-d constant, or a per-sample node of shape (B, 1, .., 1)


def _rows(ctx: LoweringContext, name: str, table: Tensor, group: fx.Node | None) -> Param:
    """``table[group]``: the constant itself for one row (or no group), else a Gather viewed (B, 1, .., 1)."""
    table = table.detach().reshape(-1).float()
    if group is None or table.numel() == 1:
        if table.numel() != 1:
            raise LoweringError(f"a table of {table.numel()} time groups but no group input")
        return table.reshape(())
    rank = ctx.node.meta["val"].dim()
    index = ctx.call(aten.reshape.default, group, [-1])
    rows = ctx.call(aten.index_select.default, ctx.constant(f"{name}_rows", table), 0, index)
    return ctx.call(aten.reshape.default, rows, [-1] + [1] * (rank - 1))


def _zero_point(ctx: LoweringContext, lo: int, hi: int) -> Tensor:
    """A constant zero point (target dtype) under which codes [lo, hi] fit; 0 when possible."""
    dtype = ctx.target.activation_dtype
    info = torch.iinfo(dtype)
    for zero in (0, code_offset(dtype), info.min, info.max - hi):
        if info.min <= lo + zero and hi + zero <= info.max and (zero == 0 or not ctx.target.symmetric_int8_only):
            return torch.tensor(zero, dtype=dtype)
    raise LoweringError(f"codes [{lo}, {hi}] do not fit {str(dtype).removeprefix('torch.')} with zero point 0, "
                        f"which target '{ctx.target.name}' requires")


def _qdq(ctx: LoweringContext, x: fx.Node, scale: Tensor, zero: Tensor, suffix: str) -> fx.Node:
    s, z = ctx.constant(f"{suffix}_scale", scale.float().reshape(())), ctx.constant(f"{suffix}_zero_point", zero)
    return ctx.call(ONNX.dequantize_linear.default, ctx.call(ONNX.quantize_linear.default, x, s, z, 0, 0),
                    s, z, 0, 0, "int8")


def uniform_branch(ctx: LoweringContext, x: fx.Node, scale: Param, lo: int, hi: int, bits: int, suffix: str,
                   lo_per_sample: fx.Node | None = None, lo_min: int | None = None) -> tuple[fx.Node, QuantizedInput]:
    """``s clamp(round(x / s), lo, hi)`` as one Q/DQ (see the module doc), and the term a linear reading it
    multiplies. ``lo_per_sample`` (integer values, (B, 1, .., 1), at least ``lo_min``) replaces ``lo`` per sample."""
    zero = _zero_point(ctx, lo if lo_min is None else lo_min, hi)
    if isinstance(scale, Tensor) and lo_per_sample is None:
        s = float(scale)
        codes = _qdq(ctx, ctx.call(aten.clamp.default, x, lo * s, hi * s), scale, zero, suffix)
        return codes, QuantizedInput(codes, bits)
    step = ctx.constant(f"{suffix}_step", scale) if isinstance(scale, Tensor) else scale
    v = ctx.call(aten.div.Tensor, x, step)
    if lo_per_sample is not None:
        v = ctx.call(aten.clamp.default, ctx.call(aten.maximum.default, v, lo_per_sample), None, hi)
    else:
        v = ctx.call(aten.clamp.default, v, lo, hi)
    codes = _qdq(ctx, v, torch.tensor(1.0), zero, suffix)
    return ctx.call(aten.mul.Tensor, codes, step), QuantizedInput(codes, bits, 0.0, step)


@register_lowering(torch.ops.ditq.quant_act.default)
def lower_quant_act(ctx: LoweringContext, node: fx.Node) -> fx.Node:
    """Uniform site: constant Q/DQ (one row), or the time-grouped form with the scale outside (module doc)."""
    _, group, scale, zero_point, bits = ctx.args()
    x = ctx.input(0)
    s = _rows(ctx, "a_scale", scale, group)
    zeros = zero_point.detach().reshape(-1).float()
    if isinstance(s, Tensor) and not (ctx.target.symmetric_int8_only and bool(zeros.any())):
        codes, _ = static_activation(ctx, x, s, zero_point.reshape(()), bits)
        return ctx.set_quantized_input(codes, QuantizedInput(codes, bits))
    qmin, qmax = signed_range(bits)
    z = _rows(ctx, "a_zero_point", zeros, group) if bool(zeros.any()) else None
    s, z = (ctx.constant(f"a_{name}", v) if isinstance(v, Tensor) else v for name, v in (("step", s), ("shift", z)))
    v = ctx.call(aten.round.default, ctx.call(aten.div.Tensor, x, s))
    if z is not None:
        v = ctx.call(aten.add.Tensor, v, z)
    if bits < 8:   # at 8 bits QuantizeLinear's saturation is the clamp to [qmin, qmax]
        v = ctx.call(aten.clamp.default, v, qmin, qmax)
    zero = torch.tensor(code_offset(ctx.target.activation_dtype), dtype=ctx.target.activation_dtype)
    codes = _qdq(ctx, v, torch.tensor(1.0), zero, "a_codes")
    centred = ctx.call(aten.sub.Tensor, codes, z) if z is not None else codes
    out = ctx.call(aten.mul.Tensor, centred, s)
    return ctx.set_quantized_input(out, QuantizedInput(codes, bits, z if z is not None else 0.0, s))


@register_lowering(torch.ops.ditq.quant_gelu_mrq.default)
def lower_quant_gelu_mrq(ctx: LoweringContext, node: fx.Node) -> fx.Node:
    """Post-GELU two-region quantizer: a Q/DQ per sign and an Add (module doc)."""
    _, group, s_neg, s_pos, bits = ctx.args()
    x, n = ctx.input(0), levels(bits)
    negative, neg_term = uniform_branch(ctx, x, _rows(ctx, "s_neg", s_neg.clamp_min(TINY), group), -n, 0, bits, "neg")
    positive, pos_term = uniform_branch(ctx, x, _rows(ctx, "s_pos", s_pos.clamp_min(TINY), group), 0, n - 1, bits,
                                        "pos")
    out = ctx.call(aten.add.Tensor, negative, positive)
    return ctx.set_quantized_input(out, neg_term, pos_term)


@register_lowering(torch.ops.ditq.quant_softmax_mrq.default)
def lower_quant_softmax_mrq(ctx: LoweringContext, node: fx.Node) -> fx.Node:
    """Post-softmax two-region quantizer: a Q/DQ per region and a Where on ``x < n s1`` (module doc)."""
    _, group, s1, bits = ctx.args()
    x, n = ctx.input(0), levels(bits)
    s2 = 1.0 / n
    s1 = s1.detach().reshape(-1).float().clamp(TINY, s2)        # as softmax_two_region clamps it
    split = n * s1                                              # float32, as the reference computes it
    first_high = torch.ceil(split * n)                          # c0 per row
    low, _ = uniform_branch(ctx, x, _rows(ctx, "s1", s1, group), 0, n - 1, bits, "low")
    c0 = _rows(ctx, "c0", first_high, group)
    try:
        if isinstance(c0, Tensor):
            high, _ = uniform_branch(ctx, x, torch.tensor(s2), int(c0), n, bits, "high")
        else:
            high, _ = uniform_branch(ctx, x, torch.tensor(s2), 0, n, bits, "high", lo_per_sample=c0,
                                     lo_min=int(first_high.min()))
    except LoweringError as e:
        raise LoweringError(f"upper region of the {bits}-bit post-softmax quantizer (step 1/{n}, x = 1 is code {n}): "
                            f"{e}") from e
    threshold = _rows(ctx, "split", split, group)
    if isinstance(threshold, Tensor):
        threshold = ctx.constant("split", threshold)
    return ctx.call(aten.where.self, ctx.call(aten.lt.Tensor, x, threshold), low, high)


@register_lowering(torch.ops.ditq.hadamard.default)
def lower_hadamard(ctx: LoweringContext, node: fx.Node) -> fx.Node:
    """``x (L (x) R)^T`` as Reshape, MatMul by ``R^T``, MatMul by ``L``, Reshape (float, constant blocks)."""
    _, left, right = ctx.args()
    x, n = ctx.input(0), ctx.node.meta["val"].shape[-1]
    a = left.shape[0] if left is not None else n // right.shape[0]
    b = n // a
    y = ctx.call(aten.unflatten.int, x, -1, [a, b])
    if right is not None:
        y = ctx.call(ONNX.matmul.default, y, ctx.constant("right_t", right.float().t()), "")
    if left is not None:
        y = ctx.call(ONNX.matmul.default, ctx.constant("left", left.float()), y, "")
    return ctx.call(aten.flatten.using_ints, y, -2, -1)
