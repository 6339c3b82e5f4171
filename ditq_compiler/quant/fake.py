"""Quantize, dequantize and fake-quantize on a signed integer grid.

Grid (see QuantSpec): codes q are integers in [qmin, qmax] = [-2**(b-1), 2**(b-1) - 1] for both
modes, and

    quantize(x)   = clamp(round(x / s) + z, qmin, qmax)          (int8 tensor; round half to even)
    dequantize(q) = (q - z) * s                                  (float32)
    fake_quantize(x) = dequantize(quantize(x)), computed in float with a straight-through estimator

Parameters from a range [lo, hi] (qparams_from_range, elementwise):

    symmetric:  z = 0,  s = max(|lo|, |hi|) / qmax
    affine:     lo <- min(lo, 0), hi <- max(hi, 0)               (the range always contains 0)
                s = (hi - lo) / (qmax - qmin),  z = clamp(round(qmin - lo / s), qmin, qmax)

    s is floored at SCALE_EPS so an all-zero range does not divide by zero.
In both modes 0.0 is exactly on the grid (code z), so fake_quantize(0) == 0 exactly; every x in
[lo, hi] is reproduced to within s / 2.

Shapes of (scale, zero_point) per granularity, for x of shape (d0, ..., dn):

    tensor   ()                                   used as is
    channel  (x.shape[axis],)                     viewed as [1, .., C, .., 1] to broadcast
    token    x.shape[:-1]  (or with a trailing 1) one pair per row of the last dim
    group    x.shape[:-1] + (dn // g,)            x viewed as (..., dn // g, g), pairs get a trailing 1

Straight-through estimator (fake_quantize):

    round_ste(v) = v + (round(v) - v).detach()    forward round(v), gradient 1
    d out / d x  = 1 where round(x/s) + z lies in [qmin, qmax], else 0 (the clamp)
    d out / d s  = round(x/s) - x/s inside, (qmin - z) or (qmax - z) where clamped   (LSQ)
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from ditq_compiler.quant.spec import QuantSpec

SCALE_EPS = 1e-12

_QParamsFn = Callable[[Tensor, Tensor, Tensor], Tensor]


def qparams_from_range(lo: Tensor, hi: Tensor, spec: QuantSpec) -> tuple[Tensor, Tensor]:
    """(scale float32, zero_point int32) for the range [lo, hi], elementwise (any shape)."""
    lo = torch.as_tensor(lo, dtype=torch.float32)
    hi = torch.as_tensor(hi, dtype=torch.float32, device=lo.device)
    if lo.shape != hi.shape:
        raise ValueError(f"qparams_from_range: lo {tuple(lo.shape)} and hi {tuple(hi.shape)} differ in shape")
    if bool((lo > hi).any()):
        raise ValueError("qparams_from_range: lo > hi somewhere")
    if spec.symmetric:
        amax = torch.maximum(lo.abs(), hi.abs())
        scale = (amax / spec.qmax).clamp_min(SCALE_EPS)
        return scale, torch.zeros_like(scale, dtype=torch.int32)
    lo, hi = lo.clamp(max=0.0), hi.clamp(min=0.0)
    scale = ((hi - lo) / (spec.qmax - spec.qmin)).clamp_min(SCALE_EPS)
    zero_point = torch.round(spec.qmin - lo.detach() / scale.detach()).clamp(spec.qmin, spec.qmax)
    return scale, zero_point.to(torch.int32)


def split_groups(x: Tensor, group_size: int) -> Tensor:
    """View the last dim of x as (n_groups, group_size)."""
    if x.dim() == 0 or x.shape[-1] % group_size != 0:
        last = x.shape[-1] if x.dim() else None
        raise ValueError(f"QuantSpec.group_size={group_size} does not divide the last dim ({last}) "
                         f"of a tensor of shape {tuple(x.shape)}")
    return x.reshape(*x.shape[:-1], x.shape[-1] // group_size, group_size)


def _check_qparams_shape(x: Tensor, scale: Tensor, zero_point: Tensor, expected: tuple[int, ...],
                         spec: QuantSpec) -> None:
    for name, value in (("scale", scale), ("zero_point", zero_point)):
        if tuple(value.shape) != expected:
            raise ValueError(f"{spec.describe()}: {name} has shape {tuple(value.shape)}, expected {expected} "
                             f"for a tensor of shape {tuple(x.shape)}")


def broadcast_qparams(x: Tensor, scale: Tensor, zero_point: Tensor, spec: QuantSpec) -> tuple[Tensor, Tensor]:
    """Reshape (scale, zero_point) so they broadcast elementwise against x.

    Per-group qparams (..., n_groups) are repeated group_size times along the last dim, giving
    x's own shape; quantize() and friends use the cheaper grouped view instead.
    """
    if spec.granularity == "tensor":
        if scale.numel() != 1 or zero_point.numel() != 1:
            raise ValueError(f"{spec.describe()}: expected one scale / zero_point, got {scale.numel()}")
        return scale, zero_point
    if spec.granularity == "channel":
        if x.dim() == 0 or not -x.dim() <= spec.axis < x.dim():
            raise ValueError(f"QuantSpec.axis={spec.axis} is out of range for a tensor of shape {tuple(x.shape)}")
        axis = spec.axis % x.dim()
        _check_qparams_shape(x, scale, zero_point, (x.shape[axis],), spec)
        view = [1] * x.dim()
        view[axis] = -1
        return scale.reshape(view), zero_point.reshape(view)
    if spec.granularity == "token":
        if tuple(scale.shape) == tuple(x.shape[:-1]):
            scale, zero_point = scale.unsqueeze(-1), zero_point.unsqueeze(-1)
        _check_qparams_shape(x, scale, zero_point, (*x.shape[:-1], 1), spec)
        return scale, zero_point
    groups = split_groups(x, spec.group_size).shape[:-1]
    _check_qparams_shape(x, scale, zero_point, tuple(groups), spec)
    return (scale.repeat_interleave(spec.group_size, dim=-1),
            zero_point.repeat_interleave(spec.group_size, dim=-1))


def _per_granularity(x: Tensor, scale: Tensor, zero_point: Tensor, spec: QuantSpec, fn: _QParamsFn) -> Tensor:
    """fn(values, scale float32, zero_point float32) with qparams broadcast against values."""
    if spec.granularity == "group":
        grouped = split_groups(x, spec.group_size)
        _check_qparams_shape(x, scale, zero_point, tuple(grouped.shape[:-1]), spec)
        out = fn(grouped, scale.to(torch.float32).unsqueeze(-1), zero_point.to(torch.float32).unsqueeze(-1))
        return out.reshape(x.shape)
    scale, zero_point = broadcast_qparams(x, scale, zero_point, spec)
    return fn(x, scale.to(torch.float32), zero_point.to(torch.float32))


def round_ste(v: Tensor) -> Tensor:
    """round(v) in the forward pass, identity in the backward pass."""
    return v + (v.round() - v).detach()


def quantize(x: Tensor, scale: Tensor, zero_point: Tensor, spec: QuantSpec) -> Tensor:
    """int8 codes clamp(round(x / s) + z, qmin, qmax)."""
    def codes(values: Tensor, s: Tensor, z: Tensor) -> Tensor:
        q = torch.round(values.to(torch.float32) / s) + z
        return q.clamp(spec.qmin, spec.qmax).to(torch.int8)

    return _per_granularity(x, scale, zero_point, spec, codes)


def dequantize(codes: Tensor, scale: Tensor, zero_point: Tensor, spec: QuantSpec) -> Tensor:
    """float32 (q - z) * s."""
    return _per_granularity(codes, scale, zero_point, spec,
                            lambda q, s, z: (q.to(torch.float32) - z) * s)


def fake_quantize(x: Tensor, scale: Tensor, zero_point: Tensor, spec: QuantSpec) -> Tensor:
    """dequantize(quantize(x)) in float, differentiable through the STE (to x, and to scale).

    Computed in float32; the result is cast back to x's floating dtype.
    """
    def quantize_dequantize(values: Tensor, s: Tensor, z: Tensor) -> Tensor:
        q = torch.clamp(round_ste(values.to(torch.float32) / s) + z, spec.qmin, spec.qmax)
        return (q - z) * s

    out = _per_granularity(x, scale, zero_point, spec, quantize_dequantize)
    return out.to(x.dtype) if x.is_floating_point() else out


def fake_quantize_per_token(x: Tensor, spec: QuantSpec, clip: Tensor | None = None) -> Tensor:
    """Dynamic per-token fake quantization: each row of the last dim gets qparams from its own min / max.

    ``clip`` (a scalar, default 1) shrinks every token's range to ``[clip * min, clip * max]``: a
    learned clipping ratio (distillation learns it; values beyond the range saturate). The min / max
    are constants for autograd; the gradient reaches x by the plain STE and ``clip`` through the
    scale (LSQ).
    """
    if spec.granularity != "token":
        raise ValueError(f"fake_quantize_per_token needs granularity='token', got {spec.granularity!r}")
    lo, hi = torch.aminmax(x.detach().to(torch.float32), dim=-1)
    if clip is not None:
        lo, hi = lo * clip, hi * clip
    scale, zero_point = qparams_from_range(lo, hi, spec)
    return fake_quantize(x, scale, zero_point, spec)


def sqnr_db(reference: Tensor, test: Tensor) -> float:
    """Signal-to-quantization-noise ratio 10 log10(sum ref^2 / sum (ref - test)^2), in float64.

    inf when test == reference; -inf when the reference is all zero but the test is not.
    """
    if reference.shape != test.shape:
        raise ValueError(f"sqnr_db: shapes differ, {tuple(reference.shape)} vs {tuple(test.shape)}")
    ref = reference.detach().to(torch.float64)
    noise = (ref - test.detach().to(device=ref.device, dtype=torch.float64)).square().sum().item()
    signal = ref.square().sum().item()
    if noise == 0.0:
        return math.inf
    if signal == 0.0:
        return -math.inf
    return 10.0 * math.log10(signal / noise)
