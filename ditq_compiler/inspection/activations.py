"""Activation statistics of every quantized layer's input, recorded at compile time for inspection.

For each quantized layer two tensors are watched on the calibration data, running the float graph
after the transformation passes and before quantization:

* ``before``: the layer's input as the original model computes it, found by walking back from the
  layer over the nodes that transformation passes inserted in front of it (marked with a
  ``transform`` label in their ``ditq_compiler.meta`` record, or ``shift`` for TaQ-DiT's shift / affine), taking each
  one's first non-constant input;
* ``after``: the layer's input as its activation quantizer sees it.

Without transformations the two are the same tensor. Recorded per layer: min / max / mean per
timestep (sampling order, noisiest first: the TaQ-DiT paper's Fig. 2(d) view), min / max per input
channel over all timesteps (Fig. 3(c)/(f)), and exact 64-bin histograms of all values on one
shared range (Fig. 3(a)/(b)). Two passes over the calibration batches: the first finds the
ranges, the second bins. A new pass that inserts activation transforms only has to mark its
nodes ``meta.update(node, transform="<pass name>")`` to be seen here.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Mapping

import torch
from torch import Tensor, fx

from ditq_compiler import meta

BINS = 64
UNKNOWN_TIMESTEP = -1.0     # rows of a tensor whose first dim is not the batch


def is_transform(node: Any) -> bool:
    return isinstance(node, fx.Node) and (meta.get(node).transform is not None or meta.get(node).shift)


def raw_input(node: fx.Node) -> fx.Node:
    """The input of layer ``node`` before the transformation nodes in front of it."""
    current = node.args[0]
    while is_transform(current):
        current = next(a for a in current.all_input_nodes if a.op != "get_attr")
    return current


@dataclass
class LayerActivations:
    """Statistics of one layer's input before and after its transformations (tensors, for safetensors)."""

    timesteps: Tensor                 # (T,) float64, noisiest first
    before_min: Tensor                # (T,) per timestep
    before_max: Tensor
    before_mean: Tensor
    after_min: Tensor
    after_max: Tensor
    after_mean: Tensor
    channel_before_min: Tensor        # (C,) over all timesteps
    channel_before_max: Tensor
    channel_after_min: Tensor
    channel_after_max: Tensor
    hist_edges: Tensor                # (BINS + 1,) shared by both histograms
    hist_before: Tensor               # (BINS,) int64 counts
    hist_after: Tensor
    transformed: Tensor               # () bool: before and after differ

    def tensors(self, prefix: str) -> dict[str, Tensor]:
        return {f"{prefix}{f.name}": getattr(self, f.name).contiguous() for f in fields(self)}

    @classmethod
    def from_tensors(cls, tensors: Mapping[str, Tensor], prefix: str) -> LayerActivations:
        return cls(**{f.name: tensors[f"{prefix}{f.name}"] for f in fields(cls)})

    def summary(self) -> dict[str, Any]:
        """Plain numbers and lists for the HTML view."""
        out = {f.name: getattr(self, f.name).tolist() for f in fields(self)}
        out["transformed"] = bool(self.transformed)
        return out


class _Running:
    """Per-timestep range and mean, per-channel range, of one watched tensor."""

    def __init__(self, channel_dim: int):
        self.channel_dim = channel_dim
        self.t_min: dict[float, float] = {}
        self.t_max: dict[float, float] = {}
        self.t_sum: dict[float, float] = {}
        self.t_count: dict[float, int] = {}
        self.c_min: Tensor | None = None
        self.c_max: Tensor | None = None

    def update_ranges(self, x: Tensor, keys: Tensor) -> None:
        x = x.detach().double()
        rows = x.reshape(x.shape[0], -1)
        for key in keys.unique().tolist():
            values = rows[keys == key]
            self.t_min[key] = min(self.t_min.get(key, float("inf")), float(values.min()))
            self.t_max[key] = max(self.t_max.get(key, float("-inf")), float(values.max()))
            self.t_sum[key] = self.t_sum.get(key, 0.0) + float(values.sum())
            self.t_count[key] = self.t_count.get(key, 0) + values.numel()
        per_channel = x.movedim(self.channel_dim, -1).reshape(-1, x.shape[self.channel_dim])
        lo, hi = per_channel.amin(0), per_channel.amax(0)
        self.c_min = lo if self.c_min is None else torch.minimum(self.c_min, lo)
        self.c_max = hi if self.c_max is None else torch.maximum(self.c_max, hi)


