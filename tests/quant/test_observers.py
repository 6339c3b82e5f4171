"""Observers (min/max, percentile, MSE search) and QuantSpec validation / serialisation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from ditq_compiler.quant import (
    MinMaxObserver,
    MSEObserver,
    NonFiniteError,
    PercentileObserver,
    QuantSpec,
    fake_quantize,
    make_observer,
    qparams_from_range,
    weight_qparams,
)
from ditq_compiler.quant import observers
from ditq_compiler.quant.observers import _blocks, _squared_error_per_row

value_st = st.floats(-1e3, 1e3, width=32, allow_nan=False, allow_infinity=False, allow_subnormal=False)


def squared_error(x: torch.Tensor, spec: QuantSpec, scale: torch.Tensor, zero_point: torch.Tensor) -> float:
    return float((x - fake_quantize(x, scale, zero_point, spec)).double().square().sum())


def heavy_tailed(n: int, seed: int) -> torch.Tensor:
    """Gaussian scale mixture: normal values times a log-normal scale (Student-t-like tails)."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, generator=gen) * torch.exp(1.5 * torch.randn(n, generator=gen))


# ---------------------------------------------------------------- min / max


@settings(max_examples=50, deadline=None)
@given(symmetric=st.booleans(),
       batches=st.lists(arrays(np.float32, st.integers(1, 20), elements=value_st), min_size=1, max_size=5))
def test_minmax_matches_aminmax_over_all_updates(symmetric: bool, batches: list[np.ndarray]) -> None:
    spec = QuantSpec(symmetric=symmetric)
    observer = MinMaxObserver(spec)
    for batch in batches:
        observer.update(torch.from_numpy(batch))
    lo, hi = torch.aminmax(torch.from_numpy(np.concatenate(batches)))
    observed_lo, observed_hi = observer.clip_range()
    assert observed_lo.shape == () and observed_hi.shape == ()
    assert torch.equal(observed_lo, lo) and torch.equal(observed_hi, hi)
    expected = qparams_from_range(lo, hi, spec)
    computed = observer.compute()
    assert torch.equal(computed[0], expected[0]) and torch.equal(computed[1], expected[1])


@pytest.mark.parametrize(
    ("shape", "spec", "qparams_shape"),
    [
        ((8, 16), QuantSpec(granularity="channel", axis=0), (8,)),
        ((8, 16, 3, 3), QuantSpec(granularity="channel", axis=0), (8,)),
        ((2, 10, 16), QuantSpec(granularity="channel", axis=-1), (16,)),
        ((8, 16), QuantSpec(granularity="group", group_size=4), (8, 4)),
        ((8, 16), QuantSpec(), ()),
    ],
)
def test_reduction_shapes(shape: tuple[int, ...], spec: QuantSpec, qparams_shape: tuple[int, ...]) -> None:
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    for observer_name in ("minmax", "percentile", "mse"):
        observer = make_observer(QuantSpec(**{**spec.to_dict(), "observer": observer_name}))
        observer.update(x)
        observer.update(x * 2)
        scale, zero_point = observer.compute()
        assert scale.shape == zero_point.shape == qparams_shape, observer_name


def test_per_channel_minmax_reduces_all_other_dims() -> None:
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randn(2, 5, 7, generator=gen) for _ in range(3)]
    observer = MinMaxObserver(QuantSpec(granularity="channel", axis=-1))
    for batch in batches:
        observer.update(batch)
    stacked = torch.cat(batches).reshape(-1, 7)
    lo, hi = observer.clip_range()
    assert torch.equal(lo, stacked.amin(dim=0)) and torch.equal(hi, stacked.amax(dim=0))


def test_changing_channel_count_is_an_error() -> None:
    observer = MinMaxObserver(QuantSpec(granularity="channel", axis=-1))
    observer.update(torch.randn(4, 8))
    with pytest.raises(ValueError, match="shape changed"):
        observer.update(torch.randn(4, 9))


