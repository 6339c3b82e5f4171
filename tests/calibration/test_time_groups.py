"""Time groups (TQ-DiT Eq. 9) from the calibration timesteps, and the run-time group of a timestep."""

import pytest
import torch

from ditq_compiler.calibration.batches import CalibrationError
from ditq_compiler.calibration.time_groups import describe_groups, group_boundaries, group_index


def test_a_100_step_ddpm_sampler_splits_into_ten_groups_of_ten_steps():
    timesteps = torch.arange(990, -1, -10).repeat(3)             # 100 sampler steps, each seen 3 times
    boundaries = group_boundaries(timesteps, 10)
    assert boundaries.tolist() == [95.0 + 100 * i for i in range(9)]
    groups = group_index(torch.arange(990, -1, -10), boundaries)
    assert groups.tolist() == [9 - i // 10 for i in range(100)]  # contiguous, 10 steps each, group 0 = t near 0
    assert group_index(torch.tensor([-5, 2000]), boundaries).tolist() == [0, 9]   # unseen timesteps: nearest end


def test_group_sizes_differ_by_at_most_one_and_cover_every_timestep():
    timesteps = torch.tensor([999, 958, 917, 876, 835, 794, 753])   # 7 distinct steps, 3 groups
    boundaries = group_boundaries(timesteps, 3)
    counts = torch.bincount(group_index(timesteps, boundaries), minlength=3)
    assert counts.tolist() == [2, 2, 3]                           # the noisiest group is the larger, as in from_sampler
    assert describe_groups(boundaries) == ["t <= 814.5", "814.5 < t <= 896.5", "t > 896.5"]
    assert group_boundaries(timesteps, 1).numel() == 0 and describe_groups(torch.zeros(0)) == ["all t"]


def test_more_groups_than_distinct_timesteps_is_an_error():
    with pytest.raises(CalibrationError, match="time_groups.groups=10, but the calibration set has only 4 distinct"):
        group_boundaries(torch.tensor([1, 2, 3, 4, 4]), 10)
