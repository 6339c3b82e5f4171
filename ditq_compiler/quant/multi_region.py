"""Multi-region quantizers (TQ-DiT MRQ, Sec. III-C, after PTQ4ViT's twin uniform quantization).

Both spend the k bits as one region bit and k-1 bits of code, n = 2^(k-1) levels per region.

Post-softmax (values in [0, 1], concentrated near 0). Regions R1 = [0, n s1) and R2 = [n s1, 1],
with the searched step ``s1`` (0 < s1 <= 1/n) and the fixed step s2 = 1/n:

    q(x) = s1 * clamp(round(x / s1), 0, n - 1)              if x < n s1        (R1: levels 0, s1, .., (n-1) s1)
    q(x) = s2 * clamp(round(x / s2), c0, n),  c0 = ceil(n s1 / s2)   otherwise  (R2: the multiples of s2 in R2)

R2's levels are the multiples of s2 that lie in R2 (c0 = ceil(n^2 s1) >= 1), so every R1 level is below
every R2 level and q is monotone; there are at most n of them, so the code fits in k - 1 bits
(stored as c - 1). Errors: |q(x) - x| <= s1 / 2 on [0, (n - 1/2) s1], < s1 on the rest of R1,
<= s2 / 2 on R2 above c0 s2 - s2 / 2, < s2 just above the split. A two-region quantizer is lowered as
two Q/DQ branches selected by ``x < n s1`` (or two GEMMs, P1 V + P2 V).

Post-GELU (a long positive tail, a short negative one down to about -0.17): a signed k-bit code
c in [-n, n - 1] with a separate step for each sign,

    q(x) = s_neg * clamp(round(x / s_neg), -n, 0) + s_pos * clamp(round(x / s_pos), 0, n - 1)

(each term is 0 on the other sign, so this is an exact sum of two uniform quantizers: two Q/DQ and
an Add). Errors: <= s_neg / 2 on [-n s_neg, 0], <= s_pos / 2 on [0, (n - 1) s_pos].

Steps may be tensors that broadcast against x (one step per sample for time-grouped quantizers,
one per candidate during the scale search). Arithmetic is float32, like ``fake_quantize``.
"""

from __future__ import annotations

import torch
from torch import Tensor


def levels(bits: int) -> int:
    """n = 2^(k-1): levels per region."""
    if not isinstance(bits, int) or not 2 <= bits <= 8:
        raise ValueError(f"multi-region quantizers take 2..8 bits, got {bits!r}")
    return 2 ** (bits - 1)


def softmax_fixed_step(bits: int) -> float:
    """s2 = 1 / 2^(k-1), the step of the upper post-softmax region."""
    return 1.0 / levels(bits)


def softmax_two_region(x: Tensor, s1: Tensor | float, bits: int) -> Tensor:
    """The post-softmax quantizer above; ``s1`` is clamped to (0, 1/n]."""
    n = levels(bits)
    s2 = 1.0 / n
    x32 = x.to(torch.float32)
    s1 = torch.as_tensor(s1, dtype=torch.float32, device=x.device).clamp(torch.finfo(torch.float32).tiny, s2)
    split = n * s1
    low = (x32 / s1).round_().clamp_(0, n - 1).mul_(s1)
    first_high = torch.ceil(split * n)   # c0 = ceil(n s1 / s2), exact: n and 1/s2 are powers of two
    high = torch.maximum((x32 / s2).round_(), first_high).clamp_(max=n).mul_(s2)
    return torch.where(x32 < split, low, high).to(x.dtype)


def gelu_two_region(x: Tensor, s_neg: Tensor | float, s_pos: Tensor | float, bits: int) -> Tensor:
    """The post-GELU quantizer above."""
    n = levels(bits)
    x32 = x.to(torch.float32)
    tiny = torch.finfo(torch.float32).tiny
    s_neg = torch.as_tensor(s_neg, dtype=torch.float32, device=x.device).clamp_min(tiny)
    s_pos = torch.as_tensor(s_pos, dtype=torch.float32, device=x.device).clamp_min(tiny)
    negative = (x32 / s_neg).round_().clamp_(-n, 0).mul_(s_neg)
    positive = (x32 / s_pos).round_().clamp_(0, n - 1).mul_(s_pos)
    return negative.add_(positive).to(x.dtype)


def uniform(x: Tensor, scale: Tensor, zero_point: Tensor, bits: int) -> Tensor:
    """``fake_quantize`` on the signed k-bit grid with broadcastable (scale, zero_point): the same float32
    arithmetic, so one row of a time-group table reproduces the per-tensor quantizer exactly."""
    qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    s, z = scale.to(torch.float32), zero_point.to(torch.float32)
    q = (x.to(torch.float32) / s).round_().add_(z).clamp_(qmin, qmax)
    return q.sub_(z).mul_(s).to(x.dtype)


__all__ = ["gelu_two_region", "levels", "softmax_fixed_step", "softmax_two_region", "uniform"]
