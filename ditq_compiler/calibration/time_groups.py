"""Time groups (TQ-DiT Eq. 9): contiguous timestep ranges, each with its own activation parameters.

The paper splits the sampler's T timesteps into G groups of T / G consecutive timesteps. The
compiler sees the sampler through the calibration set, so the groups are built from the distinct
timestep values present in it: taken in sampling order (largest first) they are split into G
contiguous runs (sizes differ by at most one and the noisier runs are the larger, exactly like
``from_sampler``'s ``time_groups`` selection, so a set drawn with the same G lines up). The boundary
between neighbouring runs is the midpoint between them. Group 0 holds the smallest timesteps (the
paper's G_1, the end of sampling). At run time a timestep t, seen or not, falls in

    group(t) = #{i : t > b_i}                      (``group_index``; in the graph: unsqueeze, gt, sum)

so timesteps below the first boundary use group 0 and those above the last use group G - 1.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ditq_compiler.calibration.batches import CalibrationError


def group_boundaries(timesteps: Tensor, groups: int) -> Tensor:
    """The G - 1 ascending boundaries (float32) of ``groups`` groups over the distinct ``timesteps``."""
    distinct = torch.as_tensor(timesteps).detach().reshape(-1).to(torch.float64).unique()
    if len(distinct) < groups:
        raise CalibrationError(f"time_groups.groups={groups}, but the calibration set has only {len(distinct)} "
                               f"distinct timesteps ({distinct.tolist()[:8]}...): draw it from more sampler steps "
                               "(from_sampler(selection='time_groups', groups=G)) or use fewer groups")
    runs = [run.flip(0) for run in distinct.flip(0).tensor_split(groups)][::-1]   # split in sampling order
    return torch.tensor([(runs[i][-1] + runs[i + 1][0]) / 2 for i in range(groups - 1)], dtype=torch.float32)


def group_index(timesteps: Tensor, boundaries: Tensor) -> Tensor:
    """group(t) = number of boundaries below t (int64, the shape of ``timesteps``)."""
    return (torch.as_tensor(timesteps).unsqueeze(-1) > boundaries).sum(-1)


def describe_groups(boundaries: Tensor) -> list[str]:
    """One label per group: the timestep range it covers, e.g. ``t <= 94.5``, ``94.5 < t <= 194.5``."""
    b = [f"{float(v):g}" for v in boundaries]
    if not b:
        return ["all t"]
    return [f"t <= {b[0]}", *(f"{lo} < t <= {hi}" for lo, hi in zip(b, b[1:], strict=False)), f"t > {b[-1]}"]


__all__ = ["describe_groups", "group_boundaries", "group_index"]
