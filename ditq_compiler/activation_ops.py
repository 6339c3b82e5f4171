"""Standalone activation quantizers as ``torch.library`` custom ops (TQ-DiT's sites).

They sit in the graph in front of the op whose input they quantize: an attention matmul operand
(q, k^T, the post-softmax probabilities P, v), or the input of a ``ditq::quant_linear`` that then
runs with ``a_bits = 0``. Each returns the fake-quantized tensor (quantize, then dequantize) in
x's dtype; the fake implementations return ``empty_like(x)``, so the graph traces under
FakeTensor and re-exports.

Every parameter is a 1-D table with one row per time group, held by a get_attr constant:

    group is None      the table has exactly one row: p = table[0]          (a static quantizer)
    group is a tensor  int64, shape (B,) or (): the time group of each sample, computed in the graph
                       from the timestep input (``passes/attach_time_groups.py``);
                       p = table[group], viewed as (B, 1, ..., 1) so sample b uses row group[b]

Semantics, with n = 2^(bits-1) (``ditq_compiler.quant.multi_region`` carries the derivations):

    ditq::quant_act(x, group, scale, zero_point, bits)          uniform, signed grid [-n, n-1]:
        q = (clamp(round(x / s) + z, -n, n - 1) - z) * s
    ditq::quant_softmax_mrq(x, group, s1, bits)                 two regions, s2 = 1/n fixed:
        x <  n s1:  q = s1 * clamp(round(x / s1), 0, n - 1)
        x >= n s1:  q = s2 * clamp(round(x / s2), ceil(n s1 / s2), n)
    ditq::quant_gelu_mrq(x, group, s_neg, s_pos, bits)          one step per sign:
        q = s_neg * clamp(round(x / s_neg), -n, 0) + s_pos * clamp(round(x / s_pos), 0, n - 1)

Lowering (torch.round is round-half-to-even, as ONNX QuantizeLinear and Round are): a static
uniform site is ``QuantizeLinear(s, z) -> DequantizeLinear(s, z)`` with the codes clipped to
[-n, n-1] when bits < 8. A time-grouped one has s_g = Gather(table, group) and z_g likewise, which
are not constants, so it becomes (``backends/onnx_sites.py``, bit-exact with this reference)

    Div(s_g) -> Round -> Add(z_g) -> [Clip(-n, n-1) when bits < 8] -> Q(scale 1) -> DQ(scale 1) -> Sub(z_g) -> Mul(s_g)

DESIGN.md's ``Mul(1/s_g)`` can move a value that sits exactly on a rounding tie by one code, so the
lowering divides, as the reference does. When the site feeds a quantized linear, the codes go to the
integer GEMM and ``(y - z_g colsum(W)) s_g + b`` is applied after it (s_g is per sample, not along the
reduction), so the int8 kernel sees constant scales. The two-region quantizers are two such
branches: Where(x < n s1) selects between them for the softmax one (its branches do not vanish on
each other's region), Add joins them for the GELU one (each branch is 0 on the other sign). Their
code counts: see ``ditq_compiler.quant.multi_region``.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ditq_compiler.quant.multi_region import gelu_two_region, softmax_two_region, uniform


def select_rows(table: Tensor, group: Optional[Tensor], like: Tensor) -> Tensor:
    """``table[group]`` broadcastable against ``like`` (see the module doc)."""
    if table.dim() != 1 or table.numel() == 0:
        raise ValueError(f"a quantizer parameter table must be 1-D with one row per time group, "
                         f"got shape {tuple(table.shape)}")
    if group is None:
        if table.numel() != 1:
            raise ValueError(f"a table of {table.numel()} time groups needs the group of each sample")
        return table.reshape(())
    if group.dim() > 1 or (group.dim() == 1 and group.numel() not in (1, like.shape[0])):
        raise ValueError(f"time group index of shape {tuple(group.shape)} does not match a batch of "
                         f"{like.shape[0]} (input shape {tuple(like.shape)})")
    rows = table[group.long().clamp(0, table.numel() - 1)]
    return rows.reshape(rows.shape + (1,) * (like.dim() - rows.dim()))


@torch.library.custom_op("ditq::quant_act", mutates_args=())
def quant_act(x: Tensor, group: Optional[Tensor], scale: Tensor, zero_point: Tensor, bits: int) -> Tensor:
    return uniform(x, select_rows(scale, group, x), select_rows(zero_point, group, x), bits)


@quant_act.register_fake
def _(x, group, scale, zero_point, bits):
    return torch.empty_like(x)


@torch.library.custom_op("ditq::quant_softmax_mrq", mutates_args=())
def quant_softmax_mrq(x: Tensor, group: Optional[Tensor], s1: Tensor, bits: int) -> Tensor:
    return softmax_two_region(x, select_rows(s1, group, x), bits)


@quant_softmax_mrq.register_fake
def _(x, group, s1, bits):
    return torch.empty_like(x)


@torch.library.custom_op("ditq::quant_gelu_mrq", mutates_args=())
def quant_gelu_mrq(x: Tensor, group: Optional[Tensor], s_neg: Tensor, s_pos: Tensor, bits: int) -> Tensor:
    return gelu_two_region(x, select_rows(s_neg, group, x), select_rows(s_pos, group, x), bits)


@quant_gelu_mrq.register_fake
def _(x, group, s_neg, s_pos, bits):
    return torch.empty_like(x)


__all__ = ["quant_act", "quant_gelu_mrq", "quant_softmax_mrq", "select_rows"]
