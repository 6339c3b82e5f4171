"""Orthonormal Hadamard matrices of any width that has one we can build, as Kronecker factors.

A Hadamard matrix ``H`` of order ``n`` has entries +-1 and ``H H^T = n I``; ``H / sqrt(n)`` is a
rotation. RobuQ (and QuaRot before it) rotates activations by it before quantizing them: every
rotated channel is a +-1/sqrt(n) mix of ALL input channels, so one outlier channel is spread
evenly over the whole token and, by the central limit theorem, each token's values become close to
normal, which a per-token quantizer at 2-4 bits handles well.

Construction (``hadamard_factors(n)`` returns ``(L, R)`` with ``H_n / sqrt(n) = L (x) R``):

* ``n = 2^k``: Sylvester's ``H_{2^k} = H_2 (x) ... (x) H_2``, split as ``H_{2^a} (x) H_{2^b}``
  with ``a`` close to ``k/2`` (both even when ``k`` is). The product is Sylvester's ``H_n``.
* ``n = m 2^j`` with ``m`` an order that Paley's constructions give over a prime field:
  Paley I, ``m = q + 1`` for a prime ``q = 3 (mod 4)`` (12, 20, 24, 44, 48, 60, 72, ...), or
  Paley II, ``m = 2 (q + 1)`` for a prime ``q = 1 (mod 4)`` (12, 28, 36, 60, 76, ...). Then
  ``H_n = H_m (x) H_{2^j}`` (Kronecker products of Hadamard matrices are Hadamard). DiT-XL's
  widths: ``1152 = 36 * 32``, ``4608 = 36 * 128``, head dim ``72 = 36 * 2``.

Signs. A normalised Hadamard matrix has a row of ones, so the token's mean lands in ONE rotated
channel as ``sqrt(n) * mean(x)``: an outlier the rotation itself creates (post-GELU inputs of
fc2 have a clearly positive mean; on dit-digits plain Sylvester rotation cost fc2 5 dB of A4
SQNR). Flipping the signs of the columns, ``H diag(s)``, keeps a Hadamard matrix and spreads the
mean over all channels (QuaRot's randomised Hadamard). We flip each factor's columns,
``L diag(a) (x) R diag(b) = (L (x) R) diag(a (x) b)``, so the online op keeps its two constant
blocks, with ``a`` chosen (deterministically) to make ``L a`` as flat as possible: the mean then
spreads evenly (exactly evenly where a bent sign vector exists, e.g. orders 4^k).

Why Kronecker and not block-diagonal (``I_{n/b} (x) H_b``): the Kronecker product is a true
Hadamard matrix of order ``n``, so an outlier in any channel is spread over all ``n`` channels of
the token. A block-diagonal rotation mixes only within blocks of ``b``; a token whose outlier
sits in one block keeps that block's large values, and the per-token scale (one per token, over
all blocks) stays as coarse as without the rotation for the other blocks. The Kronecker form is
also cheap online: on ``x`` viewed as ``(..., |L|, |R|)`` it is ``L X R^T``, two small matmuls,
``n (|L| + |R|)`` multiply-adds per token (1152: 68 per channel, against 1152 for a dense one).
Widths with no construction here (odd widths, or odd parts no Paley order covers) raise
``ValueError``; the caller names the layer.
"""

from __future__ import annotations

import math
from functools import lru_cache

import torch
from torch import Tensor


def _is_prime(q: int) -> bool:
    return q >= 2 and all(q % p for p in range(2, math.isqrt(q) + 1))


def _jacobsthal(q: int) -> Tensor:
    """Q[i, j] = chi(j - i) over GF(q), chi the quadratic character (chi(0) = 0)."""
    squares = {(x * x) % q for x in range(1, q)}
    chi = torch.tensor([0] + [1 if d in squares else -1 for d in range(1, q)], dtype=torch.float64)
    index = (torch.arange(q).reshape(1, -1) - torch.arange(q).reshape(-1, 1)) % q
    return chi[index]


def _paley_1(q: int) -> Tensor:
    """Order q + 1 for a prime q = 3 mod 4: H = I + S, S = [[0, 1^T], [-1, Q]] skew."""
    s = torch.zeros(q + 1, q + 1, dtype=torch.float64)
    s[0, 1:], s[1:, 0], s[1:, 1:] = 1, -1, _jacobsthal(q)
    return torch.eye(q + 1, dtype=torch.float64) + s


def _paley_2(q: int) -> Tensor:
    """Order 2 (q + 1) for a prime q = 1 mod 4, from the symmetric conference matrix C = [[0, 1^T], [1, Q]]:
    zeros become [[1, -1], [-1, -1]], +-1 entries become +-[[1, 1], [1, -1]]."""
    c = torch.zeros(q + 1, q + 1, dtype=torch.float64)
    c[0, 1:], c[1:, 0], c[1:, 1:] = 1, 1, _jacobsthal(q)
    one = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
    zero = torch.tensor([[1.0, -1.0], [-1.0, -1.0]], dtype=torch.float64)
    return torch.kron(c, one) + torch.kron((c == 0).double(), zero)


