"""AMPN (RobuQ): ternary weights everywhere, each layer's activation bit width chosen under a budget.

Sensitivity. For layer ``l`` and candidate width ``b``, with every other layer at the recipe's
activation bits,

    S_l(b) = E[(out_q - out_fp)^2 | layer l at b bits] - E[(out_q - out_fp)^2]

on (up to) the first 256 calibration inputs: how much the model output moves away from FP when
this one layer's activation grid changes. Measured on the model we will deploy, i.e. AFTER a short
distillation at the recipe's bits (``sensitivity: distilled``, the default), or on the model
before any training (``sensitivity: ptq``). The RobuQ paper argues that the PTQ number misleads
at 2-4 bits: quantization-aware training adapts the weights and clipping ranges to a layer's
activation noise, so a layer that looks fragile before training may recover completely, while a
layer whose information is truly squeezed stays costly. ``bench/quality.py --robuq`` compares the
two allocations by the end quality they reach after the same distillation.

Why the output error: it is the quantity distillation minimises, it is measured end to end (so
a layer's effect on everything after it is included, unlike a local SQNR), and it needs only
forward passes (``layers x candidates`` of them).

Allocation. Treating the effects as additive (as HAWQ and MPQ-DM do), we choose one width per
layer to minimise ``sum_l S_l(b_l)`` subject to the average bits

    sum_l c_l b_l / sum_l c_l <= budget

where ``c_l`` is the layer's multiply-adds per token (its weight's size; ``weighting: macs``: a
2-bit fc1 saves four times what a 2-bit q projection does) or 1 (``weighting: layers``). This is
a multiple-choice knapsack, solved exactly by dynamic programming over the integer cost
``c_l b_l`` (costs divided by their gcd; if that leaves more than 20000 units they are rounded to
20000 units of the total, so the average may then miss the budget by <0.01 bit per layer).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

import torch
from torch import Tensor, fx
from tqdm.auto import tqdm

from ditq_compiler.annotate import LayerAnnotation
from ditq_compiler.distributed import SINGLE, Distributed
from ditq_compiler.pipeline import fetch_attr
from ditq_compiler.recipe import DistillationSpec, MixedPrecisionSpec, Recipe
from ditq_compiler.train.distill import Distiller
from ditq_compiler import meta
from ditq_compiler.records import Allocation

SENSITIVITY_ROWS = 256
MAX_UNITS = 20000
_OUTPUT_ONLY = DistillationSpec(output_weight=1.0, block_weight=0.0)


def _units(cost: Mapping[str, float]) -> dict[str, int]:
    values = list(cost.values())
    if all(float(v).is_integer() for v in values):
        divisor = math.gcd(*[int(v) for v in values])
        units = {n: int(v) // divisor for n, v in cost.items()}
        if sum(units.values()) <= MAX_UNITS:
            return units
    total = sum(values)
    return {n: max(1, round(v / total * MAX_UNITS)) for n, v in cost.items()}


def allocate(sensitivity: Mapping[str, Mapping[int, float]], cost: Mapping[str, float],
             budget: float) -> dict[str, int]:
    """Widths minimising the summed sensitivity under the weighted average ``budget`` (exact DP)."""
    names = list(sensitivity)
    units = _units({n: cost[n] for n in names})
    capacity = math.floor(budget * sum(units.values()) + 1e-9)
    best = torch.full((capacity + 1,), math.inf, dtype=torch.float64)
    best[0] = 0.0
    choices = []
    for name in names:
        new = torch.full_like(best, math.inf)
        pick = torch.full(best.shape, -1, dtype=torch.long)
        for bits, loss in sensitivity[name].items():
            step = units[name] * bits
            if step > capacity:
                continue
            candidate = best[: capacity + 1 - step] + loss
            better = candidate < new[step:]
            new[step:] = torch.where(better, candidate, new[step:])
            pick[step:] = torch.where(better, torch.tensor(bits), pick[step:])
        best = new
        choices.append(pick)
    if not torch.isfinite(best).any():
        raise ValueError(f"mixed_precision.budget {budget}: even the narrowest candidate on every layer exceeds it")
    state = int(torch.argmin(best))
    chosen = {}
    for name, pick in zip(reversed(names), reversed(choices), strict=True):
        bits = int(pick[state])
        chosen[name] = bits
        state -= units[name] * bits
    return {n: chosen[n] for n in names}


def layer_cost(gm: fx.GraphModule, node_name: str, weighting: str) -> float:
    """Multiply-adds per token of a linear (its weight's size), or 1."""
    if weighting == "layers":
        return 1.0
    node = next(n for n in gm.graph.nodes if n.name == node_name)
    return float(fetch_attr(gm, node.args[1].target).numel())


def measure_sensitivity(distiller: Distiller, names: list[str], candidates: tuple[int, ...],
                        progress: bool = True) -> tuple[float, dict[str, dict[int, float]]]:
    """(base loss, S_l(b) for every layer and candidate), one layer changed at a time."""
    base = distiller.evaluate(_OUTPUT_ONLY, SENSITIVITY_ROWS)
    sensitivity: dict[str, dict[int, float]] = {}
    bar = tqdm(names, desc="sensitivity", unit="layer", disable=not progress)
    for name in bar:
        layer = distiller.layers[name]
        original = layer.act_spec.bits
        sensitivity[name] = {}
        for bits in candidates:
            layer.set_activation_bits(bits)
            sensitivity[name][bits] = 0.0 if bits == original else \
                distiller.evaluate(_OUTPUT_ONLY, SENSITIVITY_ROWS) - base
        layer.set_activation_bits(original)
    return base, sensitivity


def choose_activation_bits(gm: fx.GraphModule, annotations: Mapping[str, LayerAnnotation],
                           act_qparams: Mapping[str, tuple[Tensor, Tensor]], inputs: list[dict[str, Any]],
                           recipe: Recipe, sample_dependent: set[str], progress: bool = True,
                           max_batch: int | None = None, dist: Distributed = SINGLE
                           ) -> tuple[dict[str, LayerAnnotation], Allocation]:
    """AMPN: measure sensitivities, allocate widths, return the re-annotated layers (``gm`` keeps the new
    annotations in the nodes' meta records). ``dist``: the ranks split the search's distillation steps and
    the sensitivity measurements (``distill.py``); rank 0's allocation is every rank's."""
    spec: MixedPrecisionSpec = recipe.mixed_precision
    names = [n for n, a in annotations.items() if a.activations is not None and a.activations.granularity == "token"]
    if not names:
        raise ValueError(f"recipe '{recipe.name}': mixed_precision found no layer with per-token activations")
    distillation = recipe.distillation or _OUTPUT_ONLY
    distiller = Distiller(gm, annotations, act_qparams, inputs, sample_dependent,
                          with_blocks=distillation.block_weight > 0 and spec.sensitivity == "distilled",
                          max_batch=max_batch, dist=dist)
    if spec.sensitivity == "distilled":
        distiller.train(distillation, spec.search_iterations, progress, desc="distill (AMPN search)")
    base, sensitivity = measure_sensitivity(distiller, names, spec.candidates, progress)
    cost = {n: layer_cost(gm, n, spec.weighting) for n in names}
    bits = dist.broadcast(allocate(sensitivity, cost, spec.budget))   # one allocation, whatever the float sums
    nodes = {n.name: n for n in gm.graph.nodes}
    updated = dict(annotations)
    for name, width in bits.items():
        annotation = annotations[name]
        updated[name] = dataclasses.replace(annotation, activations=dataclasses.replace(annotation.activations,
                                                                                       bits=width))
        meta.update(nodes[name], annotation=updated[name])
    return updated, Allocation(bits, sensitivity, cost, base, spec.sensitivity,
                               {n: annotations[n].name for n in names})
