"""Properties of TQ-DiT's two-region quantizers: post-softmax (searched s1, fixed s2), post-GELU (a step per sign)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from ditq_compiler.quant import QuantSpec, fake_quantize
from ditq_compiler.quant.multi_region import gelu_two_region, levels, softmax_two_region, uniform

bits_st = st.integers(2, 8)
EPS = 1e-6   # float32 slack on the bounds (values are at most 1 for softmax, scaled for GELU)


@st.composite
def softmax_case(draw: st.DrawFn) -> tuple[int, float, torch.Tensor]:
    """bits, s1 in (0, 1/n] and values in [0, 1]."""
    bits = draw(bits_st)
    n = levels(bits)
    s1 = draw(st.floats(2**-16, 1.0, width=32)) / n
    values = draw(arrays(np.float32, st.integers(1, 64), elements=st.floats(0, 1, width=32, allow_subnormal=False)))
    return bits, s1, torch.from_numpy(values)


@st.composite
def gelu_case(draw: st.DrawFn) -> tuple[int, float, float, torch.Tensor]:
    """bits, s_neg, s_pos and values that may fall outside both ranges."""
    bits = draw(bits_st)
    s_neg, s_pos = draw(st.floats(2**-13, 1.0, width=32)), draw(st.floats(2**-13, 1.0, width=32))
    values = draw(arrays(np.float32, st.integers(1, 64), elements=st.floats(-300, 300, width=32,
                                                                              allow_subnormal=False)))
    return bits, s_neg, s_pos, torch.from_numpy(values)


# ---------------------------------------------------------------- post-softmax


@settings(max_examples=300, deadline=None)
@given(softmax_case())
def test_softmax_levels_lie_in_their_regions_and_fit_k_bits(case):
    bits, s1, x = case
    n = levels(bits)
    q = softmax_two_region(x, s1, bits).double()
    split = n * torch.tensor(s1, dtype=torch.float32).double()
    low, high = x.double() < split, x.double() >= split
    codes_low = q[low] / s1
    assert torch.allclose(codes_low, codes_low.round(), atol=1e-3) and bool((codes_low.round() <= n - 1).all())
    assert bool((q[low] < split).all())                       # R1 levels stay below the split
    codes_high = q[high] * n
    assert torch.equal(codes_high, codes_high.round())        # multiples of s2 = 1/n ...
    assert bool((q[high] >= split).all()) and bool((q[high] <= 1).all())   # ... inside R2 = [n s1, 1]
    distinct_high = torch.arange(0, n + 1, dtype=torch.float64) / n
    assert int((distinct_high >= split).sum()) <= n             # at most 2^(k-1) R2 levels: k - 1 bits of code


@settings(max_examples=300, deadline=None)
@given(softmax_case())
def test_softmax_error_bounds_per_region(case):
    bits, s1, x = case
    n = levels(bits)
    s1_t = torch.tensor(s1, dtype=torch.float32).double()
    s2 = 1.0 / n
    x64 = x.double()
    error = (softmax_two_region(x, s1, bits).double() - x64).abs()
    split = n * s1_t
    first_high = torch.ceil(split * n) / n                      # lowest R2 level
    inner_low = x64 <= (n - 0.5) * s1_t
    edge_low = (x64 > (n - 0.5) * s1_t) & (x64 < split)
    inner_high = (x64 >= split) & (x64 >= first_high - s2 / 2)
    edge_high = (x64 >= split) & (x64 < first_high - s2 / 2)
    assert bool((error[inner_low] <= s1_t / 2 + EPS).all())
    assert bool((error[edge_low] <= s1_t + EPS).all())
    assert bool((error[inner_high] <= s2 / 2 + EPS).all())
    assert bool((error[edge_high] <= s2 + EPS).all())


@settings(max_examples=300, deadline=None)
@given(softmax_case())
def test_softmax_is_monotone_and_idempotent(case):
    bits, s1, x = case
    x = x.sort().values
    q = softmax_two_region(x, s1, bits)
    assert bool((q[1:] >= q[:-1]).all())
    assert torch.equal(softmax_two_region(q, s1, bits), q)


def test_softmax_extremes_and_the_fixed_step():
    bits, n = 6, 32
    s1 = 0.1 / n                                   # R1 = [0, 0.1) with step 0.003125, R2 = [0.1, 1] with step 1/32
    x = torch.tensor([0.0, 0.00156, 0.05, 0.0999, 0.1, 0.11, 0.5, 0.99, 1.0])
    q = softmax_two_region(x, s1, bits)
    assert q[0] == 0 and q[-1] == 1.0              # a fully attended token keeps probability 1
    assert torch.allclose(q[1:3], torch.round(x[1:3] / s1) * s1)
    assert torch.isclose(q[3], torch.tensor(31 * s1))   # the top R1 level, (n - 1) s1
    assert q[4] == 4 / 32 and q[5] == 4 / 32       # ceil(0.1 * 32) = 4: the first multiple of 1/32 in R2
    assert q[6] == 0.5 and q[7] == 1.0
    # a uniform 6-bit grid over [0, 1] has step 1/63: MRQ resolves the small probabilities 5x finer
    small = torch.linspace(0, 0.09, 50)
    uniform_error = (torch.round(small * 63) / 63 - small).abs().max()
    assert (softmax_two_region(small, s1, bits) - small).abs().max() < uniform_error


# ---------------------------------------------------------------- post-GELU


@settings(max_examples=300, deadline=None)
@given(gelu_case())
def test_gelu_error_bounds_per_sign_and_clamping(case):
    bits, s_neg, s_pos, x = case
    n = levels(bits)
    s_neg_t, s_pos_t = (torch.tensor(s, dtype=torch.float32).double() for s in (s_neg, s_pos))
    q, x64 = gelu_two_region(x, s_neg, s_pos, bits).double(), x.double()
    error = (q - x64).abs()
    negative = (x64 >= -n * s_neg_t) & (x64 <= 0)
    positive = (x64 >= 0) & (x64 <= (n - 1) * s_pos_t)
    assert bool((error[negative] <= s_neg_t / 2 * (1 + EPS)).all())
    assert bool((error[positive] <= s_pos_t / 2 * (1 + EPS)).all())
    assert torch.allclose(q[x64 < -n * s_neg_t], -n * s_neg_t.expand(int((x64 < -n * s_neg_t).sum())).float().double())
    assert torch.allclose(q[x64 > (n - 1) * s_pos_t],
                          ((n - 1) * s_pos_t).expand(int((x64 > (n - 1) * s_pos_t).sum())).float().double())
    # signed k-bit codes: c in [-n, 0] times s_neg below zero, c in [0, n - 1] times s_pos above
    assert bool((torch.sign(q) * torch.sign(x64) >= 0).all())
    codes = torch.where(q < 0, q / s_neg_t, q / s_pos_t)
    assert torch.allclose(codes, codes.round(), atol=1e-3)
    assert bool((codes.round() >= -n).all()) and bool((codes.round() <= n - 1).all())


@settings(max_examples=300, deadline=None)
@given(gelu_case())
def test_gelu_is_monotone_idempotent_and_a_sum_of_two_uniform_quantizers(case):
    bits, s_neg, s_pos, x = case
    x = x.sort().values
    q = gelu_two_region(x, s_neg, s_pos, bits)
    assert bool((q[1:] >= q[:-1]).all())
    assert torch.equal(gelu_two_region(q, s_neg, s_pos, bits), q)
    n = levels(bits)   # the lowering: Q/DQ of min(x, 0) with s_neg plus Q/DQ of max(x, 0) with s_pos, then Add
    neg = torch.round(x.clamp(max=0) / s_neg).clamp(-n, 0) * torch.tensor(s_neg, dtype=torch.float32)
    pos = torch.round(x.clamp(min=0) / s_pos).clamp(0, n - 1) * torch.tensor(s_pos, dtype=torch.float32)
    assert torch.equal(q, neg + pos)


def test_gelu_steps_are_independent_per_sign():
    x = torch.tensor([-0.17, -0.05, 0.0, 0.3, 4.0])
    q = gelu_two_region(x, 0.17 / 32, 4.0 / 31, 6)
    assert torch.allclose(q[:2], x[:2], atol=0.17 / 64)       # the short negative tail keeps a fine step
    assert q[2] == 0 and torch.isclose(q[4], torch.tensor(4.0))
    one_scale = fake_quantize(x, torch.tensor((4.0 + 0.17) / 63), torch.tensor(-28, dtype=torch.int32),
                              QuantSpec(6, False))
    assert (q[:2] - x[:2]).abs().max() < (one_scale[:2] - x[:2]).abs().max()


# ---------------------------------------------------------------- uniform rows and broadcasting


@settings(max_examples=200, deadline=None)
@given(bits_st, st.floats(2**-10, 10, width=32), st.integers(-20, 20),
       arrays(np.float32, st.integers(1, 64), elements=st.floats(-100, 100, width=32, allow_subnormal=False)))
def test_uniform_rows_equal_fake_quantize_exactly(bits, scale, zero_point, values):
    x = torch.from_numpy(values)
    spec = QuantSpec(bits, False)
    z = max(spec.qmin, min(spec.qmax, zero_point))
    s, zt = torch.tensor(scale, dtype=torch.float32), torch.tensor(z, dtype=torch.int32)
    assert torch.equal(uniform(x, s, zt, bits), fake_quantize(x, s, zt, spec))


def test_per_sample_steps_broadcast():
    x = torch.rand(3, 4, 5)
    s1 = torch.tensor([0.001, 0.004, 0.03]).reshape(3, 1, 1)
    q = softmax_two_region(x, s1, 6)
    for b in range(3):
        assert torch.equal(q[b], softmax_two_region(x[b], s1[b, 0, 0], 6))


@pytest.mark.parametrize("bits", [1, 9, 4.0])
def test_bits_outside_2_to_8_are_refused(bits):
    with pytest.raises(ValueError, match="2..8 bits"):
        softmax_two_region(torch.rand(3), 0.01, bits)