class _Watcher(fx.Interpreter):
    def __init__(self, gm: fx.GraphModule, watched: dict[str, _Running], on_value):
        super().__init__(gm)
        self.watched = watched
        self.on_value = on_value

    def run_node(self, node: fx.Node) -> Any:
        out = super().run_node(node)
        if node.name in self.watched:
            self.on_value(node.name, out)
        return out


def _row_keys(timestep: Any, rows: int) -> Tensor:
    if timestep is None:
        return torch.zeros(rows, dtype=torch.float64)
    t = torch.as_tensor(timestep).detach().reshape(-1).double()
    if t.numel() == 1:
        return t.expand(rows)
    return t if t.numel() == rows else torch.full((rows,), UNKNOWN_TIMESTEP, dtype=torch.float64)


def record_activation_stats(gm: fx.GraphModule, layer_nodes: list[str], batches: list[list[Any]],
                            timestep_index: int | None, conv_layers: set[str] = frozenset()
                            ) -> dict[str, LayerActivations]:
    """Statistics for each layer node named in ``layer_nodes`` (float graph ``gm``), by node name."""
    nodes = {n.name: n for n in gm.graph.nodes}
    pairs = {name: (raw_input(nodes[name]).name, nodes[name].args[0].name) for name in layer_nodes}
    watched = {node_name: _Running(1 if name in conv_layers else -1)
               for name, pair in pairs.items() for node_name in pair}
    if not batches or not watched:
        return {}

    def run(on_value) -> None:
        with torch.no_grad():
            for flat in batches:
                timestep = flat[timestep_index] if timestep_index is not None else None
                _Watcher(gm, watched, lambda name, x, t=timestep: on_value(name, x, t)).run(*flat)

    run(lambda name, x, t: watched[name].update_ranges(x, _row_keys(t, x.shape[0])))
    edges, hists = {}, {}
    for name, (before, after) in pairs.items():
        lo = min(min(watched[before].t_min.values()), min(watched[after].t_min.values()))
        hi = max(max(watched[before].t_max.values()), max(watched[after].t_max.values()))
        edges[name] = torch.linspace(lo, hi if hi > lo else lo + 1.0, BINS + 1, dtype=torch.float64)
        hists[name] = [torch.zeros(BINS, dtype=torch.long), torch.zeros(BINS, dtype=torch.long)]
    users = {}
    for name, pair in pairs.items():
        for side, node_name in enumerate(pair):
            users.setdefault(node_name, []).append((name, side))

    def bin_values(node_name: str, x: Tensor, t: Any) -> None:
        values = x.detach().double().reshape(-1)
        for layer, side in users[node_name]:
            hists[layer][side] += torch.histogram(values, bins=edges[layer]).hist.long()

    run(bin_values)
    return {name: _layer_stats(watched[before], watched[after], edges[name], *hists[name], before != after)
            for name, (before, after) in pairs.items()}


def _layer_stats(before: _Running, after: _Running, edges: Tensor, hist_before: Tensor, hist_after: Tensor,
                 transformed: bool) -> LayerActivations:
    keys = sorted(after.t_min, reverse=True)

    def series(r: _Running, table: str) -> Tensor:
        if table == "mean":
            return torch.tensor([r.t_sum[k] / r.t_count[k] for k in keys], dtype=torch.float64)
        return torch.tensor([getattr(r, f"t_{table}")[k] for k in keys], dtype=torch.float64)

    return LayerActivations(
        timesteps=torch.tensor(keys, dtype=torch.float64),
        before_min=series(before, "min"), before_max=series(before, "max"), before_mean=series(before, "mean"),
        after_min=series(after, "min"), after_max=series(after, "max"), after_mean=series(after, "mean"),
        channel_before_min=before.c_min.float(), channel_before_max=before.c_max.float(),
        channel_after_min=after.c_min.float(), channel_after_max=after.c_max.float(),
        hist_edges=edges, hist_before=hist_before, hist_after=hist_after,
        transformed=torch.tensor(transformed))


__all__ = ["BINS", "LayerActivations", "is_transform", "raw_input", "record_activation_stats"]
