"""TQ-DiT's Hessian-guided scale search (Sec. III-B, Algorithm 1 phases 2 and 3).

Phase 2: the float graph runs forward on the calibration set, recording every quantized layer's
inputs and output Y; for ``metric: hessian`` a backward pass of the diffusion loss (Eq. 11)

    L = sum_rows || eps - eps_theta(x_t, t) ||^2

gives each layer's output gradient g = dL/dY (the noise ``eps`` that produced ``x_t`` comes with the
calibration set; ``from_sampler`` records it). Layers are the quantized linears/convs and the
attention matmuls; every layer sees its float inputs (the paper's Algorithm 1: no sequential
quantization). One pass records as many whole units (DiT blocks, ``reconstruct.unit_of``) as fit in
``RECORD_BUDGET_BYTES``; larger models take one pass per group of units.

Phase 3, per layer: a candidate quantizer is scored by the output error it causes, weighted by the
diagonal Fisher approximation of the Hessian (Eqs. 15-16),

    E(candidate) = sum over rows, elements of  g^2 (Y - Y_hat)^2          ("hessian")
                   sum over rows, elements of        (Y - Y_hat)^2         ("mse", the ablation baseline)

where Y_hat is the layer with its other operand at its current quantizer. Candidates are
``alpha * s0`` with ``s0`` the min/max step of the data and alpha on the grid
``eq_alpha + i (eq_beta - eq_alpha) / eq_n``, i = 0..eq_n, tried widest first (a tie keeps the wider
range). For ``rounds`` rounds: a linear/conv updates its weight scales (per output channel, where
the error separates by channel) and then its input quantizer; a matmul updates its first operand
(q, or the post-softmax P) and then its second (k^T, v). A time-grouped site is searched per group
on that group's rows only (Eq. 17); a two-region post-GELU site searches its positive step, then
its negative step; a post-softmax site searches s1 (s2 = 1/2^(k-1) is fixed).

Sums over rows. An error E is summed per calibration row in float64, the rows' errors per calibration
batch, and the batches' sums by a fixed binary tree over the batch index (``Distributed.ordered_sum``).
Over several processes (``ditq_compiler.distributed``) each records and scores only its shard of the
batches (the recorded tensors are split too); the candidates' per-batch sums, the ranges the candidates
are built from (min / max, exact) and the SQNRs are combined across the processes, every tree addition
with the same operands as in one process: every rank chooses the same candidates, bitwise those of one
process.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, fx
from tqdm.auto import tqdm

from ditq_compiler.activation_sites import SitePlan
from ditq_compiler.meta import ActivationSite, LayerAnnotation
from ditq_compiler.calibration.batches import CalibrationError
from ditq_compiler.calibration.params import QuantParams
from ditq_compiler.distributed import SINGLE, Distributed
from ditq_compiler.graph import unit_of
from ditq_compiler.calibration.time_groups import group_boundaries, group_index
from ditq_compiler.pipeline import fetch_attr
from ditq_compiler.quant import QuantSpec, fake_quantize, qparams_from_range, quantize
from ditq_compiler.quant.multi_region import gelu_two_region, levels, softmax_two_region, uniform
from ditq_compiler.recipe import ScaleSearchSpec

TINY = torch.finfo(torch.float32).tiny
RECORD_BUDGET_BYTES = 2**30   # layer inputs, outputs and gradients recorded per forward/backward pass


def candidate_alphas(spec: ScaleSearchSpec) -> Tensor:
    """The grid eq_alpha + i (eq_beta - eq_alpha) / eq_n, i = 0..eq_n, widest (largest) first."""
    i = torch.arange(spec.eq_n + 1, dtype=torch.float64)
    return (spec.eq_alpha + i * (spec.eq_beta - spec.eq_alpha) / spec.eq_n).flip(0).to(torch.float32)


# ---- rows, and sums over them ------------------------------------------------------------------------

@dataclass(frozen=True)
class Shard:
    """This rank's recorded rows: calibration batches [first, first + len(sizes)) of ``count``, ``sizes[i]``
    rows each, concatenated in batch order."""

    first: int
    sizes: tuple[int, ...]
    count: int
    dist: Distributed = SINGLE

    @classmethod
    def whole(cls, rows: int) -> Shard:
        """All rows in this process, as one batch."""
        return cls(0, (rows,), 1)

    def batch_of_rows(self) -> Tensor:
        return torch.repeat_interleave(torch.arange(len(self.sizes)), torch.tensor(self.sizes, dtype=torch.long))

    def sums(self, per_row: Iterable[Tensor], rows: Tensor | None = None) -> list[Tensor]:
        """For each item (first dim: the rows ``rows`` of this rank, or all of them, in order), its sum over
        every rank's rows: per batch, then over the batches by the fixed tree (module docstring)."""
        counts = torch.tensor(self.sizes) if rows is None else torch.bincount(self.batch_of_rows()[rows],
                                                                             minlength=len(self.sizes))
        bounds = [0, *torch.cumsum(counts, 0).tolist()]

        def per_batch(values: Tensor) -> Tensor:
            return torch.stack([values[a:b].to(torch.float64).sum(0) for a, b in zip(bounds, bounds[1:], strict=False)])
        return self.dist.ordered_sums((per_batch(v) for v in per_row), self.first, self.count)

    def extrema(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(min, max) of ``x`` (some of this rank's rows) over every rank's; (inf, -inf) when all are empty."""
        lo = x.min().float() if x.numel() else torch.tensor(math.inf)
        hi = x.max().float() if x.numel() else torch.tensor(-math.inf)
        return self.dist.minimum(lo), self.dist.maximum(hi)


def _row_errors(residual: Tensor) -> Tensor:
    """sum of squares of each row (dim 0) of ``residual``, in float64."""
    return residual.reshape(residual.shape[0], -1).square().sum(1, dtype=torch.float64)


# ---- quantizers under search -----------------------------------------------------------------------

class SiteQuantizer:
    """The quantizer of one activation site: a table of parameters per time group, and the search.

    ``x``: the site's values on this rank's rows (``shard``; default: all rows, in this process)."""

    def __init__(self, site: ActivationSite, x: Tensor, row_groups: Tensor | None, groups: int, alphas: Tensor,
                 shard: Shard | None = None):
        self.site, self.x, self.alphas = site, x, alphas
        self.shard = shard if shard is not None else Shard.whole(x.shape[0])
        self.bits = site.spec.bits
        if site.time_grouped:
            if row_groups is None or len(row_groups) != x.shape[0]:
                raise CalibrationError(f"site {site.layer} ({site.operand}): values of shape {tuple(x.shape)} "
                                       "are not batch-first, so they cannot be split by time group")
            self.row_groups = row_groups
            self.rows: list[Any] = [(row_groups == g).nonzero().flatten() for g in range(groups)]
        else:
            self.row_groups, self.rows = None, [slice(None)]
        self.tables = {name: torch.zeros(len(self.rows)) for name in site.parameters}
        self.ranges = [self.shard.extrema(x[rows]) for rows in self.rows]   # each group's (min, max), all ranks
        for g, (lo, hi) in enumerate(self.ranges):
            if not bool(torch.isfinite(lo)):
                raise CalibrationError(f"time group {g} has no calibration rows for {site.layer} ({site.operand})")
            for name, value in self._initial(lo, hi).items():
                self.tables[name][g] = value
        self.current = self.quantize_rows(x, slice(None))

    def _initial(self, lo: Tensor, hi: Tensor) -> dict[str, Tensor]:
        """alpha = 1: the min/max parameters of data spanning [lo, hi]."""
        n = levels(self.bits)
        if self.site.quantizer == "uniform":
            scale, zero_point = qparams_from_range(lo, hi, self.site.spec)
            return {"scale": scale, "zero_point": zero_point.float()}
        if self.site.quantizer == "softmax_mrq":
            return {"s1": (hi / n).clamp(TINY, 1.0 / n)}
        return {"s_neg": (-lo).clamp_min(0) / n + TINY, "s_pos": hi.clamp_min(0) / (n - 1) + TINY}

    def _steps(self, lo: Tensor, hi: Tensor) -> list[dict[str, Tensor]]:
        """Coordinate steps for one group's data (spanning [lo, hi]): each maps parameter -> candidate values
        (alphas,)."""
        a, n = self.alphas, levels(self.bits)
        start = self._initial(lo, hi)
        if self.site.quantizer == "uniform":
            scale, zero_point = qparams_from_range(a * lo, a * hi, self.site.spec)
            return [{"scale": scale, "zero_point": zero_point.float()}]
        if self.site.quantizer == "softmax_mrq":
            return [{"s1": (a * start["s1"]).clamp(TINY, 1.0 / n)}]
        return [{"s_pos": a * start["s_pos"]}, {"s_neg": a * start["s_neg"]}]

    def _trial(self, x: Tensor, params: Mapping[str, Tensor], step: Mapping[str, Tensor]) -> Callable[[int], Tensor]:
        """``trial(i)``: ``x`` quantized with candidate i of ``step``, the other parameters at ``params``.

        A post-GELU step only recomputes its own sign (the other sign's part is fixed); the values are
        identical to ``gelu_two_region``'s, which adds the two parts the same way.
        """
        if self.site.quantizer != "gelu_mrq":
            return lambda i: self._apply(x, {**params, **{k: v[i] for k, v in step.items()}})
        n = levels(self.bits)
        if "s_pos" in step:
            fixed = gelu_two_region(x.clamp(max=0), params["s_neg"], 1.0, self.bits)
            positive, candidates = x.float().clamp(min=0), step["s_pos"]
            return lambda i: (positive / candidates[i]).round_().clamp_(max=n - 1).mul_(candidates[i]).add_(fixed)
        fixed = gelu_two_region(x.clamp(min=0), 1.0, params["s_pos"], self.bits)
        negative, candidates = x.float().clamp(max=0), step["s_neg"]
        return lambda i: (negative / candidates[i]).round_().clamp_(min=-n).mul_(candidates[i]).add_(fixed)

    def _apply(self, x: Tensor, p: Mapping[str, Tensor]) -> Tensor:
        if self.site.quantizer == "uniform":
            return uniform(x, p["scale"], p["zero_point"], self.bits)
        if self.site.quantizer == "softmax_mrq":
            return softmax_two_region(x, p["s1"], self.bits)
        return gelu_two_region(x, p["s_neg"], p["s_pos"], self.bits)

    def quantize_rows(self, x: Tensor, rows: Any) -> Tensor:
        """``x`` (the calibration rows ``rows``) through the current tables, each row with its group's row."""
        if self.row_groups is None:
            params = {k: v[0] for k, v in self.tables.items()}
        else:
            groups = self.row_groups[rows]
            shape = (len(groups),) + (1,) * (x.dim() - 1)
            params = {k: v[groups].reshape(shape) for k, v in self.tables.items()}
        return self._apply(x, params)

    def search(self, evaluator: Callable[[Any], Callable[[Tensor], float | Tensor]]) -> None:
        """Per group, per coordinate step: keep the candidate with the smallest error (the first of equal ones).

        ``evaluator(rows)(value)``: the error of ``value`` on ``rows``, a number, or each row's error (summed
        over every rank's rows of the group by ``shard.sums``)."""
        for g, rows in enumerate(self.rows):
            x = self.x[rows]
            score = evaluator(rows)
            for step in self._steps(*self.ranges[g]):
                trial = self._trial(x, {k: v[g] for k, v in self.tables.items()}, step)
                errors = [score(trial(i)) for i in range(len(self.alphas))]
                if isinstance(errors[0], Tensor):
                    errors = self.shard.sums([torch.stack(errors, dim=1)], None if isinstance(rows, slice) else rows)[0]
                best = _first_minimum(torch.as_tensor(errors, dtype=torch.float64))
                for k, v in step.items():
                    self.tables[k][g] = v[best]
        self.current = self.quantize_rows(self.x, slice(None))


class WeightQuantizer:
    """Per-channel (or per-tensor) weight scales around the min/max ones, searched per output channel."""

    def __init__(self, weight: Tensor, spec: QuantSpec, alphas: Tensor):
        self.weight, self.spec, self.alphas = weight.detach().float(), spec, alphas
        if spec.granularity == "channel":
            self.lo, self.hi = self.weight.reshape(self.weight.shape[0], -1).aminmax(dim=1)
        else:
            self.lo, self.hi = self.weight.min(), self.weight.max()
        self.scale, self.zero_point = qparams_from_range(self.lo, self.hi, spec)
        self.current = fake_quantize(self.weight, self.scale, self.zero_point, spec)

    def search(self, channel_errors: Callable[[Tensor], Tensor],
               sums: Callable[[Iterable[Tensor]], list[Tensor]] | None = None) -> None:
        """Per channel, the candidate scale with the smallest error (the first of equal ones).

        ``channel_errors(w)``: the error of each output channel with weight ``w``, or, with ``sums``, its
        per-row parts that ``sums`` adds up over every rank's rows (``Shard.sums``)."""
        candidates = [qparams_from_range(alpha * self.lo, alpha * self.hi, self.spec) for alpha in self.alphas]
        found = (channel_errors(fake_quantize(self.weight, scale, zero_point, self.spec))
                 for scale, zero_point in candidates)
        best_error = None
        for (scale, zero_point), errors in zip(candidates, found if sums is None else sums(found), strict=True):
            if self.spec.granularity != "channel":
                errors = errors.sum()
            if best_error is None:
                best_error, self.scale, self.zero_point = errors, scale, zero_point
                continue
            better = errors < best_error
            best_error = torch.where(better, errors, best_error)
            self.scale = torch.where(better, scale, self.scale)
            self.zero_point = torch.where(better, zero_point, self.zero_point)
        self.current = fake_quantize(self.weight, self.scale, self.zero_point, self.spec)

    def codes(self) -> tuple[Tensor, Tensor, Tensor]:
        return quantize(self.weight, self.scale, self.zero_point, self.spec), self.scale, self.zero_point


def _first_minimum(errors: Tensor) -> int:
    """The index of the smallest error, the first of equal ones (NaN never wins)."""
    return int(torch.nan_to_num(errors, nan=math.inf).argmin())


# ---- layers ----------------------------------------------------------------------------------------

class _Layer:
    """A layer's recorded output Y, output gradient g (None for the plain MSE) and quantized operands.

    The error sum g^2 (Y_hat - Y)^2 is computed as the squared norm of g Y_hat - g Y, in place on Y_hat.
    """

    def __init__(self, y: Tensor, grad: Tensor | None, shard: Shard):
        self.y, self.grad, self.shard = y, grad, shard
        self.grad_y = None if grad is None else grad * y

    def residual(self, out: Tensor) -> Tensor:
        """g (out - Y) over all rows, computed in place on ``out``."""
        return out.sub_(self.y) if self.grad is None else out.mul_(self.grad).sub_(self.grad_y)

    def output(self, operands: Sequence[Tensor]) -> Tensor:
        raise NotImplementedError

    def operand_values(self, rows: Any) -> list[Tensor]:
        raise NotImplementedError

    def evaluator(self, which: int) -> Callable[[Any], Callable[[Tensor], Tensor]]:
        """``evaluator(rows)(value)``: the weighted error of each row of ``rows`` with operand ``which`` set to
        ``value``."""
        def for_rows(rows: Any) -> Callable[[Tensor], Tensor]:
            restricted = _Rows(self, rows)
            others = self.operand_values(rows)

            def score(value: Tensor) -> Tensor:
                operands = list(others)
                operands[which] = value
                return _row_errors(restricted.residual(self.output(operands)))
            return score
        return for_rows

    def sqnr_db(self) -> float:
        noise, signal = self.shard.sums([_row_errors(self.output(self.operand_values(slice(None))) - self.y),
                                         _row_errors(self.y)])
        noise, signal = float(noise), float(signal)
        return math.inf if noise == 0 else 10 * math.log10(max(signal, 1e-300) / noise)


class _Rows:
    """A layer's Y and g restricted to some calibration rows (indexed once, used for every candidate)."""

    def __init__(self, layer: _Layer, rows: Any):
        self.y = layer.y[rows]
        self.grad = None if layer.grad is None else layer.grad[rows]
        self.grad_y = None if layer.grad is None else layer.grad_y[rows]

    def residual(self, out: Tensor) -> Tensor:
        return out.sub_(self.y) if self.grad is None else out.mul_(self.grad).sub_(self.grad_y)


class _WeightedLayer(_Layer):
    """A linear or conv2d: operand 0 is the input (a site, or float), operand 1 the weight."""

    def __init__(self, node: fx.Node, gm: fx.GraphModule, spec: QuantSpec, site: SiteQuantizer | None,
                 x: Tensor, y: Tensor, grad: Tensor | None, alphas: Tensor, shard: Shard):
        super().__init__(y, grad, shard)
        self.site, self.x = site, x
        self.bias = fetch_attr(gm, node.args[2].target).detach() if len(node.args) > 2 and node.args[2] is not None \
            else None
        self.weight_q = WeightQuantizer(fetch_attr(gm, node.args[1].target), spec, alphas)
        self.conv = None
        if node.target is torch.ops.aten.conv2d.default:
            stride, padding, dilation, groups = (list(node.args) + [None] * 7)[3:7]
            self.conv = (stride or [1, 1], padding or [0, 0], dilation or [1, 1], groups or 1)

    def output(self, operands: Sequence[Tensor]) -> Tensor:
        x, w = operands
        return F.linear(x, w, self.bias) if self.conv is None else F.conv2d(x, w, self.bias, *self.conv)

    def operand_values(self, rows: Any) -> list[Tensor]:
        x = self.x[rows] if self.site is None else (self.site.current[rows])
        return [x, self.weight_q.current]

    def channel_errors(self, w: Tensor) -> Tensor:
        """Each row's error per output channel (rows, channels), in float64."""
        square = self.residual(self.output([self.operand_values(slice(None))[0], w])).square_()
        if self.conv is None:
            return square.reshape(square.shape[0], -1, square.shape[-1]).sum(1, dtype=torch.float64)
        return square.sum(tuple(range(2, square.dim())), dtype=torch.float64)

    def search_round(self) -> None:
        self.weight_q.search(self.channel_errors, self.shard.sums)
        if self.site is not None:
            self.site.search(self.evaluator(0))


class _MatmulLayer(_Layer):
    """An attention matmul: both operands are sites; the post-softmax (or q) operand is searched first."""

    def __init__(self, sites: list[SiteQuantizer], y: Tensor, grad: Tensor | None, shard: Shard):
        super().__init__(y, grad, shard)
        self.sites = sorted(sites, key=lambda s: s.site.arg)

    def output(self, operands: Sequence[Tensor]) -> Tensor:
        return torch.matmul(*operands)

    def operand_values(self, rows: Any) -> list[Tensor]:
        return [s.current[rows] for s in self.sites]

    def search_round(self) -> None:
        order = sorted(range(2), key=lambda i: self.sites[i].site.kind != "post_softmax")
        for i in order:
            self.sites[i].search(self.evaluator(i))


# ---- phase 2: forward (and backward) passes over the calibration set ---------------------------------

class _Collector(fx.Interpreter):
    """Records the inputs and outputs of ``layers``; with ``probe``, adds a zero leaf to each output so
    the gradient of the loss with respect to it can be read (the graph itself stays intact)."""

    def __init__(self, gm: fx.GraphModule, layers: Mapping[str, Sequence[int]], probe: bool):
        super().__init__(gm)
        self.layers, self.probe = layers, probe
        self.inputs: dict[tuple[str, int], Tensor] = {}
        self.outputs: dict[str, Tensor] = {}
        self.probes: dict[str, Tensor] = {}

    def run_node(self, node: fx.Node) -> Any:
        if node.name in self.layers:
            for i in self.layers[node.name]:
                self.inputs[(node.name, i)] = self.env[node.args[i]].detach()
        out = super().run_node(node)
        if node.name in self.layers:
            self.outputs[node.name] = out.detach()
            if self.probe:
                self.probes[node.name] = torch.zeros_like(out, requires_grad=True)
                out = out + self.probes[node.name]
        return out


def _prediction(output: Any) -> Tensor:
    leaves = torch.utils._pytree.tree_leaves(output)
    found = next((t for t in leaves if isinstance(t, Tensor) and t.is_floating_point()), None)
    if found is None:
        raise CalibrationError("the model returned no floating-point tensor to take the diffusion loss of")
    return found


def collect(gm: fx.GraphModule, layers: Mapping[str, Sequence[int]], batches: list[list[Any]],
            noise: list[Tensor] | None) -> tuple[dict, dict, dict]:
    """(inputs by (node, arg), outputs by node, output gradients by node) over all batches, concatenated."""
    inputs: dict[tuple[str, int], list[Tensor]] = {}
    outputs: dict[str, list[Tensor]] = {}
    grads: dict[str, list[Tensor]] = {}
    for i, flat in enumerate(batches):
        collector = _Collector(gm, layers, noise is not None)
        with torch.set_grad_enabled(noise is not None):
            prediction = _prediction(collector.run(*flat))
            if noise is not None:
                eps = noise[i]
                if prediction.shape[0] != eps.shape[0] or prediction.shape[1] < eps.shape[1] \
                        or prediction.shape[2:] != eps.shape[2:]:
                    raise CalibrationError(f"calibration batch {i}: the noise has shape {tuple(eps.shape)}, the "
                                           f"model predicts {tuple(prediction.shape)}")
                loss = (prediction[:, :eps.shape[1]] - eps.to(prediction.dtype)).square().sum()   # Eq. 11
                names = list(collector.probes)
                values = torch.autograd.grad(loss, [collector.probes[n] for n in names], allow_unused=True)
                for name, value, probe in zip(names, values, (collector.probes[n] for n in names), strict=True):
                    grads.setdefault(name, []).append(torch.zeros_like(probe) if value is None else value.detach())
        for key, value in collector.inputs.items():
            inputs.setdefault(key, []).append(value)
        for key, value in collector.outputs.items():
            outputs.setdefault(key, []).append(value)
    cat = lambda d: {k: torch.cat(v) for k, v in d.items()}  # noqa: E731
    return cat(inputs), cat(outputs), cat(grads)


# ---- the search ------------------------------------------------------------------------------------

def check_search_inputs(spec: ScaleSearchSpec | None, batches: Sequence[Any], noise: list[Tensor] | None) -> None:
    """The errors ``search_scales`` would hit, raised before any work is done."""
    if spec is None:
        return
    if not batches:
        raise CalibrationError("the scale search needs calibration batches; the calibration set is empty")
    if spec.metric == "hessian" and noise is None:
        raise CalibrationError("scale_search.metric 'hessian' weights the output error with gradients of the "
                               "diffusion loss (Eq. 11), which needs the noise eps of each calibration input: "
                               "use dq.calibration.from_sampler(...) (its sets carry eps), or metric: mse")
    if noise is not None and len(noise) != len(batches):
        raise CalibrationError(f"{len(noise)} noise batches for {len(batches)} calibration batches")


def search_scales(gm: fx.GraphModule, annotations: Mapping[str, LayerAnnotation], plan: SitePlan,
                  batches: list[list[Any]], spec: ScaleSearchSpec, noise: list[Tensor] | None = None,
                  timestep_index: int | None = None, progress: bool = True,
                  dist: Distributed = SINGLE) -> QuantParams:
    """Search every quantized layer's weight scales and every site's parameters (see the module doc).

    Returns the weight codes, every site's table (``site_tables``), the time-group ``boundaries``, the
    static input quantizers that ``quant_linear`` holds itself (``activations``) and each layer's SQNR.

    ``noise``: per batch, the eps of Eq. 11 (needed for ``metric: hessian``). ``dist``: this rank records
    and scores its shard of the batches (module doc).
    """
    check_search_inputs(spec, batches, noise)
    alphas = candidate_alphas(spec)
    result = QuantParams()
    mine = dist.shard(len(batches))
    shard = Shard(mine.start, tuple(batch_rows(batches[i]) for i in mine), len(batches), dist)
    row_groups = None
    if any(s.time_grouped for s in plan.sites):
        if timestep_index is None:
            raise CalibrationError("time_groups needs the model's timestep input, and this model has none")
        timesteps = torch.cat([torch.as_tensor(f[timestep_index]).reshape(-1).expand(batch_rows(f))
                               for f in batches])
        result.boundaries = group_boundaries(timesteps, plan.groups)
        first = sum(batch_rows(f) for f in batches[:mine.start])
        row_groups = group_index(timesteps, result.boundaries)[first:first + sum(shard.sizes)]
    names = {name: a.name for name, a in annotations.items()} | {n: m.name for n, m in plan.matmuls.items()}
    units: dict[str, list[str]] = {}
    for node in gm.graph.nodes:
        if node.name in names:
            units.setdefault(unit_of(names[node.name]), []).append(node.name)
    nodes = {n.name: n for n in gm.graph.nodes}
    rows = max(sum(batch_rows(batches[i]) for i in dist.shard_of(r, len(batches))) for r in range(dist.world_size))
    local = [batches[i] for i in mine]
    local_noise = None if noise is None or spec.metric != "hessian" else [noise[i] for i in mine]
    bar = tqdm(total=len(names), desc=f"scale search ({spec.metric})", unit="layer", disable=not progress)
    for members in _passes(units, nodes, plan, rows):
        wanted = {name: [s.arg for s in plan.of(name)] or [0] for name in members}
        inputs, outputs, grads = collect(gm, wanted, local, local_noise)
        for name in members:
            bar.set_postfix_str(names[name])
            sites = {s.arg: SiteQuantizer(s, inputs[(name, s.arg)], row_groups, plan.groups, alphas, shard)
                     for s in plan.of(name)}
            grad = grads.get(name)
            if name in plan.matmuls:
                layer: Any = _MatmulLayer(list(sites.values()), outputs[name], grad, shard)
            else:
                layer = _WeightedLayer(nodes[name], gm, annotations[name].weights, sites.get(0),
                                       inputs[(name, 0)], outputs[name], grad, alphas, shard)
            for _ in range(spec.rounds):
                layer.search_round()
            if name not in plan.matmuls:
                result.weights[name] = layer.weight_q.codes()
            for site in sites.values():
                result.site_tables[site.site.key] = {k: v.to(torch.int32) if k == "zero_point" else v.clone()
                                                for k, v in site.tables.items()}
            result.layer_sqnr[name] = layer.sqnr_db()
            bar.update(1)
        del inputs, outputs, grads
    bar.close()
    result.activations = result.linear_input_qparams(plan.sites)
    return result


def _passes(units: Mapping[str, list[str]], nodes: Mapping[str, fx.Node], plan: SitePlan, rows: int,
            budget: int = RECORD_BUDGET_BYTES) -> list[list[str]]:
    """Units grouped into forward/backward passes whose recorded tensors (inputs, output, gradient of every
    layer, over all ``rows``) stay within ``budget`` bytes; a unit larger than the budget gets a pass alone."""
    def size(name: str) -> int:
        node = nodes[name]
        args = [s.arg for s in plan.of(name)] or [0]
        values = [node.meta.get("val")] * 2 + [node.args[i].meta.get("val") for i in args]
        return sum(4 * rows * math.prod(int(d) for d in v.shape[1:]) for v in values if isinstance(v, Tensor))

    return [[name for members in group for name in members]
            for group in pack_by_budget(list(units.values()), lambda members: sum(map(size, members)), budget)]


def pack_by_budget(items: Sequence[Any], cost: Callable[[Any], int], budget: int) -> list[list[Any]]:
    """``items`` in order, grouped greedily so each group's summed ``cost`` stays within ``budget`` (an item
    costlier than the budget gets a group alone): the forward passes a recording calibrator runs."""
    groups: list[list[Any]] = []
    used = budget
    for item in items:
        price = cost(item)
        if used + price > budget:
            groups.append([])
            used = 0
        groups[-1].append(item)
        used += price
    return groups


def batch_rows(flat: list[Any]) -> int:
    """Rows of one flat calibration call: the first dim of its first tensor input with one."""
    return next(v.shape[0] for v in flat if isinstance(v, Tensor) and v.dim() > 0)


__all__ = ["Shard", "SiteQuantizer", "WeightQuantizer", "batch_rows", "candidate_alphas", "check_search_inputs",
           "collect", "pack_by_budget", "search_scales"]
