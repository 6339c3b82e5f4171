"""Ternary weights (W1.58, absmean scale) and per-token activation quantization at 2-4 bits."""

import pytest
import torch

from ditq_compiler.quant import (
    AbsMeanObserver,
    QuantSpec,
    dequantize,
    fake_quantize_per_token,
    quantize,
    weight_qparams,
)

TERNARY = QuantSpec(1.58, True, "channel", observer="absmean")


def test_ternary_grid_is_minus_one_zero_one():
    assert (TERNARY.ternary, TERNARY.qmin, TERNARY.qmax) == (True, -1, 1)
    assert TERNARY.describe() == "ternary absmean per-channel"
    assert not QuantSpec(2).ternary and QuantSpec(2).qmin == -2


def test_absmean_scale_is_the_mean_absolute_weight_per_output_channel():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(16, 64, generator=g) * torch.linspace(0.1, 2.0, 16).reshape(-1, 1)
    scale, zero_point = weight_qparams(w, TERNARY)
    torch.testing.assert_close(scale, w.abs().mean(dim=1))
    assert bool((zero_point == 0).all())
    codes = quantize(w, scale, zero_point, TERNARY)
    assert codes.dtype == torch.int8 and set(codes.unique().tolist()) == {-1, 0, 1}
    # BitNet b1.58: W ~ gamma * RoundClip(W / gamma, -1, 1)
    expected = torch.clamp(torch.round(w / scale.reshape(-1, 1)), -1, 1) * scale.reshape(-1, 1)
    torch.testing.assert_close(dequantize(codes, scale, zero_point, TERNARY), expected)


def test_absmean_accumulates_over_updates_per_tensor():
    observer = AbsMeanObserver(QuantSpec(1.58, True, "tensor", observer="absmean"))
    a, b = torch.tensor([1.0, -3.0]), torch.tensor([2.0, 0.0, -2.0])
    observer.update(a)
    observer.update(b)
    scale, _ = observer.compute()
    assert float(scale) == pytest.approx(8.0 / 5)


@pytest.mark.parametrize("kwargs, field", [
    (dict(bits=1.58, symmetric=False, observer="absmean"), "symmetric"),
    (dict(bits=1.58, observer="minmax"), "observer"),
    (dict(bits=4, observer="absmean"), "observer"),
    (dict(bits=1.5), "bits"),
    (dict(bits=1.58, granularity="token", symmetric=True, observer="absmean"), "granularity"),
])
def test_invalid_ternary_specs_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=rf"QuantSpec\.{field}"):
        QuantSpec(**kwargs)


def test_ternary_round_trips_through_to_dict():
    assert QuantSpec.from_dict(TERNARY.to_dict()) == TERNARY


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_per_token_low_bit_codes_fill_the_grid_and_error_is_at_most_half_a_step(bits):
    g = torch.Generator().manual_seed(bits)
    x = torch.randn(8, 16, 64, generator=g) * torch.rand(8, 16, 1, generator=g) * 10
    spec = QuantSpec(bits, False, "token")
    y = fake_quantize_per_token(x, spec)
    lo, hi = x.amin(-1, keepdim=True).clamp(max=0), x.amax(-1, keepdim=True).clamp(min=0)
    step = (hi - lo) / (2 ** bits - 1)
    assert bool(((y - x).abs() <= step / 2 + 1e-5 * step).all())
    levels = max(row.unique().numel() for row in y.reshape(-1, 64))
    assert levels == 2 ** bits            # the whole grid is used, and no more


def test_per_token_clip_ratio_shrinks_the_range_and_gets_a_gradient():
    x = torch.linspace(-1.0, 3.0, 64).reshape(1, 64)
    spec = QuantSpec(3, False, "token")
    clip = torch.tensor(0.5, requires_grad=True)
    y = fake_quantize_per_token(x, spec, clip=clip)
    step = 2.0 / 7                      # range [0.5 min, 0.5 max] = [-0.5, 1.5] on 8 levels
    assert float(y.max()) <= 1.5 + step / 2 and float(y.min()) >= -0.5 - step / 2 and float(x.max()) == 3.0
    torch.testing.assert_close(fake_quantize_per_token(x, spec, clip=torch.tensor(1.0)),
                               fake_quantize_per_token(x, spec))
    (y - x).square().sum().backward()
    assert clip.grad is not None and float(clip.grad) != 0.0