# ---------------------------------------------------------------- MSE search


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("seed", [0, 1])
def test_mse_is_never_worse_than_minmax(bits: int, symmetric: bool, seed: int) -> None:
    x = heavy_tailed(20_000, seed)
    spec = QuantSpec(bits=bits, symmetric=symmetric, observer="mse")
    mse = make_observer(spec)
    mse.update(x)
    minmax = MinMaxObserver(spec)
    minmax.update(x)
    assert squared_error(x, spec, *mse.compute()) <= squared_error(x, spec, *minmax.compute())


@pytest.mark.parametrize("symmetric", [True, False])
def test_mse_clips_a_single_huge_outlier(symmetric: bool) -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.cat([torch.randn(10_000, generator=gen), torch.tensor([40.0])])
    spec = QuantSpec(bits=4, symmetric=symmetric, observer="mse")
    mse = make_observer(spec)
    mse.update(x)
    minmax = MinMaxObserver(spec)
    minmax.update(x)
    assert squared_error(x, spec, *mse.compute()) < 0.9 * squared_error(x, spec, *minmax.compute())
    assert float(mse.clip_range()[1]) < 40.0


def test_mse_per_channel_searches_each_channel() -> None:
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(4, 10_000, generator=gen)
    weight[1, 0] = 40.0  # only channel 1 has an outlier
    spec = QuantSpec(bits=4, granularity="channel", axis=0, observer="mse")
    scale, zero_point = weight_qparams(weight, spec)
    minmax_scale, minmax_zero_point = weight_qparams(weight, QuantSpec(bits=4, granularity="channel", axis=0))
    shrink = scale / minmax_scale
    assert float(shrink[1]) < 0.5 and int(shrink.argmin()) == 1
    for c in range(4):
        row_spec = QuantSpec(bits=4)
        assert (squared_error(weight[c], row_spec, scale[c], zero_point[c])
                <= squared_error(weight[c], row_spec, minmax_scale[c], minmax_zero_point[c]))


def test_mse_keeps_minmax_when_clipping_does_not_help() -> None:
    x = torch.tensor([-1.0, 1.0])  # both ends are exactly on the grid
    observer = MSEObserver(QuantSpec(bits=8, observer="mse"))
    observer.update(x)
    lo, hi = observer.clip_range()
    assert (float(lo), float(hi)) == (-1.0, 1.0)


@settings(max_examples=100, deadline=None)
@given(bits=st.integers(2, 8), symmetric=st.booleans(), alpha=st.floats(0.3, 1.0),
       x=arrays(np.float32, st.tuples(st.integers(1, 4), st.integers(1, 30)), elements=value_st))
def test_search_error_matches_fake_quantize_exactly(bits: int, symmetric: bool, alpha: float, x: np.ndarray) -> None:
    samples = torch.from_numpy(x)
    spec = QuantSpec(bits=bits, symmetric=symmetric)
    lo, hi = samples.aminmax(dim=1)
    scale, zero_point = qparams_from_range(alpha * lo, alpha * hi, spec)
    row_spec = QuantSpec(bits=bits, symmetric=symmetric, granularity="channel", axis=0)
    expected = (samples - fake_quantize(samples, scale, zero_point, row_spec)).double().square().sum(dim=1)
    assert torch.equal(_squared_error_per_row(samples, scale, zero_point, spec), expected)


@pytest.mark.parametrize(("shape", "block"), [((1, 10), 3), ((7, 5), 10), ((4, 4), 100), ((3, 9), 4)])
def test_search_blocks_tile_the_sample_once(shape: tuple[int, int], block: int) -> None:
    covered = torch.zeros(shape, dtype=torch.int64)
    for rows, columns in _blocks(*shape, block):
        assert covered[rows, columns].numel() <= max(block, shape[1])
        covered[rows, columns] += 1
    assert bool((covered == 1).all())


@pytest.mark.parametrize("spec", [QuantSpec(bits=4, observer="mse"),
                                  QuantSpec(bits=3, symmetric=False, granularity="channel", observer="mse")])
