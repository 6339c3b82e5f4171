"""Quantized operators as ``torch.library`` custom ops, so rewritten graphs still run and re-export.

``ditq::quant_linear`` and ``ditq::quant_conv2d`` hold integer weight codes ``q_w`` with
their scale ``s_w`` and zero point ``z_w``, and the input activation quantizer's parameters.
Their reference (fake-quant) semantics, with a signed ``a_bits`` grid
``[qmin, qmax] = [-2^(a-1), 2^(a-1)-1]``:

    x_hat = (clamp(round(x / s_a) + z_a, qmin, qmax) - z_a) * s_a      (a_bits = 0: x_hat = x)
    W_hat = (q_w - z_w) * s_w
    y     = linear(x_hat, W_hat, b)   or   conv2d(x_hat, W_hat, b, stride, padding, dilation, groups)

The weight granularity is read from the shape of ``s_w``: a scalar is per-tensor, a vector
per output channel, a matrix ``(out, in / g)`` per group of ``g`` input elements. Ternary
weights (W1.58) are the same op with codes in {-1, 0, 1} and a per-channel ``s_w``.

With ``a_per_token`` the activation range is computed per token at run time, on the affine
``a_bits`` grid: ``[lo, hi] = c [min_token x, max_token x]``, ``s = (hi - lo) / (2^a - 1)``,
``z = round(qmin - lo / s)`` (``lo`` and ``hi`` first widened to contain 0). ``c`` is the
clipping ratio: ``s_a`` when given (a scalar learned by distillation), else 1; ``z_a`` is unused.

``ditq::hadamard(x, L, R)`` is an online rotation (RobuQ): ``y = x (L (x) R)^T`` along the
last dim, computed as ``L X R^T`` on ``x`` viewed as ``(..., |L|, |R|)``; either factor may be
None (identity). Lowering: Reshape, MatMul by the constant ``R^T``, MatMul by the constant
``L``, Reshape. It has a backward (the transposed rotation), so distillation trains through it.

The fake implementations only compute output shapes, so the ops trace under FakeTensor.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from ditq_compiler.quant import QuantSpec, dequantize, fake_quantize, fake_quantize_per_token
from ditq_compiler.quant.hadamard import rotate


def weight_spec_for(codes: Tensor, scale: Tensor, bits: int = 8) -> QuantSpec:
    """The QuantSpec whose qparams have the shape of ``scale`` (see module doc)."""
    if scale.dim() == 0:
        return QuantSpec(bits, True, "tensor")
    if scale.dim() == 1:
        return QuantSpec(bits, True, "channel", axis=0)
    return QuantSpec(bits, True, "group", group_size=codes.shape[-1] // scale.shape[-1])


def dequantize_weight(codes: Tensor, scale: Tensor, zero_point: Tensor) -> Tensor:
    return dequantize(codes, scale, zero_point, weight_spec_for(codes, scale))


def quantize_activation(x: Tensor, scale: Optional[Tensor], zero_point: Optional[Tensor], bits: int,
                        per_token: bool) -> Tensor:
    if bits == 0:
        return x
    if per_token:
        return fake_quantize_per_token(x, QuantSpec(bits, False, "token"), clip=scale)
    return fake_quantize(x, scale, zero_point, QuantSpec(bits, False, "tensor"))


@torch.library.custom_op("ditq::quant_linear", mutates_args=())
def quant_linear(x: Tensor, w_codes: Tensor, w_scale: Tensor, w_zero_point: Tensor, bias: Optional[Tensor],
                 a_scale: Optional[Tensor], a_zero_point: Optional[Tensor], a_bits: int,
                 a_per_token: bool) -> Tensor:
    x_hat = quantize_activation(x, a_scale, a_zero_point, a_bits, a_per_token)
    return F.linear(x_hat, dequantize_weight(w_codes, w_scale, w_zero_point).to(x.dtype), bias)


@quant_linear.register_fake
def _(x, w_codes, w_scale, w_zero_point, bias, a_scale, a_zero_point, a_bits, a_per_token):
    return x.new_empty((*x.shape[:-1], w_codes.shape[0]))


@torch.library.custom_op("ditq::quant_conv2d", mutates_args=())
def quant_conv2d(x: Tensor, w_codes: Tensor, w_scale: Tensor, w_zero_point: Tensor, bias: Optional[Tensor],
                 a_scale: Optional[Tensor], a_zero_point: Optional[Tensor], a_bits: int, a_per_token: bool,
                 stride: list[int], padding: list[int], dilation: list[int], groups: int) -> Tensor:
    if a_per_token:
        raise ValueError("ditq::quant_conv2d: per-token activations are defined for linears only")
    x_hat = quantize_activation(x, a_scale, a_zero_point, a_bits, False)
    weight = dequantize_weight(w_codes, w_scale, w_zero_point).to(x.dtype)
    return F.conv2d(x_hat, weight, bias, stride, padding, dilation, groups)


@quant_conv2d.register_fake
def _(x, w_codes, w_scale, w_zero_point, bias, a_scale, a_zero_point, a_bits, a_per_token,
      stride, padding, dilation, groups):
    return F.conv2d(x, w_codes.to(x.dtype), bias, stride, padding, dilation, groups)


@torch.library.custom_op("ditq::hadamard", mutates_args=())
def hadamard(x: Tensor, left: Optional[Tensor], right: Optional[Tensor]) -> Tensor:
    return rotate(x, left, right)


@hadamard.register_fake
def _(x, left, right):
    return torch.empty_like(x)


def _hadamard_setup(ctx, inputs, output):
    _, ctx.left, ctx.right = inputs


def _hadamard_backward(ctx, grad):
    # y = x M^T with M = L (x) R orthogonal, so dx = grad M = grad (L^T (x) R^T)^T
    left = None if ctx.left is None else ctx.left.T.contiguous()
    right = None if ctx.right is None else ctx.right.T.contiguous()
    return hadamard(grad, left, right), None, None


hadamard.register_autograd(_hadamard_backward, setup_context=_hadamard_setup)
