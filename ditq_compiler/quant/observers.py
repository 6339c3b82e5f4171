"""Observers: watch tensors during calibration and turn them into (scale, zero_point).

An observer reduces everything it has seen to a clipping range [lo, hi] per quantization
parameter, then hands that range to qparams_from_range:

    observer.update(x)                       # any number of times (activations) or once (a weight)
    lo, hi = observer.clip_range()
    scale, zero_point = observer.compute()   # == qparams_from_range(lo, hi, spec)

Internally x is seen as rows, one row per quantization parameter:

    granularity  rows                                  qparams shape
    tensor       x.reshape(1, -1)                      ()
    channel      x.movedim(axis, 0).reshape(C, -1)     (C,)                          C = x.shape[axis]
    group        x.reshape(-1, g)                      x.shape[:-1] + (x.shape[-1] // g,)

so every update must have the same qparams shape (same C; for groups, the same leading dims).
Per-token quantization is dynamic (fake_quantize_per_token) and has no observer.

    MinMaxObserver      lo, hi = min x, max x over all updates; exact, O(#qparams) memory.
    PercentileObserver  lo, hi = the (100 - p)-th and p-th percentile (nearest rank) of a sample.
    MSEObserver         lo, hi = a* (min x, max x), with
                        a* = argmin_{a in A} sum_x (x - fq_a(x))^2 over the sample,
                        A = 100 points evenly spaced in [0.30, 1.0]; ties go to the widest range,
                        so a = 1.0 (= min/max) is chosen unless clipping strictly helps.
    AbsMeanObserver     lo, hi = -gamma, gamma with gamma = mean |x| per row (ternary weights, BitNet
                        b1.58: the ternary scale is gamma itself, since qmax = 1).

Sample (percentile, mse): each update contributes at most max_samples_per_update values (columns
drawn uniformly with replacement, the same columns for every row), and the kept sample is a
uniform reservoir sample (Algorithm R) of at most max_samples values over all updates -- i.e.
max(1, max_samples // rows) values per row. max_samples=None keeps every value, which is what
weight_qparams does for a weight observed once. Sampling uses a seeded torch.Generator, so
results are reproducible. Which columns are drawn and where they land depends only on the shapes
of the updates, never on their values (``_SampledObserver._plan``).

Updates observed by several processes (``ditq_compiler.distributed``): each process summarises the
updates of its calibration batches (``part``: per-row min / max, the shape, per-row |x| sums, and the
columns a sample may keep), the processes exchange the summaries without the columns, and every
process folds all of them in batch order (``fold``): the min / max exactly as ``update`` would, the
|x| sums in the same order, and the sampled observers draw the same random columns and slots from
the shapes alone. ``columns_needed`` then says which columns of its own updates end in the sample,
and ``settle`` puts every process's kept columns in their slots; the MSE observer's candidates are then
split over the processes, each candidate's error computed whole by one of them. The result is bitwise
that of ``update`` called on every batch in order by one process.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from ditq_compiler.quant.fake import qparams_from_range, split_groups
from ditq_compiler.quant.spec import QuantSpec

MAX_SAMPLES = 2**20
MAX_SAMPLES_PER_UPDATE = 2**16
MSE_ALPHA_MIN, MSE_ALPHA_MAX, MSE_NUM_ALPHAS = 0.30, 1.0, 100
MSE_BLOCK_VALUES = 2**20


class NonFiniteError(ValueError):
    """An observed tensor held NaN or Inf."""


def rows_per_qparam(x: Tensor, spec: QuantSpec) -> tuple[Tensor, tuple[int, ...]]:
    """x as a (rows, n) matrix with one row per quantization parameter, and the qparams shape."""
    if spec.granularity == "tensor":
        return x.reshape(1, -1), ()
    if spec.granularity == "channel":
        if x.dim() == 0 or not -x.dim() <= spec.axis < x.dim():
            raise ValueError(f"QuantSpec.axis={spec.axis} is out of range for a tensor of shape {tuple(x.shape)}")
        channels = x.shape[spec.axis]
        return x.movedim(spec.axis, 0).reshape(channels, -1), (channels,)
    if spec.granularity == "group":
        grouped = split_groups(x, spec.group_size)
        return grouped.reshape(-1, spec.group_size), tuple(grouped.shape[:-1])
    raise ValueError(f"granularity {spec.granularity!r} has no observer (per-token qparams are computed at run time)")


class Observer:
    """Base observer: validates and reshapes each update and keeps the running per-row min / max.

    Subclasses choose the clipping range in _clip_rows() and may keep more data in _observe().
    """

    def __init__(self, spec: QuantSpec) -> None:
        if spec.granularity == "token":
            raise ValueError("per-token quantization is dynamic (min/max per token at run time); "
                             "there is nothing to observe")
        self.spec = spec
        self.num_updates = 0
        self._qparams_shape: tuple[int, ...] | None = None
        self._row_min: Tensor | None = None
        self._row_max: Tensor | None = None

    def update(self, x: Tensor) -> None:
        """Observe one tensor (accumulated in float32, no autograd)."""
        with torch.no_grad():
            rows, qparams_shape = self._rows(x)
            self._fold_range(qparams_shape, *rows.aminmax(dim=1), tuple(x.shape))
            self._observe(rows)
            self.num_updates += 1

    def _rows(self, x: Tensor) -> tuple[Tensor, tuple[int, ...]]:
        """``x`` checked and seen as rows, one per quantization parameter (float32)."""
        x = x.detach().to(torch.float32)
        if x.numel() == 0:
            raise ValueError(f"{type(self).__name__}.update: empty tensor of shape {tuple(x.shape)}")
        non_finite = int((~torch.isfinite(x)).sum().item())
        if non_finite:
            raise NonFiniteError(f"observed {non_finite} non-finite value(s) (NaN/Inf) among "
                                 f"{x.numel()} in a tensor of shape {tuple(x.shape)}")
        return rows_per_qparam(x, self.spec)

    def _fold_range(self, qparams_shape: tuple[int, ...], row_min: Tensor, row_max: Tensor,
                    shape: tuple[int, ...]) -> None:
        if self._qparams_shape is not None and qparams_shape != self._qparams_shape:
            raise ValueError(f"{type(self).__name__}.update: {self.spec.describe()} qparams shape changed "
                             f"from {self._qparams_shape} to {qparams_shape} (tensor shape {shape})")
        if self._row_min is None:
            self._qparams_shape, self._row_min, self._row_max = qparams_shape, row_min, row_max
        else:
            self._row_min = torch.minimum(self._row_min, row_min)
            self._row_max = torch.maximum(self._row_max, row_max)

    def _observe(self, rows: Tensor) -> None:
        """Hook for subclasses that keep more than the running min / max."""

    # ---- updates observed by several processes (module docstring) -----------------------------------
    def part(self, x: Tensor) -> UpdatePart:
        """What ``update(x)`` folds in, without changing this observer."""
        with torch.no_grad():
            rows, qparams_shape = self._rows(x)
            row_min, row_max = rows.aminmax(dim=1)
            return UpdatePart(qparams_shape, tuple(x.shape), row_min, row_max, rows.shape[1], self._extra(rows),
                              self._offer(rows))

    def _extra(self, rows: Tensor) -> Tensor | None:
        """Hook: a per-update statistic ``fold`` adds up (in update order)."""
        return None

    def _offer(self, rows: Tensor) -> Tensor | None:
        """Hook: the columns a sample may keep, when they are few enough to carry along."""
        return None

    def fold(self, parts: Sequence[UpdatePart]) -> None:
        """Fold in every update, in order, from their parts (``update`` on each, but for the sample)."""
        with torch.no_grad():
            for part in parts:
                self._fold_range(part.qparams_shape, part.row_min, part.row_max, part.shape)
                self._fold_extra(part)
                self.num_updates += 1

    def _fold_extra(self, part: UpdatePart) -> None:
        """Hook: what ``_observe`` does with an update, from its part."""

    def _clip_rows(self) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def clip_range(self) -> tuple[Tensor, Tensor]:
        """(lo, hi), each of the qparams shape: the range compute() quantizes to."""
        if self.num_updates == 0:
            raise ValueError(f"{type(self).__name__}: compute() / clip_range() called before any update()")
        with torch.no_grad():
            lo, hi = self._clip_rows()
        return lo.reshape(self._qparams_shape), hi.reshape(self._qparams_shape)

    def compute(self) -> tuple[Tensor, Tensor]:
        """(scale float32, zero_point int32) of the qparams shape."""
        return qparams_from_range(*self.clip_range(), self.spec)


@dataclass
class UpdatePart:
    """One update as ``Observer.part`` summarises it (``columns``: the offered columns, or None when the
    update is larger than a sample takes from it and ``columns_needed`` must name them)."""

    qparams_shape: tuple[int, ...]
    shape: tuple[int, ...]
    row_min: Tensor
    row_max: Tensor
    num_columns: int
    extra: Tensor | None = None
    columns: Tensor | None = None

    def light(self) -> UpdatePart:
        """The part without its columns: what the processes exchange."""
        return UpdatePart(self.qparams_shape, self.shape, self.row_min, self.row_max, self.num_columns, self.extra)


class MinMaxObserver(Observer):
    """Range = running min / max."""

    def _clip_rows(self) -> tuple[Tensor, Tensor]:
        return self._row_min, self._row_max


class AbsMeanObserver(Observer):
    """Range = +-mean |x| per row: the absmean scale of ternary (BitNet b1.58) quantization."""

    def __init__(self, spec: QuantSpec) -> None:
        super().__init__(spec)
        self._abs_sum: Tensor | None = None
        self._count = 0

    def _observe(self, rows: Tensor) -> None:
        self._add(self._extra(rows), rows.shape[1])

    def _extra(self, rows: Tensor) -> Tensor:
        return rows.abs().sum(dim=1, dtype=torch.float64)

    def _fold_extra(self, part: UpdatePart) -> None:
        self._add(part.extra, part.num_columns)

    def _add(self, sums: Tensor, count: int) -> None:
        self._abs_sum = sums if self._abs_sum is None else self._abs_sum + sums
        self._count += count

    def _clip_rows(self) -> tuple[Tensor, Tensor]:
        gamma = (self._abs_sum / self._count).to(torch.float32)
        return -gamma, gamma


class _ColumnReservoir:
    """Uniform sample (Algorithm R) of at most `capacity` columns out of all columns offered.

    ``plan(count)`` says where ``count`` offered columns go, drawing from the generator (it depends on how
    many columns were offered before, not on their values); ``place`` puts them there.
    """

    def __init__(self, capacity: int | None, generator: torch.Generator) -> None:
        self.capacity = capacity
        self.generator = generator
        self.samples: Tensor | None = None
        self.num_offered = 0
        self.filled = 0

    def plan(self, count: int) -> ReservoirPlan:
        """The first ``head`` columns fill free slots from ``start``; of the others, column i (1-based, over
        everything offered) replaces a uniform slot j < i if j < capacity. A slot drawn twice keeps the
        later column, as replacing one column after the other would."""
        room = count if self.capacity is None else self.capacity - self.filled
        head = min(room, count)
        start, tail = self.filled, count - head
        self.filled += head
        self.num_offered += head
        if tail == 0:
            return ReservoirPlan(start, head, _NO_INDEX, _NO_INDEX)
        index = self.num_offered + torch.arange(1, tail + 1, dtype=torch.float64)
        slot = (torch.rand(tail, generator=self.generator, dtype=torch.float64) * index).long()
        self.num_offered += tail
        positions = (slot < self.capacity).nonzero().flatten()
        slots = slot[positions]
        last = torch.full((self.capacity,), -1, dtype=torch.long).scatter_reduce_(0, slots, positions, "amax")
        kept = last[slots] == positions
        return ReservoirPlan(start, head, positions[kept] + head, slots[kept])

    def place(self, columns: Tensor, plan: ReservoirPlan) -> None:
        if self.samples is None:
            self.samples = columns[:, :0]
        self.samples = torch.cat([self.samples, columns[:, :plan.head]], dim=1)
        if len(plan.slots):
            self.samples[:, plan.slots.to(columns.device)] = columns[:, plan.positions.to(columns.device)]


_NO_INDEX = torch.zeros(0, dtype=torch.long)


@dataclass(frozen=True)
class ReservoirPlan:
    """Where one update's offered columns go: columns [0, head) to slots [start, start + head), then
    column ``positions[i]`` to slot ``slots[i]``."""

    start: int
    head: int
    positions: Tensor
    slots: Tensor


@dataclass(frozen=True)
class SamplePlan:
    """One update of a sampled observer: the columns it offers (``picked``; None: all) and where they go."""

    picked: Tensor | None
    reservoir: ReservoirPlan


class _SampledObserver(Observer):
    """Observer that also keeps a bounded, seeded random sample of the observed values."""

    def __init__(self, spec: QuantSpec, *, max_samples: int | None = MAX_SAMPLES,
                 max_samples_per_update: int | None = MAX_SAMPLES_PER_UPDATE, seed: int = 0) -> None:
        super().__init__(spec)
        for name, value in (("max_samples", max_samples), ("max_samples_per_update", max_samples_per_update)):
            if value is not None and value < 1:
                raise ValueError(f"{type(self).__name__}: {name} must be >= 1 or None, got {value}")
        self.max_samples = max_samples
        self.max_samples_per_update = None if max_samples is None else max_samples_per_update
        self.generator = torch.Generator().manual_seed(seed)
        self._reservoir: _ColumnReservoir | None = None
        self._plans: list[SamplePlan] = []      # folded updates' plans, until ``settle``
        self._dist = None                        # after ``settle``: the processes that share the clip search

    def _observe(self, rows: Tensor) -> None:
        plan = self._plan(*rows.shape)
        if plan.picked is not None:
            rows = rows[:, plan.picked.to(rows.device)]
        self._reservoir.place(rows.clone(), plan.reservoir)

    def _per_update(self, num_rows: int) -> int | None:
        return None if self.max_samples_per_update is None else max(1, self.max_samples_per_update // num_rows)

    def _plan(self, num_rows: int, num_columns: int) -> SamplePlan:
        """The columns one update offers and where they go: every draw from the generator happens here."""
        if self._reservoir is None:
            capacity = None if self.max_samples is None else max(1, self.max_samples // num_rows)
            self._reservoir = _ColumnReservoir(capacity, self.generator)
        per_update, picked = self._per_update(num_rows), None
        if per_update is not None and num_columns > per_update:
            picked = torch.randint(num_columns, (per_update,), generator=self.generator)
        return SamplePlan(picked, self._reservoir.plan(num_columns if picked is None else len(picked)))

    # ---- several processes: every process plans every update, then each places its own columns ---------
    def _offer(self, rows: Tensor) -> Tensor | None:
        per_update = self._per_update(rows.shape[0])
        return rows.clone() if per_update is None or rows.shape[1] <= per_update else None

    def _fold_extra(self, part: UpdatePart) -> None:
        self._plans.append(self._plan(part.row_min.numel(), part.num_columns))

    def columns_needed(self, updates: Sequence[int]) -> dict[int, Tensor]:
        """For each of ``updates`` (indices into the folded updates), the columns of that update's tensor
        (as rows, ``rows_per_qparam``) that end in the sample: after ``fold``, before ``settle``."""
        owner, where = self._owners()
        needed = {}
        for u in updates:
            slots = (owner == u).nonzero().flatten()
            picked = self._plans[u].picked
            positions = where[slots]
            needed[u] = positions if picked is None else picked[positions]
        return needed

    def _owners(self) -> tuple[Tensor, Tensor]:
        """For each slot of the final sample, the update whose column is there and that column's position
        among the update's offered columns."""
        size = self._reservoir.filled
        owner = torch.full((size,), -1, dtype=torch.long)
        where = torch.full((size,), -1, dtype=torch.long)
        for u, plan in enumerate(self._plans):
            r = plan.reservoir
            owner[r.start:r.start + r.head] = u
            where[r.start:r.start + r.head] = torch.arange(r.head)
            owner[r.slots] = u
            where[r.slots] = r.positions
        return owner, where

    def settle(self, columns: dict[int, Tensor], dist) -> None:
        """The sample, from every process's kept columns: ``columns[u]`` holds update ``u``'s columns named by
        ``columns_needed`` (in that order); ``dist`` combines the processes' (``Distributed.place``)."""
        owner, _ = self._owners()
        buffer = torch.zeros(self._row_min.numel(), len(owner), dtype=torch.float32)
        for u, values in columns.items():
            buffer[:, (owner == u).nonzero().flatten()] = values.to(torch.float32).cpu()
        self._reservoir.samples = dist.place(buffer).to(self._row_min.device)
        self._plans = []
        self._dist = dist

    @property
    def samples(self) -> Tensor:
        """The kept sample, (rows, n) float32."""
        if self._reservoir is None:
            raise ValueError(f"{type(self).__name__}: no samples before any update()")
        return self._reservoir.samples


