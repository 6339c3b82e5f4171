"""``ditq inspect DIR --html FILE``: one self-contained HTML page (inline CSS, JS and SVG; no network).

The rewritten graph is laid out as blocks: every node belongs to the block of its module path
(the path up to its first numeric component, ``transformer_blocks.3``; otherwise its first
component, ``pos_embed``). The linears, convs and inserted activation transforms are shown in
graph order, one card per run of consecutive nodes of one block (a block whose modules the graph
calls again later, like DiT's ``transformer_blocks.0.norm1.emb`` for the final layer, gets a
second card); the card counts the block's other ops. A quantized
layer is coloured by its local SQNR (red at or below ``SQNR_BAD_DB``, green at or above
``SQNR_GOOD_DB``, the hue linear in dB between), a full-precision one is grey. Clicking a layer
opens its panel: formats, kernel, SQNR, the passes applied to it (``meta.NodeMeta.applied``, written
by each pass through ``ditq_compiler.meta.record_applied``), statistics of every constant the
quantized op reads (named by the op schema, so new ops show up without changes here), and, from
the statistics recorded at compile time on the calibration data
(``ditq_compiler.inspection.activations``), the histogram of its input activations and their range
per timestep and per channel, before and after the transformations.
"""

from __future__ import annotations

import html
import json
import math
import re
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from torch import fx

from ditq_compiler.artifact.bitpack import bits_needed
from ditq_compiler.atomic import write_text
from ditq_compiler.graph import is_weighted, module_path
from ditq_compiler.inspection.activations import is_transform
from ditq_compiler.inspection.summary import SQNR_BAD_DB, SQNR_GOOD_DB
from ditq_compiler.pipeline import fetch_attr
from ditq_compiler import meta

MAX_CHANNELS = 512        # per-channel ranges wider than this are shown as the min / max of 512 bins
_BLOCK = re.compile(r"^(.*?\.\d+)(?:\.|$)")


def block_of(name: str) -> str:
    match = _BLOCK.match(name)
    return match.group(1) if match else name.split(".")[0]


def _finite(value: Any) -> Any:
    """JSON.parse rejects NaN / Infinity: spell them as strings ``Number()`` reads back."""
    if isinstance(value, float) and not math.isfinite(value):
        return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def _tensor_stats(name: str, tensor: torch.Tensor) -> dict[str, Any]:
    t = tensor.detach()
    stats: dict[str, Any] = {"arg": name, "shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch.")}
    if t.numel():
        as_float = t.double()
        stats.update(min=float(as_float.min()), max=float(as_float.max()), mean=float(as_float.mean()))
        if not t.is_floating_point():
            stats["stored_bits"] = bits_needed(t)
    return stats


def op_parameters(gm: fx.GraphModule, node: fx.Node) -> list[dict[str, Any]]:
    """Each argument of a quantized op except its input: constants with statistics, numbers as they are."""
    schema = getattr(node.target, "_schema", None)
    names = [a.name for a in schema.arguments] if schema is not None else [f"arg{i}" for i in range(len(node.args))]
    out = []
    for name, value in [*zip(names, node.args, strict=False), *node.kwargs.items()]:   # trailing defaults omitted
        if isinstance(value, fx.Node):
            if value.op == "get_attr":
                out.append(_tensor_stats(name, fetch_attr(gm, value.target)))
        elif value is None or isinstance(value, (bool, int, float, list, tuple, str)):
            out.append({"arg": name, "value": value if not isinstance(value, tuple) else list(value)})
    return out


def _binned(values: list[float], reduce) -> list[float]:
    if len(values) <= MAX_CHANNELS:
        return values
    chunks = torch.tensor(values).tensor_split(MAX_CHANNELS)
    return [float(reduce(c)) for c in chunks]


def _activations(stats) -> dict[str, Any] | None:
    if stats is None:
        return None
    data = stats.summary()
    for side in ("before", "after"):
        data[f"channel_{side}_min"] = _binned(data[f"channel_{side}_min"], torch.min)
        data[f"channel_{side}_max"] = _binned(data[f"channel_{side}_max"], torch.max)
    data["channels"] = len(stats.channel_after_min)
    return data


