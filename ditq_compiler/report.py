"""Per-layer report: what was done to every quantized layer, and what it cost in accuracy.

The SQNR of a layer is measured locally: the float graph runs on the calibration batches,
and at each quantized layer the quantized op is applied to the same float input, so

    SQNR = 10 log10( sum y_fp^2 / sum (y_fp - y_q)^2 )

attributes the error to that layer alone. The model's output SQNR is measured end to end.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, fx
from torch.utils._pytree import tree_leaves

from ditq_compiler.meta import LayerAnnotation
from ditq_compiler.records import LayerReport, SiteReport
from ditq_compiler.pipeline import fetch_attr
from ditq_compiler import meta


class _Energy:
    def __init__(self):
        self.signal = 0.0
        self.noise = 0.0

    def add(self, ref: Tensor, test: Tensor) -> None:
        self.signal += float(ref.double().pow(2).sum())
        self.noise += float((ref.double() - test.double()).pow(2).sum())

    @property
    def db(self) -> float:
        return math.inf if self.noise == 0 else 10 * math.log10(max(self.signal, 1e-300) / self.noise)


def quantized_nodes(gm: fx.GraphModule) -> dict[str, fx.Node]:
    """Source node name -> quantized node, for every node the quantize pass rewrote."""
    return {meta.get(n).source_node: n for n in gm.graph.nodes if meta.get(n).source_node is not None}


def _call_with_input(gm: fx.GraphModule, node: fx.Node, x: Tensor) -> Tensor:
    def value(a: Any) -> Any:
        if isinstance(a, fx.Node):
            return fetch_attr(gm, a.target) if a.op == "get_attr" else x
        return a
    args = [value(a) for a in node.args]
    if node.op == "call_module":
        return gm.get_submodule(node.target)(*args)
    return node.target(*args)


class _MeasuringInterpreter(fx.Interpreter):
    def __init__(self, fp_gm: fx.GraphModule, q_gm: fx.GraphModule, energies: dict[str, _Energy]):
        super().__init__(fp_gm)
        self.q_gm = q_gm
        self.q_nodes = quantized_nodes(q_gm)
        self.energies = energies

    def run_node(self, node: fx.Node) -> Any:
        out = super().run_node(node)
        if node.name in self.q_nodes:
            test = _call_with_input(self.q_gm, self.q_nodes[node.name], self.env[node.args[0]])
            self.energies.setdefault(node.name, _Energy()).add(out, test)
        return out


def measure(fp_gm: fx.GraphModule, q_gm: fx.GraphModule, flat_batches: list[list[Any]],
            reference: fx.GraphModule | None = None) -> tuple[dict[str, float], float]:
    """Per-layer local SQNR (dB) by source node name, and the model output's SQNR.

    The output is compared with ``reference`` when given (the captured FP graph, when exact
    rewrites such as rotations changed ``fp_gm``), else with ``fp_gm``.
    """
    layer_energy: dict[str, _Energy] = {}
    output_energy = _Energy()
    with torch.no_grad():
        for flat in flat_batches:
            fp_out = _MeasuringInterpreter(fp_gm, q_gm, layer_energy).run(*flat)
            if reference is not None:
                fp_out = fx.Interpreter(reference).run(*flat)
            q_out = fx.Interpreter(q_gm).run(*flat)
            for ref, test in zip(tree_leaves(fp_out), tree_leaves(q_out), strict=True):
                if isinstance(ref, Tensor) and ref.is_floating_point():
                    output_energy.add(ref, test)
    return {name: e.db for name, e in layer_energy.items()}, output_energy.db


def layer_reports(q_gm: fx.GraphModule, annotations: dict[str, LayerAnnotation]) -> list[LayerReport]:
    nodes = quantized_nodes(q_gm)
    reports = []
    for source, annotation in annotations.items():
        node = nodes[source]
        w_scale = fetch_attr(q_gm, node.args[2].target)
        binary = annotation.weights.binary      # ditq::binary_*: the activation scale is computed per token
        a_scale, per_token = (None, False) if binary else (node.args[5], node.args[8])
        clip = float(fetch_attr(q_gm, a_scale.target)) if per_token and isinstance(a_scale, fx.Node) else None
        a_scale = None if per_token else a_scale
        reports.append(LayerReport(
            name=annotation.name, role=annotation.role, op=annotation.op,
            weights=annotation.weights.describe(),
            activations=annotation.activations.describe() if annotation.activations else "fp32",
            weight_scale=(float(w_scale.min()), float(w_scale.max())),
            activation_scale=float(fetch_attr(q_gm, a_scale.target)) if isinstance(a_scale, fx.Node) else None,
            activation_clip=clip))
    return reports


def format_table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        return "  ".join(str(c).ljust(w) for c, w in zip(cells, widths, strict=True)).rstrip()

    return "\n".join([line(header), line(["-" * w for w in widths]), *map(line, rows)])


def summary_rows(reports: list[LayerReport]) -> tuple[list[str], list[list[str]]]:
    """(header, rows) of the per-layer table, as ``summary_table`` and the rich view show it."""
    rows = [[r.name, r.role, r.weights, r.input_site or r.activations,
             f"{r.weight_scale[0]:.2e}..{r.weight_scale[1]:.2e}",
             "(sites)" if r.input_site else
             (f"dynamic x{r.activation_clip:.2f}" if r.activation_clip is not None else "dynamic")
             if r.activation_scale is None and r.activations != "fp32" else
             ("-" if r.activation_scale is None else f"{r.activation_scale:.2e}"),
             "-" if r.sqnr_db is None else f"{r.sqnr_db:.1f}", r.kernel] for r in reports]
    header = ["layer", "role", "weights", "activations", "w scale", "a scale", "SQNR dB", "kernel"]
    if any(r.transforms for r in reports):
        rows = [row + [r.transforms or "-"] for row, r in zip(rows, reports, strict=True)]
        header.append("transforms")
    return header, rows


def summary_table(reports: list[LayerReport]) -> str:
    header, rows = summary_rows(reports)
    return format_table(rows, header)


def _span(values: Tensor) -> str:
    lo, hi = float(values.min()), float(values.max())
    return f"{lo:.2e}" if lo == hi else f"{lo:.2e}..{hi:.2e}"


def site_reports(sites: list, tables: dict[str, dict[str, Tensor]], layer_sqnr: dict[str, float]) -> list[SiteReport]:
    """Reports for ``ActivationSite`` s with their searched ``tables`` (``SearchResult``)."""
    reports = []
    for site in sites:
        table, bits = tables[site.key], site.spec.bits
        n = 2 ** (bits - 1)
        if site.quantizer == "softmax_mrq":
            quantizer, regions = f"int{bits} 2-region", f"[0, {n} s1) step s1 | [{n} s1, 1] step 1/{n}"
            parameters = f"s1 {_span(table['s1'])}"
        elif site.quantizer == "gelu_mrq":
            quantizer, regions = f"int{bits} 2-region", f"[-{n} s-, 0] step s- | [0, {n - 1} s+] step s+"
            parameters = f"s- {_span(table['s_neg'])}, s+ {_span(table['s_pos'])}"
        else:
            quantizer = f"int{bits} {'sym' if site.spec.symmetric else 'asym'}"
            regions, parameters = "1", f"s {_span(table['scale'])}"
        groups = len(next(iter(table.values())))
        reports.append(SiteReport(site.layer, site.operand, site.kind, quantizer, regions, groups, parameters,
                                  layer_sqnr.get(site.consumer)))
    return reports


def sites_table(reports: list[SiteReport], group_labels: list[str] | None = None) -> str:
    rows = [[r.layer, r.operand, r.kind, r.quantizer, r.regions, str(r.groups), r.parameters,
             "-" if r.sqnr_db is None else f"{r.sqnr_db:.1f}"] for r in reports]
    header = ["layer", "input", "site", "quantizer", "regions", "time groups", "parameters", "layer SQNR dB"]
    text = format_table(rows, header)
    if group_labels and len(group_labels) > 1:
        text += "\ntime groups (by timestep): " + " | ".join(f"{i}: {g}" for i, g in enumerate(group_labels))
    return text


def rotation_table(rotations: list) -> str:
    """One row per rotated linear (``passes.insert_hadamard.Rotation``): where its rotation runs."""
    rows = [[r.layer, r.role, str(r.width), r.construction, r.placement] for r in rotations]
    return format_table(rows, ["layer", "role", "width", "Hadamard", "rotation"])
