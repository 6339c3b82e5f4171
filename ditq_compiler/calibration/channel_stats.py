"""Per-channel statistics of linear inputs per timestep, and TaQ-DiT's shifts and outlier factors.

For a linear input x with C channels, accumulated per calibration timestep t over samples and tokens:
sum_j, count, min_j, max_j. From them (TaQ-DiT, Sec. III-B):

    Eq. 6   d_t,j = mean over (samples, tokens) at t of x_j        statistic "mean" (the paper)
            d_t,j = (min_t,j + max_t,j) / 2                         statistic "midrange" (authors' code)
    Eq. 8   in sampling order t_1 > t_2 > ... (noise first):  d = d_t1,  then  d <- m d + (1 - m) d_t
    Eq. 9   after the shift, channel j spans range_j = max_j - min_j (the shift does not change it).
            O = the ceil(k C) channels with the largest range_j (k = top_k); the normal channels N
            span R_N = max_{j in N}(max_j - d_j) - min_{j in N}(min_j - d_j), the range the tensor-wise
            scale is computed from. a_j = max(1, range_j / R_N) for j in O, a_j = 1 elsewhere.

min_j / max_j here are over all calibration timesteps: the factors are static.

Over several processes (``ditq_compiler.distributed``) each runs its shard of the batches and keeps
each batch's statistics apart; the processes exchange them and every process adds them up in batch
order, as one process does, so the shifts and factors are bitwise the same.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Mapping

import torch
from torch import Tensor, fx
from tqdm.auto import tqdm

from ditq_compiler.calibration.params import QuantParams
from ditq_compiler.calibration.observe import InputObservingInterpreter
from ditq_compiler.distributed import SINGLE, Distributed
from ditq_compiler.meta import LayerAnnotation
from ditq_compiler.recipe import Recipe


@dataclass
class ChannelStats:
    """Accumulators of one linear input, keyed by timestep value (0.0 when the model has none)."""

    sums: dict[float, Tensor] = field(default_factory=dict)
    counts: dict[float, int] = field(default_factory=dict)
    mins: dict[float, Tensor] = field(default_factory=dict)
    maxs: dict[float, Tensor] = field(default_factory=dict)

    def update(self, x: Tensor, timesteps: Tensor | None) -> None:
        self.add(batch_stats(x, timesteps))

    def add(self, batch: dict[float, tuple[Tensor, int, Tensor, Tensor]]) -> None:
        """Fold in one batch's (sum, count, min, max) per timestep (``batch_stats``)."""
        for k, (total, count, lo, hi) in batch.items():
            if k in self.sums:
                self.sums[k] += total
                self.counts[k] += count
                self.mins[k] = torch.minimum(self.mins[k], lo)
                self.maxs[k] = torch.maximum(self.maxs[k], hi)
            else:
                self.sums[k], self.counts[k], self.mins[k], self.maxs[k] = total, count, lo, hi

    def sampling_order(self) -> list[float]:
        """Timesteps as the sampler visits them: largest (noisiest) first."""
        return sorted(self.sums, reverse=True)

    def channel_range(self) -> tuple[Tensor, Tensor]:
        keys = self.sampling_order()
        return (torch.stack([self.mins[k] for k in keys]).amin(0), torch.stack([self.maxs[k] for k in keys]).amax(0))


def batch_stats(x: Tensor, timesteps: Tensor | None) -> dict[float, tuple[Tensor, int, Tensor, Tensor]]:
    """One batch's per-channel (sum, count, min, max) of ``x``, per timestep value."""
    x = x.detach().to(torch.float32)
    rows = x.reshape(x.shape[0], -1, x.shape[-1]) if x.dim() > 1 else x.reshape(1, 1, -1)
    keys = torch.zeros(rows.shape[0]) if timesteps is None else _per_row(timesteps, rows.shape[0])
    found = {}
    for key in keys.unique().tolist():
        flat = rows[keys == key].reshape(-1, rows.shape[-1])
        found[float(key)] = (flat.sum(0), flat.shape[0], flat.amin(0), flat.amax(0))
    return found


def _per_row(timesteps: Tensor, rows: int) -> Tensor:
    t = timesteps.detach().reshape(-1).to(torch.float64)
    if t.numel() == 1:
        return t.expand(rows)
    if t.numel() != rows:
        raise ValueError(f"timestep input has {t.numel()} values for a batch of {rows} samples")
    return t