def _transform_label(node: fx.Node) -> str:
    label = meta.get(node).transform
    if isinstance(label, str):
        return label
    return "shift + migrate" if node.target is torch.ops.aten.addcmul.default else "shift"


def view_data(compiled, manifest: dict[str, Any] | None = None) -> dict[str, Any]:
    """Everything the page shows, as JSON-able data."""
    gm = compiled.reference_graph_module
    reports = {r.name: r for r in compiled.layers}
    cards: list[dict[str, Any]] = []           # runs of consecutive items of one block, in graph order
    first_card: dict[str, dict[str, Any]] = {}
    other_ops: dict[str, int] = {}
    layers: dict[str, dict[str, Any]] = {}
    for node in gm.graph.nodes:
        if node.op != "call_function":
            continue
        annotation = meta.get(node).annotation
        if meta.get(node).source_node is not None and annotation is not None:
            name, kind = annotation.name, "layer"
        elif is_weighted(node):
            name, kind = module_path(node), "fp"
        elif is_transform(node):
            name, kind = module_path(node), "transform"
        else:
            block = block_of(module_path(node))
            other_ops[block] = other_ops.get(block, 0) + 1
            continue
        block = block_of(name)
        if not cards or cards[-1]["block"] != block:
            # a block the graph comes back to (a DiT's final layer reads block 0's timestep embedding)
            title = block if block not in first_card or not cards else f"{block} (again, after {cards[-1]['block']})"
            cards.append({"block": block, "name": title, "items": [], "other_ops": 0})
            first_card.setdefault(block, cards[-1])
        item = {"id": node.name, "kind": kind, "name": name, "label": name[len(block):].lstrip(".") or name}
        if kind == "transform":
            item["label"] = _transform_label(node)
        cards[-1]["items"].append(item)
        if kind != "layer":
            continue
        source = meta.get(node).source_node
        report = reports.get(name)
        item["id"] = source
        layers[source] = {
            "name": name, "node": node.name, "op": str(node.target), "role": report.role if report else "",
            "weights": report.weights if report else "", "activations": report.activations if report else "",
            "kernel": report.kernel if report else "", "sqnr_db": report.sqnr_db if report else None,
            "transforms": report.transforms if report else "",
            "passes": [dict(entry) for entry in meta.get(node).applied],
            "parameters": op_parameters(gm, node),
            "activation_stats": _activations(compiled.activation_stats.get(source)),
        }
    for block, count in other_ops.items():
        if block in first_card:
            first_card[block]["other_ops"] += count
    manifest = manifest or getattr(compiled, "manifest", None) or {}
    provenance = compiled.provenance
    data = {
        "model_class": compiled.captured.model_class, "recipe": compiled.recipe.name, "backend": compiled.backend,
        "output_sqnr_db": compiled.output_sqnr_db, "stage_seconds": compiled.stage_seconds,
        "sizes": manifest.get("sizes", {"fp_checkpoint_bytes": provenance.fp_checkpoint_bytes}),
        "calibration": provenance.calibration, "library_versions": manifest.get("library_versions", {}),
        "created": manifest.get("created"), "sqnr_bounds": [SQNR_BAD_DB, SQNR_GOOD_DB],
        "blocks": cards,
        "layers": layers,
    }
    return _finite(data)


def _asset(name: str) -> str:
    return resources.files("ditq_compiler.inspection").joinpath("assets").joinpath(name).read_text(encoding="utf-8")


def render_html(compiled, manifest: dict[str, Any] | None = None) -> str:
    data = json.dumps(view_data(compiled, manifest), allow_nan=False).replace("</", "<\\/")
    title = f"ditq: {compiled.captured.model_class} / {compiled.recipe.name}"
    return (_asset("view.html").replace("{{title}}", html.escape(title)).replace("{{css}}", _asset("view.css"))
            .replace("{{js}}", _asset("view.js")).replace("{{data}}", data))


def write_html(compiled, path: str | Path, manifest: dict[str, Any] | None = None) -> Path:
    """Write the page atomically (a temporary file next to ``path``, then a rename)."""
    return write_text(path, render_html(compiled, manifest))


__all__ = ["block_of", "op_parameters", "render_html", "view_data", "write_html"]