def test_search_result_does_not_depend_on_the_block_size(spec: QuantSpec, monkeypatch: pytest.MonkeyPatch) -> None:
    x = heavy_tailed(3 * 700, seed=3).reshape(3, 700)
    one_block = make_observer(spec)
    one_block.update(x)
    expected = one_block.clip_range()
    monkeypatch.setattr(observers, "MSE_BLOCK_VALUES", 256)  # several row and column blocks
    many_blocks = make_observer(spec)
    many_blocks.update(x)
    assert all(torch.equal(a, b) for a, b in zip(many_blocks.clip_range(), expected, strict=True))


@pytest.mark.parametrize("observer_class", [PercentileObserver, MSEObserver])
def test_weight_qparams_keeps_the_whole_weight(observer_class: type) -> None:
    weight = torch.randn(2, 50_000, generator=torch.Generator().manual_seed(0))
    spec = QuantSpec(observer="percentile" if observer_class is PercentileObserver else "mse")
    whole = observer_class(spec, max_samples=None)
    whole.update(weight)
    assert whole.samples.shape == (1, 100_000)
    bounded = observer_class(spec)
    bounded.update(weight)
    assert bounded.samples.shape == (1, 2**16)
    if observer_class is PercentileObserver:  # the mse search itself is covered above
        assert all(torch.equal(a, b) for a, b in zip(whole.compute(), weight_qparams(weight, spec), strict=True))


# ---------------------------------------------------------------- percentile


def test_percentile_clips_an_outlier() -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.cat([torch.randn(20_000, generator=gen), torch.tensor([1000.0, -1000.0])])
    observer = PercentileObserver(QuantSpec(observer="percentile", percentile=99.9))
    observer.update(x)
    lo, hi = observer.clip_range()
    assert 2.0 < float(hi) < 5.0 and -5.0 < float(lo) < -2.0
    full = make_observer(QuantSpec(observer="percentile", percentile=100.0))
    full.update(x)
    assert [float(v) for v in full.clip_range()] == [-1000.0, 1000.0]


def test_percentile_sample_is_bounded_and_seeded() -> None:
    spec = QuantSpec(observer="percentile", percentile=99.0)

    def observe(seed: int) -> PercentileObserver:
        observer = PercentileObserver(spec, max_samples=1000, max_samples_per_update=300, seed=seed)
        gen = torch.Generator().manual_seed(123)
        for _ in range(20):
            observer.update(torch.randn(5000, generator=gen))
        return observer

    first, again, other = observe(0), observe(0), observe(1)
    assert first.samples.shape == (1, 1000)
    assert torch.equal(first.samples, again.samples)
    assert not torch.equal(first.samples, other.samples)
    assert 1.8 < float(first.clip_range()[1]) < 2.9  # the 99th percentile of N(0, 1) is 2.33


def test_reservoir_keeps_early_and_late_updates() -> None:
    observer = PercentileObserver(QuantSpec(observer="percentile"), max_samples=2000, max_samples_per_update=200)
    for step in range(50):
        observer.update(torch.full((1000,), float(step)))
    kept = observer.samples.flatten()
    early, late = float((kept < 25).float().mean()), float((kept >= 25).float().mean())
    assert 0.35 < early < 0.65 and 0.35 < late < 0.65


def test_per_channel_percentile_is_per_channel() -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 10_000, generator=gen) * torch.tensor([[1.0], [10.0], [100.0]])
    observer = make_observer(QuantSpec(observer="percentile", percentile=99.0, granularity="channel", axis=0))
    observer.update(x)
    hi = observer.clip_range()[1]
    assert hi.shape == (3,)
    torch.testing.assert_close(hi / torch.tensor([1.0, 10.0, 100.0]), torch.full((3,), 2.33), atol=0.3, rtol=0)


# ---------------------------------------------------------------- errors