class PercentileObserver(_SampledObserver):
    """Range = the (100 - p)-th and p-th percentiles of the sample, per row (p = spec.percentile)."""

    def _clip_rows(self) -> tuple[Tensor, Tensor]:
        samples = self.samples
        count = samples.shape[1]
        rank_hi = max(1, math.ceil(count * self.spec.percentile / 100.0))
        rank_lo = count + 1 - rank_hi
        return samples.kthvalue(rank_lo, dim=1).values, samples.kthvalue(rank_hi, dim=1).values


class MSEObserver(_SampledObserver):
    """Range = a* (min, max) with a* minimising the fake-quantization squared error on the sample, per row."""

    def _clip_rows(self) -> tuple[Tensor, Tensor]:
        samples, row_min, row_max = self.samples, self._row_min, self._row_max
        alphas = torch.linspace(MSE_ALPHA_MAX, MSE_ALPHA_MIN, MSE_NUM_ALPHAS, dtype=torch.float64)
        alphas = alphas.to(device=samples.device, dtype=torch.float32).unsqueeze(1)  # widest first
        scales, zero_points = qparams_from_range(alphas * row_min, alphas * row_max, self.spec)  # (alphas, rows)
        errors = torch.zeros(scales.shape, dtype=torch.float64, device=samples.device)
        mine = range(len(alphas)) if self._dist is None else self._dist.shard(len(alphas))   # settled: a share
        for rows, columns in _blocks(*samples.shape, MSE_BLOCK_VALUES):  # cache-sized pieces of the sample
            block = samples[rows, columns]
            for i in mine:
                errors[i, rows] += _squared_error_per_row(block, scales[i, rows], zero_points[i, rows], self.spec)
        if self._dist is not None:     # each candidate's errors come whole from one process
            errors = self._dist.place(errors)
        best_alpha = alphas[errors.argmin(dim=0), 0]  # first minimum: ties keep the wider range
        return best_alpha * row_min, best_alpha * row_max


