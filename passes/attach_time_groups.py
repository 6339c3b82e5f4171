"""Select each time-grouped quantizer's parameter row from the graph's timestep input (TQ-DiT TGQ).

The G time groups are contiguous timestep ranges with ascending boundaries ``b`` (G - 1 values,
``ditq_compiler.calibration.time_groups``). Once per graph, right after the inputs, the pass adds

    group = sum(unsqueeze(timestep, -1) > b, -1)          int64, one group per sample (shape of timestep)

from a constant ``ditq_time_group_boundaries`` (aten unsqueeze, gt, sum: in ONNX Unsqueeze, Greater,
Cast, ReduceSum), and passes ``group`` to every quantizer marked ``time_grouped``, whose
tables then answer ``table[group]`` per sample (``ditq_compiler.activation_ops``). Nothing else
changes; a graph with no time-grouped quantizer is left as it is.
"""

from __future__ import annotations

import torch
from torch import Tensor, fx
from torch._guards import detect_fake_mode
from torch.fx.passes.infra.pass_base import PassBase, PassResult

from ditq_compiler.pipeline import PreconditionError, fetch_attr
from ditq_compiler import meta

aten = torch.ops.aten
BOUNDARIES = "ditq_time_group_boundaries"


class AttachTimeGroups(PassBase):
    """The pass; ``boundaries`` (G - 1 ascending values) and the name of the timestep placeholder."""

    name = "attach_time_groups"

    def __init__(self, boundaries: Tensor | None, timestep_input: str | None):
        self.boundaries = boundaries
        self.timestep_input = timestep_input

    def requires(self, gm: fx.GraphModule) -> None:
        """Time-grouped quantizers (``quantize_activations`` ran) have tables of G rows and the graph has the
        timestep input."""
        grouped = [n for n in gm.graph.nodes if meta.get(n).time_grouped]
        if not grouped:
            return
        if self.boundaries is None or self.boundaries.dim() != 1:
            raise PreconditionError(f"{self.name}: {len(grouped)} time-grouped quantizers (e.g. "
                                    f"'{grouped[0].name}') but no 1-D group boundaries")
        if not any(n.op == "placeholder" and n.name == self.timestep_input for n in gm.graph.nodes):
            raise PreconditionError(f"{self.name}: time-grouped quantizers (e.g. '{grouped[0].name}') need the "
                                    f"timestep input, and the graph has no placeholder '{self.timestep_input}'")
        groups = len(self.boundaries) + 1
        for node in grouped:
            rows = {len(fetch_attr(gm, a.target)) for a in node.args[2:] if isinstance(a, fx.Node)}
            if rows != {groups}:
                raise PreconditionError(f"{self.name}: quantizer '{node.name}' has tables of {sorted(rows)} rows "
                                        f"for {groups} time groups")

    def call(self, gm: fx.GraphModule) -> PassResult:
        grouped = [n for n in gm.graph.nodes if meta.get(n).time_grouped]
        if not grouped:
            return PassResult(gm, False)
        placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
        timestep = next(n for n in placeholders if n.name == self.timestep_input)
        group = self._group_index(gm, timestep, placeholders[-1])
        for node in grouped:
            node.args = (node.args[0], group, *node.args[2:])
        gm.graph.lint()
        gm.recompile()
        return PassResult(gm, True)

    def _group_index(self, gm: fx.GraphModule, timestep: fx.Node, after: fx.Node) -> fx.Node:
        graph = gm.graph
        gm.register_buffer(BOUNDARIES, self.boundaries.to(torch.float32))
        fake_mode = detect_fake_mode([timestep.meta["val"]])
        with graph.inserting_after(after):
            boundaries = graph.get_attr(BOUNDARIES)
        boundaries.meta["val"] = fake_mode.from_tensor(self.boundaries.to(torch.float32))
        previous = boundaries
        for target, args in ((aten.unsqueeze.default, (timestep, -1)), (aten.gt.Tensor, (None, boundaries)),
                             (aten.sum.dim_IntList, (None, [-1]))):
            args = tuple(previous if a is None else a for a in args)
            with graph.inserting_after(previous):
                node = graph.call_function(target, args)
            with fake_mode:
                node.meta["val"] = target(*[a.meta["val"] if isinstance(a, fx.Node) else a for a in args])
            previous = node
        meta.update(previous, time_group_index=True)
        return previous