def collect_channel_stats(gm: fx.GraphModule, node_names: list[str], batches: list[list[Any]],
                          timestep_index: int | None, progress: bool = True,
                          dist: Distributed = SINGLE) -> dict[str, ChannelStats]:
    """Statistics of the first input of each node in ``node_names`` over the calibration batches (this
    rank's shard of them, then every rank's in batch order: the module docstring)."""
    per_batch: dict[int, dict[str, dict]] = {}
    with torch.no_grad():
        for i in tqdm(dist.shard(len(batches)), desc="channel stats", unit="batch", disable=not progress):
            flat = batches[i]
            t = flat[timestep_index] if timestep_index is not None else None
            t = torch.as_tensor(t) if t is not None else None
            found = per_batch[i] = {}
            callbacks = {name: (lambda x, name=name, t=t, found=found: found.__setitem__(name, batch_stats(x, t)))
                         for name in node_names}
            InputObservingInterpreter(gm, callbacks, i, t.reshape(-1) if t is not None else None).run(*flat)
    everyone = {i: found for rank_batches in dist.gather(per_batch) for i, found in rank_batches.items()}
    stats = {name: ChannelStats() for name in node_names}
    for i in sorted(everyone):
        for name, found in everyone[i].items():
            stats[name].add(found)
    return stats


def momentum_shift(stats: ChannelStats, statistic: str = "mean", momentum: float = 0.95) -> Tensor:
    """Eq. 8 over the per-timestep shifts of Eq. 6, in sampling order."""
    shift = None
    for k in stats.sampling_order():
        if statistic == "mean":
            current = stats.sums[k] / stats.counts[k]
        elif statistic == "midrange":
            current = (stats.mins[k] + stats.maxs[k]) / 2
        else:
            raise ValueError(f"unknown shift statistic {statistic!r}; expected 'mean' or 'midrange'")
        shift = current if shift is None else momentum * shift + (1 - momentum) * current
    if shift is None:
        raise ValueError("no calibration data reached this layer, so no shift can be computed")
    return shift


def outlier_factors(stats: ChannelStats, shift: Tensor, top_k: float) -> Tensor:
    """Eq. 9: per-channel factors, > 1 only on the top-k channels by range."""
    lo, hi = stats.channel_range()
    ranges = hi - lo
    channels = ranges.numel()
    k = min(channels - 1, math.ceil(top_k * channels))
    factors = torch.ones(channels)
    if k <= 0:
        return factors
    outliers = ranges.topk(k).indices
    normal = torch.ones(channels, dtype=torch.bool)
    normal[outliers] = False
    normal_range = (hi - shift)[normal].max() - (lo - shift)[normal].min()
    if float(normal_range) <= 0:
        return factors
    factors[outliers] = (ranges[outliers] / normal_range).clamp_min(1.0)
    return factors


def calibrate_transforms(gm: fx.GraphModule, annotations: Mapping[str, LayerAnnotation], recipe: Recipe,
                         batches: list[list[Any]], timestep_index: int | None,
                         progress: bool = True, dist: Distributed = SINGLE) -> QuantParams:
    """The shifts (and migration factors) the recipe asks for, by linear node name (``QuantParams.shifts``,
    ``.factors``).

    Sites: the fc2 layers (their input is the post-GELU activation) or, with ``sites: all``,
    every quantized linear with a static input quantizer.
    """
    if recipe.shift is None:
        return QuantParams()
    sites = [name for name, a in annotations.items()
             if a.op == "linear" and a.activations is not None and a.activations.granularity != "token"
             and (recipe.shift.sites == "all" or a.role == "fc2")]
    if not sites:
        return QuantParams()
    if not batches:
        raise ValueError(f"recipe '{recipe.name}' shifts the inputs of {len(sites)} layers (e.g. "
                         f"'{annotations[sites[0]].name}'), which needs calibration batches")
    stats = collect_channel_stats(gm, sites, batches, timestep_index, progress, dist)
    shifts = {name: momentum_shift(stats[name], recipe.shift.statistic, recipe.shift.momentum) for name in sites}
    factors = {}
    if recipe.migration is not None:
        factors = {name: outlier_factors(stats[name], shifts[name], recipe.migration.top_k) for name in sites}
    return QuantParams(shifts=shifts, factors=factors)