@pytest.mark.parametrize("observer_name", ["minmax", "percentile", "mse"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_values_raise(observer_name: str, bad: float) -> None:
    observer = make_observer(QuantSpec(observer=observer_name))
    x = torch.randn(10)
    x[[2, 5]] = bad
    with pytest.raises(NonFiniteError, match="2 non-finite"):
        observer.update(x)
    assert issubclass(NonFiniteError, ValueError)


@pytest.mark.parametrize("observer_name", ["minmax", "percentile", "mse"])
def test_compute_before_update_raises(observer_name: str) -> None:
    observer = make_observer(QuantSpec(observer=observer_name))
    with pytest.raises(ValueError, match="before any update"):
        observer.compute()


def test_token_granularity_has_no_observer() -> None:
    with pytest.raises(ValueError, match="dynamic"):
        make_observer(QuantSpec(granularity="token"))
    with pytest.raises(ValueError, match="dynamic"):
        MinMaxObserver(QuantSpec(granularity="token"))


def test_empty_tensor_is_an_error() -> None:
    with pytest.raises(ValueError, match="empty"):
        MinMaxObserver(QuantSpec()).update(torch.empty(0, 4))


def test_update_does_not_track_gradients() -> None:
    x = torch.randn(4, 4, requires_grad=True)
    scale, _ = weight_qparams(x, QuantSpec(observer="mse"))
    assert not scale.requires_grad


# ---------------------------------------------------------------- QuantSpec


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"bits": 0}, "bits"),
        ({"bits": 1}, "binarizer"),
        ({"bits": 4, "binarizer": "xnor"}, "binarizer"),
        ({"bits": 9}, "bits"),
        ({"bits": 8.0}, "bits"),
        ({"bits": True}, "bits"),
        ({"symmetric": "yes"}, "symmetric"),
        ({"granularity": "row"}, "granularity"),
        ({"axis": "0"}, "axis"),
        ({"granularity": "group"}, "group_size"),
        ({"granularity": "group", "group_size": 0}, "group_size"),
        ({"granularity": "group", "group_size": 32.0}, "group_size"),
        ({"group_size": 32}, "group_size"),
        ({"observer": "max"}, "observer"),
        ({"granularity": "token", "observer": "mse"}, "observer"),
        ({"percentile": 50}, "percentile"),
        ({"percentile": 100.5}, "percentile"),
        ({"percentile": float("nan")}, "percentile"),
    ],
)
def test_invalid_specs_name_the_field(kwargs: dict, field: str) -> None:
    with pytest.raises(ValueError, match=rf"^QuantSpec\.{field}: "):
        QuantSpec(**kwargs)


@settings(max_examples=100, deadline=None)
@given(bits=st.integers(2, 8), symmetric=st.booleans(),
       granularity=st.sampled_from(["tensor", "channel", "token", "group"]), axis=st.integers(-3, 3),
       group_size=st.integers(1, 256), observer=st.sampled_from(["minmax", "percentile", "mse"]),
       percentile=st.floats(50.001, 100.0))
def test_to_dict_from_dict_round_trip(bits: int, symmetric: bool, granularity: str, axis: int, group_size: int,
                                      observer: str, percentile: float) -> None:
    spec = QuantSpec(bits=bits, symmetric=symmetric, granularity=granularity, axis=axis,
                     group_size=group_size if granularity == "group" else None,
                     observer="minmax" if granularity == "token" else observer, percentile=percentile)
    as_dict = spec.to_dict()
    assert set(as_dict) == {"bits", "symmetric", "granularity", "axis", "group_size", "observer", "percentile"}
    assert QuantSpec.from_dict(as_dict) == spec


def test_from_dict_rejects_unknown_keys_and_fills_defaults() -> None:
    with pytest.raises(ValueError, match="groupsize"):
        QuantSpec.from_dict({"bits": 4, "groupsize": 64})
    assert QuantSpec.from_dict({"bits": 4}) == QuantSpec(bits=4)


def test_describe() -> None:
    assert QuantSpec(granularity="channel").describe() == "int8 sym per-channel"
    assert QuantSpec(bits=4, symmetric=False, granularity="group", group_size=64).describe() == \
        "int4 asym per-group(64)"
    assert QuantSpec(symmetric=False).describe() == "int8 asym per-tensor"
    assert QuantSpec(granularity="token").describe() == "int8 sym per-token"


def test_spec_is_frozen_and_hashable() -> None:
    spec = QuantSpec()
    with pytest.raises(AttributeError):
        spec.bits = 4  # type: ignore[misc]
    assert len({QuantSpec(), QuantSpec(bits=8)}) == 1
