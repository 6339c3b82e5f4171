"""Choosing the smoothing factors ``s`` of each site (``passes/smooth_through_modulation.py``).

For a site ``X`` (C channels) read by linears or convs ``W_1 .. W_m`` (their input channels the columns of
``W = [W_1; ...; W_m]``), SmoothQuant's rule with migration strength ``alpha``:

    s_j(alpha) = max|X_j|^alpha / max|W_{:,j}|^(1 - alpha)

``max|X_j|`` is aggregated over the calibration set, every timestep and class (``aggregation: max``), or as
the mean over the calibration timesteps of each timestep's maximum (``aggregation: mean``, less driven by
one noisy step). ``alpha`` is fixed, or searched per site over ``grid`` values in [0, 1], coarse to fine:
``c = (grid + 1) // 2`` values evenly spaced (step ``h = 1 / (c - 1)``), then the remaining ``grid - c`` at
steps of ``h / (f + 1)`` on both sides of the best of those (``f = (grid - c) // 2`` a side), together with
``s = 1`` (no smoothing, so the search never does worse than leaving the site alone on its own data). With
the default 21: 0, 0.1, .., 1, then the best +-1/60 .. +-5/60.
A candidate is scored by the error it leaves in the consumers' outputs with their inputs and weights
quantized as the recipe quantizes them:

    E(s) = sum_k sum_rows  w * || X W_k^T - Q_a(X / s) Q_w(W_k diag(s))^T ||^2

with ``w = 1`` (``metric: mse``) or ``w = g_k^2``, the squared gradient of the diffusion loss at layer k's
output (TQ-DiT's Hessian weighting, Eq. 16; ``metric: hessian``, which needs calibration noise). ``Q_a`` is
per tensor with the recipe's activation observer (per token when the recipe's activations are), ``Q_w``
the recipe's weight quantizer. The error is evaluated on at most ``rows`` rows of each site, spread evenly
over the calibration set; ``max|X_j|`` uses all of them.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import torch
from torch import Tensor, fx
from tqdm.auto import tqdm

from ditq_compiler.calibration.batches import CalibrationError
from ditq_compiler.calibration.params import QuantParams
from ditq_compiler.calibration.scale_search import RECORD_BUDGET_BYTES, batch_rows, collect, pack_by_budget
from ditq_compiler.meta import LayerAnnotation
from ditq_compiler.passes.smooth_through_modulation import SmoothingSite
from ditq_compiler.pipeline import fetch_attr, layer_parameters
from ditq_compiler.quant import fake_quantize, fake_quantize_per_token, make_observer, weight_qparams

TINY = 1e-8


def smoothing_factor(x_max: Tensor, w_max: Tensor, alpha: float) -> Tensor:
    """SmoothQuant's ``s = max|X|^alpha / max|W|^(1 - alpha)``, floored so no channel divides by 0."""
    s = x_max.clamp_min(TINY).double().pow(alpha) / w_max.clamp_min(TINY).double().pow(1 - alpha)
    return s.clamp_min(TINY).float()


def _columns(gm: fx.GraphModule, layer: fx.Node) -> Tensor:
    """The layer's weight as (rows, input channels): a conv's kernel positions become rows."""
    weight = fetch_attr(gm, layer.args[1].target).detach()
    return weight.transpose(0, 1).reshape(weight.shape[1], -1).t() if weight.dim() > 2 else weight


def _as_rows(x: Tensor, conv: bool) -> Tensor:
    """Inputs as (rows, channels): a conv's (B, C, H, W) input has its channels at dim 1."""
    return (x.movedim(1, -1) if conv else x).reshape(-1, x.shape[1] if conv else x.shape[-1])


class _SiteData:
    """One site's recorded inputs, outputs and output gradients (all calibration rows)."""

    def __init__(self, site: SmoothingSite, inputs: dict, outputs: dict, grads: dict, timesteps: Tensor | None):
        first = site.consumers[0].name
        self.x = inputs[(first, 0)]
        self.outputs = [outputs[c.name] for c in site.consumers]
        self.grads = [grads.get(c.name) for c in site.consumers]
        self.timesteps = timesteps


