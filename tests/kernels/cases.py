"""Inputs for the cuda backend's kernels and their exact references, shared by the interpreter tests and
the GPU test that compares the compiled kernel with the interpreter (deterministic on any device).

Exact references are integer arithmetic in int64, with the epilogue in float64.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

# (M, N, K): odd sizes that leave partial tiles in every dimension, and 1s
SHAPES = [(1, 7, 33), (7, 33, 65), (65, 1, 7), (33, 65, 1), (65, 65, 65)]


@dataclass
class Int8Case:
    """One call of the W8A8 kernel: x (B, R, K) float, weight codes (N, K), the activation tables and group."""

    x: Tensor
    w_codes: Tensor
    w_scale: Tensor
    bias: Optional[Tensor]
    a_scale: Tensor          # 1-D table, one entry per time group
    a_zero_point: Tensor
    group: Optional[Tensor]
    a_bits: int = 8

    def to(self, device) -> "Int8Case":
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return Int8Case(move(self.x), move(self.w_codes), move(self.w_scale), move(self.bias), move(self.a_scale),
                        move(self.a_zero_point), move(self.group), self.a_bits)

    @property
    def w_colsum(self) -> Tensor:
        return self.w_codes.int().sum(1, dtype=torch.int32)

    def args(self, layer: str = "test.layer") -> tuple:
        return (self.w_codes, self.w_scale, self.w_colsum, self.bias, self.a_scale, self.a_zero_point, self.group,
                self.a_bits)

    def rows(self) -> tuple[Tensor, Tensor]:
        """Each row's (s_a, z_a), shape (B, R, 1), as the reference quantizer picks them."""
        b = self.x.shape[0]
        if self.group is None:
            index = torch.zeros(b, dtype=torch.long)
        else:
            index = self.group.reshape(-1).long().expand(b) if self.group.numel() == 1 else self.group.long()
        return self.a_scale[index].view(b, 1, 1), self.a_zero_point[index].view(b, 1, 1)

    def codes(self) -> Tensor:
        """The activation codes clamp(round(x / s) + z) of the reference (fp32, round half to even)."""
        s, z = self.rows()
        qmin, qmax = -(2 ** (self.a_bits - 1)), 2 ** (self.a_bits - 1) - 1
        return torch.clamp(torch.round(self.x.float() / s) + z, qmin, qmax)

    def accumulator(self) -> Tensor:
        """sum_k (q_x - z_a) q_w, exact (int64)."""
        _, z = self.rows()
        return (self.codes() - z).long() @ self.w_codes.long().t()

    def expected(self) -> Tensor:
        """(acc - z_a colsum) s_a s_w + b in float64."""
        s, _ = self.rows()
        y = self.accumulator().double() * s.double() * self.w_scale.double()
        return y if self.bias is None else y + self.bias.double()


def int8_case(m: int, n: int, k: int, *, seed: int = 0, bias: bool = True, groups: int = 0, batch: int = 1,
              power_of_two: bool = False, a_bits: int = 8, dtype: torch.dtype = torch.float32) -> Int8Case:
    """Random codes over the whole int8 range, activations that also overflow the grid (clamping).

    ``groups``: 0 for a static quantizer, else a table of that many time groups and a random group per
    sample. ``power_of_two``: scales, zero points and bias chosen so the whole epilogue is exact in fp32
    (then the kernel's output must equal the exact result bit for bit).
    """
    g = torch.Generator().manual_seed(seed)
    rows_per_sample = -(-m // batch)
    entries = max(groups, 1)
    if power_of_two:
        a_scale = 2.0 ** -torch.randint(2, 5, (entries,), generator=g).float()
        w_scale = 2.0 ** -torch.randint(3, 7, (n,), generator=g).float()
        bias_values = torch.randint(-64, 64, (n,), generator=g).float() / 8
    else:
        a_scale = torch.rand(entries, generator=g) * 0.05 + 0.01
        w_scale = torch.rand(n, generator=g) * 0.01 + 1e-3
        bias_values = torch.randn(n, generator=g)
    zero_point = torch.randint(-20, 21, (entries,), generator=g).float()
    x = torch.randn(batch, rows_per_sample, k, generator=g) * 1.5 * a_scale.max() * 2 ** (a_bits - 1) / 2
    if power_of_two:   # exact in every float dtype, and exactly on rounding ties: x / s = integer + 1/2
        x = (torch.randint(-40, 40, x.shape, generator=g).float() + 0.5) * a_scale.min()
    group = torch.randint(0, groups, (batch,), generator=g) if groups else None
    return Int8Case(x.to(dtype), torch.randint(-128, 128, (n, k), generator=g, dtype=torch.int8), w_scale,
                    bias_values if bias else None, a_scale, zero_point, group, a_bits)


def run_int8(case: Int8Case, mode: str, layer: str = "test.layer") -> Tensor:
    """The kernel's output: ``mode`` "prologue" (float x) or "codes" (the reference's codes, int8)."""
    from ditq_compiler.kernels import triton_w8a8  # noqa: F401  (registers the ops)

    if mode == "prologue":
        return torch.ops.ditq_cuda.w8a8_linear(case.x, *case.args(), layer)
    codes = case.codes().to(torch.int8)
    return torch.ops.ditq_cuda.w8a8_linear_codes(codes, *case.args(), case.x.dtype, layer)


def comparison_cases() -> dict[str, tuple[Int8Case, str]]:
    """Named (case, mode) pairs the GPU test runs on CUDA and in the interpreter."""
    cases = {}
    for m, n, k in SHAPES:
        for mode in ("prologue", "codes"):
            cases[f"{m}x{n}x{k}-{mode}-exact"] = (int8_case(m, n, k, power_of_two=True), mode)
            cases[f"{m}x{n}x{k}-{mode}"] = (int8_case(m, n, k, seed=1), mode)
    cases["grouped-bf16"] = (int8_case(48, 40, 72, groups=3, batch=4, dtype=torch.bfloat16), "prologue")
    cases["4bit-nobias"] = (int8_case(20, 24, 40, a_bits=4, bias=False), "prologue")
    cases["large"] = (int8_case(150, 260, 576, seed=2), "prologue")
    return cases


def run_comparison_cases(device: str) -> dict[str, Tensor]:
    return {name: run_int8(case.to(device), mode).cpu() for name, (case, mode) in comparison_cases().items()}