def _sylvester(n: int) -> Tensor:
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.kron(torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64), h)
    return h


def _paley(m: int) -> Tensor | None:
    if m % 4:
        return None
    if _is_prime(m - 1) and (m - 1) % 4 == 3:
        return _paley_1(m - 1)
    if _is_prime(m // 2 - 1) and (m // 2 - 1) % 4 == 1:
        return _paley_2(m // 2 - 1)
    return None


SIGN_CANDIDATES = 4096


def _flatten_mean(h: Tensor) -> Tensor:
    """``h diag(a)`` with the sign vector ``a`` that makes ``h a`` (where the mean goes) flattest.

    Exhaustive up to order 16; else the best of SIGN_CANDIDATES seeded draws (deterministic).
    """
    m = h.shape[0]
    if m == 1:
        return h
    if m <= 16:
        codes = torch.arange(2 ** m).reshape(-1, 1)
        signs = 1.0 - 2.0 * ((codes >> torch.arange(m)) & 1).double()
    else:
        generator = torch.Generator().manual_seed(m)
        signs = 1.0 - 2.0 * torch.randint(0, 2, (SIGN_CANDIDATES, m), generator=generator).double()
        half = (m.bit_length() - 1) // 2
        if m == 4 ** half:   # Maiorana-McFarland bent vector (-1)^(x . y): flat under Sylvester's matrix
            i = torch.arange(m)
            bent = 1.0 - 2.0 * _popcount_parity((i >> half) & i & (2 ** half - 1)).double()
            signs = torch.cat([bent.reshape(1, -1), signs])
    peak = (signs @ h.T).abs().amax(dim=1)
    return h * signs[int(torch.argmin(peak))].reshape(1, -1)


def _popcount_parity(v: Tensor) -> Tensor:
    parity = torch.zeros_like(v)
    while bool(v.any()):
        parity ^= v & 1
        v = v >> 1
    return parity


@lru_cache(maxsize=None)
def _factors(n: int) -> tuple[Tensor, Tensor]:
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"a Hadamard rotation needs a positive integer width, got {n!r}")
    power = (n & -n)          # largest power of two dividing n
    odd = n // power
    if odd == 1:
        k = power.bit_length() - 1
        a = 2 * (k // 4) if k % 2 == 0 else k // 2      # even exponents (orders 4^j, flat signs) when possible
        left, right = _sylvester(2 ** a), _sylvester(2 ** (k - a))
    else:
        m = odd * 4
        while m <= n and n % m == 0 and _paley(m) is None:
            m *= 2
        if m > n or n % m:
            raise ValueError(f"no Hadamard matrix of order {n} can be built here (n = {odd} x {power}: needs a "
                             f"Paley order {odd} x 2^j with j >= 2 dividing n)")
        left, right = _paley(m), _sylvester(n // m)
    return _flatten_mean(left / math.sqrt(left.shape[0])), _flatten_mean(right / math.sqrt(right.shape[0]))


def hadamard_factors(n: int, dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor]:
    """(L, R) orthonormal with ``L (x) R`` an orthonormal Hadamard matrix of order n, column signs
    chosen to spread the mean (see module doc)."""
    left, right = _factors(n)
    return left.to(dtype), right.to(dtype)


def hadamard_matrix(n: int, dtype: torch.dtype = torch.float64) -> Tensor:
    """The dense orthonormal Hadamard matrix ``L (x) R`` of order n (for offline fusion into weights)."""
    left, right = _factors(n)
    return torch.kron(left, right).to(dtype)


def describe(n: int) -> str:
    """e.g. 'H128 = H8 x H16', 'H1152 = H36 x H32'."""
    left, right = _factors(n)
    return f"H{n} = H{left.shape[0]} x H{right.shape[0]}"


def rotate(x: Tensor, left: Tensor | None, right: Tensor | None) -> Tensor:
    """``x (L (x) R)^T`` along the last dim, as ``L X R^T`` on x viewed as (..., |L|, |R|); None = identity."""
    n = x.shape[-1]
    a = left.shape[0] if left is not None else n // right.shape[0]
    b = right.shape[0] if right is not None else n // a
    if a * b != n:
        raise ValueError(f"rotation blocks {a} x {b} do not tile the last dim {n} of a tensor of shape "
                         f"{tuple(x.shape)}")
    y = x.reshape(*x.shape[:-1], a, b)
    if right is not None:
        y = y @ right.to(x.dtype).T
    if left is not None:
        y = left.to(x.dtype) @ y
    return y.reshape(x.shape)