def x_range(x: Tensor, conv: bool, timesteps: Tensor | None, aggregation: str) -> Tensor:
    """``max|X_j|`` per channel: over all rows, or the mean over timesteps of each timestep's maximum."""
    if aggregation == "max" or timesteps is None:
        return _as_rows(x.abs(), conv).amax(0)
    peaks = []
    for t in timesteps.unique():
        rows = x[timesteps == t]
        peaks.append(_as_rows(rows.abs(), conv).amax(0))
    return torch.stack(peaks).mean(0)


def coarse_alphas(grid: int) -> list[float]:
    """The evenly spaced first half of the ``grid`` alpha values (module docstring)."""
    count = (grid + 1) // 2
    return [i / (count - 1) for i in range(count)]


def fine_alphas(grid: int, best: float) -> list[float]:
    """The rest of the ``grid`` values, around the best coarse one, inside [0, 1]."""
    count = (grid + 1) // 2
    side = (grid - count) // 2
    step = 1 / (count - 1) / (side + 1)
    return [a for k in range(1, side + 1) for a in (best - k * step, best + k * step) if 0 <= a <= 1]


def _site_error(gm: fx.GraphModule, site: SmoothingSite, data: _SiteData, s: Tensor,
                annotations: Mapping[str, LayerAnnotation], rows: Tensor) -> float:
    """E(s) of the module docstring on the sampled rows."""
    x = data.x[rows]
    first = annotations[site.consumers[0].name]
    column = s.reshape(1, -1, *[1] * (x.dim() - 2)) if first.op == "conv2d" else s
    smoothed = x / column
    acts = first.activations
    if acts is None:
        x_hat = smoothed
    elif acts.granularity == "token":
        x_hat = fake_quantize_per_token(smoothed, acts)
    else:
        observer = make_observer(acts)
        observer.update(smoothed)
        scale, zero_point = observer.compute()
        x_hat = fake_quantize(smoothed, scale, zero_point, acts)
    total = 0.0
    for consumer, y, grad in zip(site.consumers, data.outputs, data.grads, strict=True):
        spec = annotations[consumer.name].weights
        weight = fetch_attr(gm, consumer.args[1].target).detach()
        scaled = weight * s.reshape(1, -1, *[1] * (weight.dim() - 2))
        w_scale, w_zero = weight_qparams(scaled, spec)
        w_hat = fake_quantize(scaled, w_scale, w_zero, spec)
        bias = fetch_attr(gm, consumer.args[2].target) if len(consumer.args) > 2 and consumer.args[2] is not None \
            else None
        if first.op == "conv2d":
            _, _, conv = layer_parameters(gm, consumer)
            y_hat = torch.nn.functional.conv2d(x_hat, w_hat, bias, *conv)
        else:
            y_hat = torch.nn.functional.linear(x_hat, w_hat, bias)
        error = (y[rows] - y_hat).double().square()
        if grad is not None:
            error = error * grad[rows].double().square()
        total += float(error.sum())
    return total


def choose_smoothing(gm: fx.GraphModule, sites: Sequence[SmoothingSite], annotations: Mapping[str, LayerAnnotation],
                     spec: Any, batches: list[list[Any]], noise: list[Tensor] | None, timestep_index: int | None,
                     hessian: bool, progress: bool = True) -> QuantParams:
    """``s`` per site (``QuantParams.smoothing``, keyed by the site's first consumer) and the chosen alpha and the
    error before / after in ``trace["smooth:<layer>"]``."""
    if not batches:
        raise CalibrationError("smoothing chooses s from the calibration data; the calibration set is empty")
    if hessian and noise is None:
        raise CalibrationError("smoothing.metric 'hessian' weights the error with gradients of the diffusion loss, "
                               "which needs the noise of each calibration input (from_sampler sets carry it); "
                               "use metric: mse")
    timesteps = None
    if timestep_index is not None:
        timesteps = torch.cat([torch.as_tensor(f[timestep_index]).reshape(-1).expand(batch_rows(f)) for f in batches])
    alphas = [None, *coarse_alphas(spec.grid)] if spec.alpha == "search" else [float(spec.alpha)]
    result = QuantParams()
    bar = tqdm(total=len(sites), desc="smoothing", unit="site", disable=not progress)
    with torch.no_grad():
        for group in _groups(sites, batches):
            _choose_group(gm, group, annotations, spec, batches, noise if hessian else None, timesteps, alphas, result)
            bar.update(len(group))
    bar.close()
    return result


