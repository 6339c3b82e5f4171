"""Properties of the signed grid, quantize / dequantize / fake_quantize and the STE."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from ditq_compiler.quant import (
    QuantSpec,
    broadcast_qparams,
    dequantize,
    fake_quantize,
    fake_quantize_per_token,
    qparams_from_range,
    quantize,
    round_ste,
    sqnr_db,
    weight_qparams,
)

BOUND = 1e3
bits_st = st.integers(2, 8)
symmetric_st = st.booleans()
value_st = st.floats(-BOUND, BOUND, width=32, allow_nan=False, allow_infinity=False, allow_subnormal=False)


def tensor_spec(bits: int, symmetric: bool) -> QuantSpec:
    return QuantSpec(bits=bits, symmetric=symmetric)


@st.composite
def range_and_values(draw: st.DrawFn) -> tuple[float, float, torch.Tensor]:
    """A range [lo, hi] and a 1-D float32 array of values inside it."""
    a, b = draw(value_st), draw(value_st)
    lo, hi = min(a, b), max(a, b)
    inside = st.floats(lo, hi, width=32, allow_nan=False, allow_subnormal=False)
    values = draw(arrays(np.float32, st.integers(1, 64), elements=inside))
    return lo, hi, torch.from_numpy(values)


@st.composite
def range_and_any_values(draw: st.DrawFn) -> tuple[float, float, torch.Tensor]:
    """A range [lo, hi] and values anywhere in [-BOUND, BOUND] (in and out of the range)."""
    a, b = draw(value_st), draw(value_st)
    values = draw(arrays(np.float32, st.integers(1, 64), elements=value_st))
    return min(a, b), max(a, b), torch.from_numpy(values)


def qparams(lo: float, hi: float, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
    return qparams_from_range(torch.tensor(lo), torch.tensor(hi), spec)


# ---------------------------------------------------------------- qparams and the grid


@settings(max_examples=200, deadline=None)
@given(bits=bits_st, symmetric=symmetric_st, a=value_st, b=value_st)
def test_qparams_follow_the_grid_formulas(bits: int, symmetric: bool, a: float, b: float) -> None:
    spec = tensor_spec(bits, symmetric)
    lo, hi = min(a, b), max(a, b)
    scale, zero_point = qparams(lo, hi, spec)
    assert scale.dtype == torch.float32 and zero_point.dtype == torch.int32
    assert scale.shape == () and zero_point.shape == ()
    assert spec.qmin <= int(zero_point) <= spec.qmax
    if symmetric:
        assert int(zero_point) == 0
        expected = max(abs(lo), abs(hi)) / spec.qmax
    else:
        expected = (max(hi, 0.0) - min(lo, 0.0)) / (spec.qmax - spec.qmin)
    assert float(scale) == pytest.approx(max(expected, 1e-12), rel=1e-5)


def test_qmin_qmax_are_signed() -> None:
    assert (QuantSpec(bits=8).qmin, QuantSpec(bits=8).qmax) == (-128, 127)
    assert (QuantSpec(bits=4, symmetric=False).qmin, QuantSpec(bits=4, symmetric=False).qmax) == (-8, 7)
    assert (QuantSpec(bits=2).qmin, QuantSpec(bits=2).qmax) == (-2, 1)


@pytest.mark.parametrize("symmetric", [True, False])
def test_all_zero_range_has_a_positive_scale(symmetric: bool) -> None:
    spec = tensor_spec(8, symmetric)
    scale, zero_point = qparams(0.0, 0.0, spec)
    assert float(scale) > 0
    x = torch.zeros(5)
    assert torch.equal(fake_quantize(x, scale, zero_point, spec), x)


def test_affine_zero_point_for_a_known_range() -> None:
    spec = QuantSpec(bits=8, symmetric=False)
    scale, zero_point = qparams(0.0, 2.55, spec)  # all-positive: zero sits at the bottom code
    assert float(scale) == pytest.approx(0.01)
    assert int(zero_point) == -128
    scale, zero_point = qparams(-1.0, 3.0, spec)
    assert int(zero_point) == round(-128 + 1.0 / float(scale))


# ---------------------------------------------------------------- properties of fake_quantize


@settings(max_examples=200, deadline=None)
@given(bits=bits_st, symmetric=symmetric_st, data=range_and_any_values())
def test_fake_quantize_is_idempotent(bits: int, symmetric: bool, data: tuple) -> None:
    lo, hi, x = data
    spec = tensor_spec(bits, symmetric)
    scale, zero_point = qparams(lo, hi, spec)
    once = fake_quantize(x, scale, zero_point, spec)
    twice = fake_quantize(once, scale, zero_point, spec)
    torch.testing.assert_close(twice, once, rtol=0, atol=float(scale) * 1e-4)


@settings(max_examples=200, deadline=None)
@given(bits=bits_st, symmetric=symmetric_st, data=range_and_values())
def test_error_inside_the_range_is_at_most_half_a_step(bits: int, symmetric: bool, data: tuple) -> None:
    lo, hi, x = data
    spec = tensor_spec(bits, symmetric)
    scale, zero_point = qparams(lo, hi, spec)
    error = (x - fake_quantize(x, scale, zero_point, spec)).abs()
    tolerance = float(scale) * (0.5 + 1e-4) + 1e-6 * x.abs()
    assert bool((error <= tolerance).all()), (error.max(), float(scale))


@settings(max_examples=200, deadline=None)
@given(bits=bits_st, symmetric=symmetric_st, data=range_and_any_values())
def test_fake_quantize_is_monotonic(bits: int, symmetric: bool, data: tuple) -> None:
    lo, hi, x = data
    spec = tensor_spec(bits, symmetric)
    scale, zero_point = qparams(lo, hi, spec)
    out = fake_quantize(x.sort().values, scale, zero_point, spec)
    assert bool((out[1:] >= out[:-1]).all())


@pytest.mark.parametrize("symmetric", [True, False])
@settings(max_examples=200, deadline=None)
@given(bits=bits_st, a=value_st, b=value_st)
def test_zero_is_exactly_representable(symmetric: bool, bits: int, a: float, b: float) -> None:
    spec = tensor_spec(bits, symmetric)
    scale, zero_point = qparams(min(a, b), max(a, b), spec)
    x = torch.zeros(3)
    out = fake_quantize(x, scale, zero_point, spec)
    assert torch.equal(out, x)
    assert torch.equal(quantize(x, scale, zero_point, spec), torch.full((3,), int(zero_point), dtype=torch.int8))


@settings(max_examples=200, deadline=None)
@given(bits=bits_st, symmetric=symmetric_st, data=range_and_any_values())
def test_codes_are_int8_on_the_grid_and_dequantize_matches(bits: int, symmetric: bool, data: tuple) -> None:
    lo, hi, x = data
    spec = tensor_spec(bits, symmetric)
    scale, zero_point = qparams(lo, hi, spec)
    codes = quantize(x, scale, zero_point, spec)
    assert codes.dtype == torch.int8 and codes.shape == x.shape
    assert int(codes.min()) >= spec.qmin and int(codes.max()) <= spec.qmax
    roundtrip = dequantize(codes, scale, zero_point, spec)
    assert roundtrip.dtype == torch.float32
    assert torch.equal(roundtrip, fake_quantize(x, scale, zero_point, spec))


def test_values_outside_the_range_clamp_to_the_end_codes() -> None:
    spec = QuantSpec(bits=4, symmetric=False)
    scale, zero_point = qparams(-1.0, 2.0, spec)
    codes = quantize(torch.tensor([-100.0, 100.0]), scale, zero_point, spec)
    assert codes.tolist() == [spec.qmin, spec.qmax]


def test_fake_quantize_keeps_the_input_dtype() -> None:
    spec = QuantSpec(bits=8)
    scale, zero_point = qparams(-1.0, 1.0, spec)
    x = torch.linspace(-1, 1, 11, dtype=torch.float64)
    out = fake_quantize(x, scale, zero_point, spec)
    assert out.dtype == torch.float64
    assert torch.equal(out.float(), dequantize(quantize(x, scale, zero_point, spec), scale, zero_point, spec))


# ---------------------------------------------------------------- per-channel, per-group, per-token


@settings(max_examples=60, deadline=None)
@given(bits=bits_st, symmetric=symmetric_st, axis=st.sampled_from([0, 1, -1]),
       weight=arrays(np.float32, st.tuples(st.integers(1, 6), st.integers(1, 9)), elements=value_st))
def test_per_channel_matches_a_loop_over_channels(bits: int, symmetric: bool, axis: int, weight: np.ndarray) -> None:
    x = torch.from_numpy(weight)
    spec = QuantSpec(bits=bits, symmetric=symmetric, granularity="channel", axis=axis)
    scale, zero_point = weight_qparams(x, spec)
    assert scale.shape == zero_point.shape == (x.shape[axis],)
    out = fake_quantize(x, scale, zero_point, spec)
    codes = quantize(x, scale, zero_point, spec)
    per_tensor = tensor_spec(bits, symmetric)
    for c in range(x.shape[axis]):
        channel = x.select(axis, c)
        c_scale, c_zero_point = qparams_from_range(channel.min(), channel.max(), per_tensor)
        assert torch.equal(scale[c], c_scale) and torch.equal(zero_point[c], c_zero_point)
        assert torch.equal(out.select(axis, c), fake_quantize(channel, c_scale, c_zero_point, per_tensor))
        assert torch.equal(codes.select(axis, c), quantize(channel, c_scale, c_zero_point, per_tensor))
    assert torch.equal(dequantize(codes, scale, zero_point, spec), out)


@settings(max_examples=60, deadline=None)
@given(bits=bits_st, symmetric=symmetric_st, group_size=st.integers(1, 5), n_groups=st.integers(1, 4),
       out_features=st.integers(1, 5), seed=st.integers(0, 2**16))
def test_per_group_matches_a_loop_over_groups(bits: int, symmetric: bool, group_size: int, n_groups: int,
                                              out_features: int, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(out_features, n_groups * group_size, generator=gen) * 3
    spec = QuantSpec(bits=bits, symmetric=symmetric, granularity="group", group_size=group_size)
    scale, zero_point = weight_qparams(x, spec)
    assert scale.shape == zero_point.shape == (out_features, n_groups)
    out = fake_quantize(x, scale, zero_point, spec)
    codes = quantize(x, scale, zero_point, spec)
    per_tensor = tensor_spec(bits, symmetric)
    for row in range(out_features):
        for g in range(n_groups):
            cols = slice(g * group_size, (g + 1) * group_size)
            group = x[row, cols]
            g_scale, g_zero_point = qparams_from_range(group.min(), group.max(), per_tensor)
            assert torch.equal(scale[row, g], g_scale) and torch.equal(zero_point[row, g], g_zero_point)
            assert torch.equal(out[row, cols], fake_quantize(group, g_scale, g_zero_point, per_tensor))
            assert torch.equal(codes[row, cols], quantize(group, g_scale, g_zero_point, per_tensor))
    assert torch.equal(dequantize(codes, scale, zero_point, spec), out)
    # broadcast_qparams expands per-group qparams to the weight's own shape
    b_scale, b_zero_point = broadcast_qparams(x, scale, zero_point, spec)
    assert b_scale.shape == x.shape and b_zero_point.shape == x.shape
    assert torch.equal(((torch.round(x / b_scale) + b_zero_point).clamp(spec.qmin, spec.qmax) - b_zero_point)
                       * b_scale, out)


def test_group_size_must_divide_the_last_dim() -> None:
    spec = QuantSpec(bits=4, granularity="group", group_size=64)
    with pytest.raises(ValueError, match=r"group_size=64.*\(100\)"):
        weight_qparams(torch.randn(8, 100), spec)
    with pytest.raises(ValueError, match="group_size"):
        quantize(torch.randn(8, 100), torch.ones(8, 1), torch.zeros(8, 1, dtype=torch.int32), spec)


def test_channel_axis_broadcast_for_activations() -> None:
    x = torch.randn(2, 5, 7)
    spec = QuantSpec(granularity="channel", axis=-1)
    scale, zero_point = weight_qparams(x, spec)
    assert scale.shape == (7,)
    b_scale, b_zero_point = broadcast_qparams(x, scale, zero_point, spec)
    assert b_scale.shape == (1, 1, 7) and b_zero_point.shape == (1, 1, 7)


def test_wrong_qparams_shape_is_an_error() -> None:
    spec = QuantSpec(granularity="channel", axis=0)
    with pytest.raises(ValueError, match="scale has shape"):
        fake_quantize(torch.randn(4, 3), torch.ones(3), torch.zeros(3, dtype=torch.int32), spec)
    with pytest.raises(ValueError, match="one scale"):
        fake_quantize(torch.randn(4, 3), torch.ones(4), torch.zeros(4, dtype=torch.int32), QuantSpec())


@settings(max_examples=60, deadline=None)
@given(bits=bits_st, symmetric=symmetric_st,
       x=arrays(np.float32, st.tuples(st.integers(1, 3), st.integers(1, 4), st.integers(1, 6)), elements=value_st))
def test_per_token_matches_a_loop_over_tokens(bits: int, symmetric: bool, x: np.ndarray) -> None:
    x = torch.from_numpy(x)
    spec = QuantSpec(bits=bits, symmetric=symmetric, granularity="token")
    out = fake_quantize_per_token(x, spec)
    assert out.shape == x.shape
    per_tensor = tensor_spec(bits, symmetric)
    for b in range(x.shape[0]):
        for t in range(x.shape[1]):
            token = x[b, t]
            scale, zero_point = qparams_from_range(token.min(), token.max(), per_tensor)
            assert torch.equal(out[b, t], fake_quantize(token, scale, zero_point, per_tensor))


def test_per_token_needs_a_token_spec() -> None:
    with pytest.raises(ValueError, match="token"):
        fake_quantize_per_token(torch.randn(2, 3), QuantSpec())


def test_per_token_beats_per_tensor_on_tokens_of_different_scales() -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(16, 64, generator=gen) * torch.logspace(-2, 2, 16).unsqueeze(1)
    token_out = fake_quantize_per_token(x, QuantSpec(granularity="token", symmetric=False))
    spec = QuantSpec(symmetric=False)
    tensor_out = fake_quantize(x, *weight_qparams(x, spec), spec)
    token_error = (x - token_out).square().sum(dim=1)
    tensor_error = (x - tensor_out).square().sum(dim=1)
    assert bool((token_error <= tensor_error * (1 + 1e-6)).all())
    assert float(token_error[0]) < float(tensor_error[0])  # the smallest token gains most


# ---------------------------------------------------------------- straight-through estimator


def test_round_ste_rounds_forward_and_passes_gradient() -> None:
    v = torch.tensor([-1.5, -0.4, 0.5, 1.6, 2.5], requires_grad=True)
    out = round_ste(v)
    assert out.tolist() == [-2.0, -0.0, 0.0, 2.0, 2.0]
    out.sum().backward()
    assert v.grad.tolist() == [1.0] * 5


@settings(max_examples=100, deadline=None)
@given(bits=bits_st, symmetric=symmetric_st, data=range_and_any_values())
def test_ste_gradient_is_one_inside_the_range_and_zero_outside(bits: int, symmetric: bool, data: tuple) -> None:
    lo, hi, values = data
    spec = tensor_spec(bits, symmetric)
    scale, zero_point = qparams(lo, hi, spec)
    x = values.clone().requires_grad_(True)
    fake_quantize(x, scale, zero_point, spec).sum().backward()
    unclamped = torch.round(values / scale) + zero_point
    inside = (unclamped >= spec.qmin) & (unclamped <= spec.qmax)
    assert torch.equal(x.grad, inside.float())


def test_ste_on_a_known_example() -> None:
    spec = QuantSpec(bits=8)
    scale, zero_point = qparams(-1.0, 1.0, spec)
    x = torch.tensor([-5.0, -0.5, 0.0, 0.99, 5.0], requires_grad=True)
    fake_quantize(x, scale, zero_point, spec).sum().backward()
    assert x.grad.tolist() == [0.0, 1.0, 1.0, 1.0, 0.0]


@pytest.mark.parametrize("symmetric", [True, False])
def test_gradient_reaches_scale_lsq_style(symmetric: bool) -> None:
    spec = QuantSpec(bits=4, symmetric=symmetric)
    scale, zero_point = qparams(-1.0, 2.0, spec)
    scale = scale.clone().requires_grad_(True)
    x = torch.linspace(-3.0, 4.0, 57)
    fake_quantize(x, scale, zero_point, spec).sum().backward()
    assert scale.grad is not None
    with torch.no_grad():
        z = zero_point.float()
        v = x / scale
        q = torch.round(v) + z
        # d/ds [(clamp(round(x/s) + z) - z) * s]: LSQ's round(x/s) - x/s inside, the clamped code outside
        expected = torch.where(q < spec.qmin, spec.qmin - z,
                               torch.where(q > spec.qmax, spec.qmax - z, torch.round(v) - v)).sum()
    assert float(scale.grad) == pytest.approx(float(expected), rel=1e-4, abs=1e-4)


def test_gradient_reaches_per_channel_scale() -> None:
    spec = QuantSpec(bits=4, granularity="channel", axis=0)
    x = torch.randn(3, 10, generator=torch.Generator().manual_seed(1))
    scale, zero_point = weight_qparams(x, spec)
    scale = (scale * 0.8).requires_grad_(True)
    fake_quantize(x, scale, zero_point, spec).square().sum().backward()
    assert scale.grad.shape == (3,) and bool((scale.grad != 0).all())


# ---------------------------------------------------------------- sqnr


def test_sqnr_db() -> None:
    ref = torch.ones(100)
    assert sqnr_db(ref, ref) == math.inf
    assert sqnr_db(ref, ref * 0.9) == pytest.approx(20.0)
    assert sqnr_db(ref, ref * 0.99) == pytest.approx(40.0)
    assert sqnr_db(torch.zeros(3), torch.ones(3)) == -math.inf
    with pytest.raises(ValueError, match="shapes"):
        sqnr_db(ref, torch.ones(99))


def test_sqnr_grows_about_6db_per_bit() -> None:
    x = torch.randn(4096, generator=torch.Generator().manual_seed(0))
    sqnrs = []
    for bits in (4, 6, 8):
        spec = QuantSpec(bits=bits)
        sqnrs.append(sqnr_db(x, fake_quantize(x, *weight_qparams(x, spec), spec)))
    for lower, higher in itertools.pairwise(sqnrs):
        assert 10.0 < higher - lower < 14.0