def _blocks(num_rows: int, num_columns: int, block_values: int) -> Iterator[tuple[slice, slice]]:
    """(rows, columns) slices tiling a (num_rows, num_columns) matrix in blocks of about block_values."""
    columns_per_block = min(num_columns, block_values)
    rows_per_block = max(1, block_values // columns_per_block)
    for row in range(0, num_rows, rows_per_block):
        for column in range(0, num_columns, columns_per_block):
            yield slice(row, row + rows_per_block), slice(column, column + columns_per_block)


def _squared_error_per_row(samples: Tensor, scale: Tensor, zero_point: Tensor, spec: QuantSpec) -> Tensor:
    """sum_j (x_ij - fake_quantize(x_ij))^2 per row i, one (scale, zero_point) per row, in float64.

    The same float32 arithmetic as fake_quantize (so the values agree exactly), done in place.
    """
    s, z = scale.unsqueeze(1), zero_point.unsqueeze(1).to(torch.float32)
    fake = torch.round(samples / s).add_(z).clamp_(spec.qmin, spec.qmax).sub_(z).mul_(s)
    return fake.sub_(samples).double().square_().sum(dim=1)


_OBSERVERS: dict[str, type[Observer]] = {
    "minmax": MinMaxObserver,
    "percentile": PercentileObserver,
    "mse": MSEObserver,
    "absmean": AbsMeanObserver,
}


def make_observer(spec: QuantSpec, *, max_samples: int | None = MAX_SAMPLES) -> Observer:
    """The observer named by spec.observer. max_samples bounds the sample of percentile / mse
    observers (None: keep every value); min/max keeps no sample and ignores it."""
    if spec.granularity == "token":
        raise ValueError("make_observer: per-token quantization is dynamic (min/max per token at run time); "
                         "there is nothing to observe")
    observer_class = _OBSERVERS[spec.observer]
    if observer_class in (MinMaxObserver, AbsMeanObserver):
        return observer_class(spec)
    return observer_class(spec, max_samples=max_samples)


def weight_qparams(weight: Tensor, spec: QuantSpec) -> tuple[Tensor, Tensor]:
    """(scale, zero_point) for a weight, observed once and whole (no subsampling)."""
    observer = make_observer(spec, max_samples=None)
    observer.update(weight)
    return observer.compute()