def _choose_group(gm: fx.GraphModule, group: list[SmoothingSite], annotations: Mapping[str, LayerAnnotation],
                  spec: Any, batches: list[list[Any]], noise: list[Tensor] | None, timesteps: Tensor | None,
                  alphas: list[float | None], result: QuantParams) -> None:
    """One forward (and backward) pass over the calibration data for the sites of ``group``; their ``s``."""
    wanted = {c.name: [0] for site in group for c in site.consumers}
    inputs, outputs, grads = collect(gm, wanted, batches, noise)     # gradients only when noise is given
    for site in group:
        data = _SiteData(site, inputs, outputs, grads, timesteps)
        result.smoothing[site.consumers[0].name], result.trace[f"smooth:{site.name}"] = _choose_site(
            gm, site, data, annotations, spec, alphas)


def _choose_site(gm: fx.GraphModule, site: SmoothingSite, data: _SiteData,
                 annotations: Mapping[str, LayerAnnotation], spec: Any,
                 alphas: list[float | None]) -> tuple[Tensor, dict[str, float]]:
    """The best ``s`` of one site and its figures (alpha, -1 for no smoothing; the errors with and without)."""
    conv = annotations[site.consumers[0].name].op == "conv2d"
    x_max = x_range(data.x, conv, data.timesteps, spec.aggregation)
    w_max = torch.cat([_columns(gm, c) for c in site.consumers]).abs().amax(0)
    count = data.x.shape[0]
    rows = torch.linspace(0, count - 1, min(count, max(1, spec.rows // _tokens(data.x, conv)))).long()
    scored = []
    for alpha in alphas:
        s = torch.ones_like(x_max) if alpha is None else smoothing_factor(x_max, w_max, alpha)
        scored.append((_site_error(gm, site, data, s, annotations, rows), alpha, s))
    if spec.alpha == "search":
        coarse_best = min((t for t in scored if t[1] is not None), key=lambda t: t[0])[1]
        for alpha in fine_alphas(spec.grid, coarse_best):
            s = smoothing_factor(x_max, w_max, alpha)
            scored.append((_site_error(gm, site, data, s, annotations, rows), alpha, s))
    error, alpha, s = min(scored, key=lambda t: t[0])
    unsmoothed = next((e for e, a, _ in scored if a is None), math.nan)
    return s, {"alpha": -1.0 if alpha is None else alpha, "error_unsmoothed": unsmoothed, "error": error}


def _tokens(x: Tensor, conv: bool) -> int:
    """Rows of one sample: tokens of a linear's input, pixels of a conv's."""
    return math.prod(x.shape[2:]) if conv else math.prod(x.shape[1:-1])


def _groups(sites: Sequence[SmoothingSite], batches: list[list[Any]]) -> list[list[SmoothingSite]]:
    """Sites grouped into forward passes whose recorded tensors stay within ``RECORD_BUDGET_BYTES``."""
    rows = sum(batch_rows(f) for f in batches)

    def cost(site: SmoothingSite) -> int:
        per_row = sum(math.prod(int(d) for d in c.meta["val"].shape[1:]) * 2 for c in site.consumers)
        per_row += math.prod(int(d) for d in site.consumers[0].args[0].meta["val"].shape[1:])
        return 4 * rows * per_row
    return pack_by_budget(sites, cost, RECORD_BUDGET_BYTES)


__all__ = ["choose_smoothing", "coarse_alphas", "fine_alphas", "smoothing_factor", "x_range"]
