"""Subtract a per-channel shift from a linear's input and fold it into the bias (TaQ-DiT Eqs. 5-8).

For ``y = x W^T + b`` and a shift ``d`` over the input channels,

    y = (x - d) W^T + (b + W d)

so the graph computes ``x - d`` in front of the layer (the activation quantizer then sees the
shifted, more symmetric values) and the layer's bias becomes ``b + W d``. Exact in real
arithmetic; the float rewrite matches the original to rounding. ``d`` is TaQ-DiT's momentum
shift (``ditq_compiler.calibration.channel_stats.momentum_shift``). The inserted ``aten.sub``
node is marked ``shift`` in its meta record so outlier migration can find it.
"""

from __future__ import annotations

from typing import Mapping

import torch
from torch import Tensor, fx
from torch.fx.passes.infra.pass_base import PassBase, PassResult

from ditq_compiler.pipeline import PreconditionError, fetch_attr, linear_node, register_constant
from ditq_compiler import meta


class FoldShiftIntoBias(PassBase):
    """The pass; ``shifts`` maps linear node name -> shift ``d`` (one value per input channel)."""

    name = "fold_shift_into_bias"

    def __init__(self, shifts: Mapping[str, Tensor]):
        self.shifts = shifts

    def requires(self, gm: fx.GraphModule) -> None:
        """Each named node is a linear with as many input channels as its shift has values."""
        for name, shift in self.shifts.items():
            node = linear_node(gm, name, f"{self.name}: a shift")
            channels = fetch_attr(gm, node.args[1].target).shape[1]
            if tuple(shift.shape) != (channels,):
                raise PreconditionError(f"{self.name}: shift for '{name}' has shape {tuple(shift.shape)}, the layer "
                                        f"has {channels} input channels")

    def call(self, gm: fx.GraphModule) -> PassResult:
        for name, shift in self.shifts.items():
            self._rewrite(gm, linear_node(gm, name, "shift"), shift)
        if self.shifts:
            gm.graph.lint()
            gm.recompile()
        return PassResult(gm, bool(self.shifts))

    @staticmethod
    def _rewrite(gm: fx.GraphModule, node: fx.Node, shift: Tensor) -> None:
        x, weight_node = node.args[0], node.args[1]
        bias_node = node.args[2] if len(node.args) > 2 else None
        weight = fetch_attr(gm, weight_node.target).detach()
        shift = shift.to(weight.dtype)
        bias = fetch_attr(gm, bias_node.target).detach() if bias_node is not None else torch.zeros(weight.shape[0])
        shift_node = register_constant(gm, f"ditq_{node.name}_shift", shift, node)
        new_bias = register_constant(gm, f"ditq_{node.name}_shifted_bias",
                                     (bias.double() + weight.double() @ shift.double()).to(bias.dtype), node)
        with gm.graph.inserting_before(node):
            shifted = gm.graph.call_function(torch.ops.aten.sub.Tensor, (x, shift_node))
        shifted.meta["val"] = x.meta.get("val")
        meta.update(shifted, shift=True)
        meta.copy_location(shifted, node)
        node.args = (shifted, weight_node, new_bias, *node.args[3:])
        meta.record_applied(node, "fold_shift_into_bias", channels=int(shift.numel()),
                       shift_min=float(shift.min()), shift_max=float(shift.max()))
        if bias_node is not None and not bias_node.users:
            gm.graph.erase_node(bias_node)
