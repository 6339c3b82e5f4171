"""1-bit weights and activations (W1A1): the binarizers of BiDM+ and its baselines, as ``ditq::`` ops.

A binarized linear or conv computes (BiDM+ Eqs. 12-15; XNOR-Net for the shapes of the scales)

    x_b = sign(x - tau_x)              per input channel, sign(0) = +1  (stored as the bit ``x < tau_x``)
    w_b = sign(w - tau_w)              per output channel; tau_w is merged into the stored bits
    acc = x_b (*) w_b                  integers in [-K, K]: K - 2 popcount(x_bits xor w_bits)
    y   = acc * a(x) * sigma + b       linear: a per token;  conv: a = A(x) * k, a map per output pixel

with ``sigma`` the weight scale per output channel (``mean |w - tau_w|``, times the learned ``k`` for a linear)
and the activation scale

    A(x) = mean over channels of |x|                                                   "mean_abs" (XNOR-Net)
    A(x) = mean over channels of |clip(x_c, mu_min_c min(x_c), mu_max_c max(x_c))|      "clipped"  (FPB, Eq. 14)

(min / max of each channel over the sample's tokens or pixels). Eq. 14 writes ``mean(clip(...))`` without the
absolute value; we read it with the one of Eq. 12's ``A`` (and XNOR-Net), since a mean of signed values can
vanish or change sign and a scale cannot. For a conv, ``A`` is a map over pixels convolved with the
``kh x kw`` filter ``k`` (stride, padding and dilation of the conv), so each output pixel is scaled by the mean
activation magnitude under its window.

The three binarizers (``QuantSpec.binarizer``):

    xnor   tau_w = tau_x = 0, k = 1 / (kh kw) fixed, A = mean_abs                      (XNOR-Net)
    react  as xnor with a learnable per-channel tau_x                                   (ReActNet's RSign)
    fpb    learnable tau_w, k (init 1 / (kh kw)), tau_x, mu_min and mu_max (init 1), A = clipped   (BiDM+ FPB)

The products are integers, so the float reference below is exact for them; its epilogue runs in the order
``((acc * a) * sigma) + b`` in float32 so that the popcount kernel (``kernels/binary_cpu``) can match it bit
for bit. Weight bits are stored as uint8 0/1 (1 = negative): one bit each in an artifact.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

BINARIZERS = ("xnor", "react", "fpb")
SCALE_MODES = {"none": 0, "mean_abs": 1, "clipped": 2}
TINY = 1e-12


def signs(x: Tensor, tau: Tensor | None) -> Tensor:
    """sign(x - tau) with sign(0) = +1, as floats +-1 (tau along the channel dim: last for a linear, 1 for a
    conv, whichever matches ``tau``'s length)."""
    if tau is None:
        return torch.where(x >= 0, 1.0, -1.0).to(x.dtype)
    return torch.where(x >= _along(tau, x), 1.0, -1.0).to(x.dtype)


def _along(v: Tensor, x: Tensor) -> Tensor:
    """A per-channel vector shaped to broadcast over ``x`` (channels last, or dim 1 of a 4-D conv input)."""
    if x.dim() == 4:
        return v.reshape(1, -1, 1, 1)
    return v


def weight_signs(bits: Tensor) -> Tensor:
    """Stored weight bits (1 = negative) as +-1 floats."""
    return 1.0 - 2.0 * bits.to(torch.float32)


def activation_scale(x: Tensor, mode: int, mu_min: Tensor | None = None, mu_max: Tensor | None = None) -> Tensor:
    """A(x): per token (``x`` (..., C) -> (..., 1)) or per pixel (``x`` (B, C, H, W) -> (B, 1, H, W))."""
    if mode == SCALE_MODES["none"]:
        shape = (*x.shape[:-1], 1) if x.dim() != 4 else (x.shape[0], 1, *x.shape[2:])
        return torch.ones(shape, dtype=x.dtype, device=x.device)
    channel = 1 if x.dim() == 4 else -1
    if mode == SCALE_MODES["clipped"]:
        x = clip_channels(x, mu_min, mu_max)
    return x.abs().mean(dim=channel, keepdim=True)


def clip_channels(x: Tensor, mu_min: Tensor, mu_max: Tensor) -> Tensor:
    """clip(x_c, mu_min_c min(x_c), mu_max_c max(x_c)), min / max per sample and channel over tokens or pixels."""
    if x.dim() == 4:
        lo, hi = x.amin(dim=(2, 3), keepdim=True), x.amax(dim=(2, 3), keepdim=True)
    elif x.dim() >= 3:
        lo, hi = x.amin(dim=tuple(range(1, x.dim() - 1)), keepdim=True), \
            x.amax(dim=tuple(range(1, x.dim() - 1)), keepdim=True)
    else:
        lo, hi = x, x
    lo, hi = lo * _along(mu_min, x), hi * _along(mu_max, x)
    return torch.minimum(torch.maximum(x, lo), hi)


def conv_activation_scale(x: Tensor, k: Tensor, mode: int, mu_min: Tensor | None, mu_max: Tensor | None,
                          stride: list[int], padding: list[int], dilation: list[int]) -> Tensor:
    """A conv's scale map ``conv2d(A(x), k)``, ``(B, 1, OH, OW)``: the mean activation magnitude under each output
    pixel's window, weighted by ``k`` (zero padding counts 0). Shared by the reference and ``cpu-binary``."""
    return F.conv2d(activation_scale(x, mode, mu_min, mu_max), k.reshape(1, 1, *k.shape).to(x.dtype), None,
                    stride, padding, dilation)


def binary_linear_reference(x: Tensor, w_bits: Tensor, w_scale: Tensor, tau: Optional[Tensor],
                            mu_min: Optional[Tensor], mu_max: Optional[Tensor], mode: int,
                            bias: Optional[Tensor]) -> Tensor:
    acc = F.linear(signs(x, tau), weight_signs(w_bits).to(x.dtype))          # exact integers in float
    y = acc * activation_scale(x, mode, mu_min, mu_max) * w_scale
    return y + bias if bias is not None else y


def binary_conv2d_reference(x: Tensor, w_bits: Tensor, w_scale: Tensor, k: Tensor, tau: Optional[Tensor],
                            mu_min: Optional[Tensor], mu_max: Optional[Tensor], mode: int, bias: Optional[Tensor],
                            stride: list[int], padding: list[int], dilation: list[int], groups: int) -> Tensor:
    acc = F.conv2d(signs(x, tau), weight_signs(w_bits).to(x.dtype), None, stride, padding, dilation, groups)
    scale = conv_activation_scale(x, k, mode, mu_min, mu_max, stride, padding, dilation)
    y = acc * scale * w_scale.reshape(1, -1, 1, 1)
    return y + bias.reshape(1, -1, 1, 1) if bias is not None else y


@torch.library.custom_op("ditq::binary_linear", mutates_args=())
def binary_linear(x: Tensor, w_bits: Tensor, w_scale: Tensor, tau: Optional[Tensor], mu_min: Optional[Tensor],
                  mu_max: Optional[Tensor], mode: int, bias: Optional[Tensor]) -> Tensor:
    return binary_linear_reference(x, w_bits, w_scale, tau, mu_min, mu_max, mode, bias)


@binary_linear.register_fake
def _(x, w_bits, w_scale, tau, mu_min, mu_max, mode, bias):
    return x.new_empty((*x.shape[:-1], w_bits.shape[0]))


@torch.library.custom_op("ditq::binary_conv2d", mutates_args=())
def binary_conv2d(x: Tensor, w_bits: Tensor, w_scale: Tensor, k: Tensor, tau: Optional[Tensor],
                  mu_min: Optional[Tensor], mu_max: Optional[Tensor], mode: int, bias: Optional[Tensor],
                  stride: list[int], padding: list[int], dilation: list[int], groups: int) -> Tensor:
    return binary_conv2d_reference(x, w_bits, w_scale, k, tau, mu_min, mu_max, mode, bias, stride, padding,
                                   dilation, groups)


@binary_conv2d.register_fake
def _(x, w_bits, w_scale, k, tau, mu_min, mu_max, mode, bias, stride, padding, dilation, groups):
    return F.conv2d(x, w_bits.to(x.dtype), None, stride, padding, dilation, groups)


__all__ = ["BINARIZERS", "SCALE_MODES", "activation_scale", "binary_conv2d", "binary_conv2d_reference",
           "binary_linear", "binary_linear_reference", "clip_channels", "conv_activation_scale", "signs",
           "weight_signs"]
