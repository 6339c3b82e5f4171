"""FP8 (e4m3) linear: ``torch._scaled_mm`` on the GPU, a pure-torch emulation on the CPU.

Math, with E = 448 (the largest finite ``float8_e4m3fn``) and ``fp8(v)`` the cast to e4m3
(round to nearest even; the values are clamped to [-E, E] first, so nothing saturates to NaN):

    weights      W (N, K) float:   s_w[n] = max_k |W[n, k]| / E,        W8 = fp8(W / s_w[:, None])
    activations  per token (dynamic):          s_a[m] = max_k |x[m, k]| / E
                 static (calibrated amax a):   s_a[m] = a / E, one value per tensor or per time group
                 X8 = fp8(clamp(x / s_a[:, None], -E, E))
    y[m, n]      = (sum_k X8[m, k] W8[n, k]) * s_a[m] * s_w[n] + b[n]

(a zero scale is floored at 1e-12 / E). On CUDA the sum runs in ``torch._scaled_mm`` with
row-wise scales (``scale_a`` (M, 1) and ``scale_b`` (1, N), fp32, contiguous; K and N multiples
of 16; bf16 output with a bf16 bias, then cast to x's dtype), which needs an SM 8.9+ GPU.
The emulation computes the same sum exactly in fp32 (each product of two e4m3 values is exact
in fp32) from the dequantized codes.

``fp8_linear`` is plain torch code, not an opaque operator: ``torch.compile`` traces it, so the
activation quantization (an amax over each row, a division, a cast) fuses into the kernel that
produces ``x`` and ``_scaled_mm`` is lowered by Inductor itself.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ditq_compiler.activation_ops import select_rows
from ditq_compiler.kernels import triton_w8a8
from ditq_compiler.kernels.device import needs_cuda

FP8 = torch.float8_e4m3fn
E4M3_MAX = 448.0
MIN_AMAX = 1e-12


def scale_from_amax(amax: Tensor) -> Tensor:
    """fp32 ``max(amax, 1e-12) / 448``."""
    return amax.to(torch.float32).clamp_min(MIN_AMAX) / E4M3_MAX


def to_fp8(values: Tensor, scale: Tensor) -> Tensor:
    """``fp8(clamp(values / scale, -448, 448))``, computed in fp32; ``scale`` broadcasts against ``values``."""
    return (values.to(torch.float32) / scale).clamp(-E4M3_MAX, E4M3_MAX).to(FP8)


def quantize_weight(weight: Tensor) -> tuple[Tensor, Tensor]:
    """A float (N, K) weight as e4m3 codes (N, K) and per-output-channel fp32 scales (N,)."""
    scale = scale_from_amax(weight.detach().abs().amax(dim=1))
    return to_fp8(weight.detach(), scale[:, None]).contiguous(), scale.contiguous()


def activation_scales(x2d: Tensor, x: Tensor, a_scale: Optional[Tensor], group: Optional[Tensor]) -> Tensor:
    """Each row's fp32 scale, shape (M, 1): per token from its amax (``a_scale`` None), or the calibrated
    table ``a_scale`` (one entry per time group, ``group`` picking each sample's; see ``rows``)."""
    if a_scale is None:
        return scale_from_amax(x2d.abs().amax(dim=1, keepdim=True))
    per_sample = select_rows(a_scale, group, x).to(torch.float32)
    return per_sample.expand(*x.shape[:-1], 1).reshape(-1, 1).contiguous()


def emulated_scaled_mm(x8: Tensor, w8: Tensor, scale_a: Tensor, scale_b: Tensor, bias: Optional[Tensor]) -> Tensor:
    """fp32 ``(x8 @ w8^T) * scale_a * scale_b + bias``: ``_scaled_mm``'s arithmetic on dequantized codes."""
    y = (x8.to(torch.float32) @ w8.to(torch.float32).t()) * scale_a * scale_b
    return y if bias is None else y + bias.to(torch.float32)


def fp8_linear(x: Tensor, w_fp8: Tensor, w_scale: Tensor, bias: Optional[Tensor], a_scale: Optional[Tensor],
               group: Optional[Tensor], layer: str) -> Tensor:
    """The FP8 linear of the module doc: ``x`` (..., K) float, ``w_fp8`` (N, K) e4m3, ``w_scale`` (N,) fp32,
    ``a_scale`` None (dynamic per token) or a 1-D table of static scales. Returns x's dtype."""
    if not x.is_cuda and not triton_w8a8.INTERPRETED:
        raise needs_cuda(layer, x)
    x2d = x.reshape(-1, x.shape[-1])
    scale_a = activation_scales(x2d, x, a_scale, group)
    x8 = to_fp8(x2d, scale_a)
    if x.is_cuda:
        y = torch._scaled_mm(x8, w_fp8.t(), scale_a=scale_a, scale_b=w_scale.reshape(1, -1),
                             bias=None if bias is None else bias.to(torch.bfloat16), out_dtype=torch.bfloat16)
    else:
        y = emulated_scaled_mm(x8, w_fp8, scale_a, w_scale.reshape(1, -1), bias)
    return y.to(x.dtype).reshape(*x.shape[:-1], w_fp8.shape[0])


__all__ = ["E4M3_MAX", "FP8", "activation_scales", "emulated_scaled_mm", "fp8_linear", "quantize_weight",
           "scale_from_amax", "to_fp8"]
