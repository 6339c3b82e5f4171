"""Per-timestep channel statistics, TaQ-DiT's momentum shift (Eq. 8) and outlier factors (Eq. 9)."""

import pytest
import torch

from ditq_compiler.calibration.channel_stats import ChannelStats, momentum_shift, outlier_factors


def test_stats_are_grouped_by_timestep_of_each_row():
    stats = ChannelStats()
    x = torch.tensor([[[1.0, 10.0], [3.0, 10.0]],     # row 0, t = 500: two tokens
                      [[5.0, -2.0], [7.0, 4.0]]])     # row 1, t = 10
    stats.update(x, torch.tensor([500, 10]))
    stats.update(torch.tensor([[[9.0, 0.0]]]), torch.tensor([10]))
    assert stats.sampling_order() == [500.0, 10.0]
    assert torch.equal(stats.sums[500.0] / stats.counts[500.0], torch.tensor([2.0, 10.0]))
    assert stats.counts[10.0] == 3
    assert torch.equal(stats.mins[10.0], torch.tensor([5.0, -2.0]))
    assert torch.equal(stats.maxs[10.0], torch.tensor([9.0, 4.0]))


def test_momentum_shift_follows_sampling_order():
    stats = ChannelStats()
    for t, value in ((10, 4.0), (900, 0.0), (500, 2.0)):   # fed out of order
        stats.update(torch.full((1, 3, 1), value), torch.tensor([t]))
    # sampling order 900 -> 500 -> 10: d = 0; d = .9*0 + .1*2 = .2; d = .9*.2 + .1*4 = .58
    assert momentum_shift(stats, "mean", 0.9).item() == pytest.approx(0.58)
    assert momentum_shift(stats, "mean", 0.0).item() == pytest.approx(4.0)   # last timestep only
    assert momentum_shift(stats, "mean", 1.0).item() == pytest.approx(0.0)   # first timestep only


def test_midrange_statistic_is_half_min_plus_max():
    stats = ChannelStats()
    stats.update(torch.tensor([[[0.0], [1.0], [1.0], [10.0]]]), torch.tensor([1]))
    assert momentum_shift(stats, "midrange").item() == pytest.approx(5.0)
    assert momentum_shift(stats, "mean").item() == pytest.approx(3.0)
    with pytest.raises(ValueError, match="unknown shift statistic 'median'"):
        momentum_shift(stats, "median")


def test_outlier_factors_shrink_the_top_k_channels_to_the_normal_range():
    x = torch.zeros(1, 4, 100)
    x[0, :, :] = torch.linspace(-1, 1, 4)[:, None]       # normal channels span [-1, 1]
    x[0, :, 7] = torch.tensor([-1.0, 0.0, 0.0, 7.0])      # channel 7: range 8
    x[0, :, 42] = torch.tensor([0.0, 0.0, 0.0, 4.0])      # channel 42: range 4
    stats = ChannelStats()
    stats.update(x, None)
    shift = torch.zeros(100)
    factors = outlier_factors(stats, shift, top_k=0.02)   # 2 channels
    assert factors[7].item() == pytest.approx(4.0) and factors[42].item() == pytest.approx(2.0)
    assert int((factors != 1).sum()) == 2
    # the normal range is measured after the shift: shifting channel 0 widens it
    shift[0] = 1.0
    assert outlier_factors(stats, shift, top_k=0.02)[7].item() == pytest.approx(8 / 3)
    # top-k channels no wider than the normal range keep factor 1 (never scaled up)
    wide = outlier_factors(stats, torch.zeros(100), top_k=0.5)
    assert bool((wide >= 1).all()) and int((wide > 1).sum()) == 2
