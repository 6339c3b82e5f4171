"""Migrate outlier input channels of a linear into its weight (TaQ-DiT Eqs. 9-10).

After the shift, the layer computes ``(x - d) W^T + b'``. With per-channel factors ``a``
(``a_j > 1`` on the outlier channels, 1 elsewhere),

    (x - d) W^T = ((x - d) / a) (W diag(a))^T

so the activation quantizer sees outlier channels shrunk by ``a_j`` and column ``j`` of ``W``
(row ``j`` in the paper's ``x W`` notation) grows by ``a_j``. The shift and the division are
fused into one per-channel affine, ``addcmul(-d / a, x, 1 / a) = (x - d) / a``, which replaces
the shift's ``sub`` node (so the shift pass must run first). Exact in real arithmetic.
Joint reconstruction later tunes ``a`` (``ditq_compiler.calibration.reconstruct``).
"""

from __future__ import annotations

from typing import Mapping

import torch
from torch import Tensor, fx
from torch.fx.passes.infra.pass_base import PassBase, PassResult

from ditq_compiler.pipeline import PreconditionError, fetch_attr, linear_node, register_constant
from ditq_compiler import meta


def channel_affine(gm: fx.GraphModule, node: fx.Node) -> tuple[fx.Node, Tensor | None, Tensor | None, fx.Node | None]:
    """(raw input, shift d, factors a, affine node) in front of layer ``node``; (input, None, None, None)
    when there is none, factors None after a shift alone."""
    affine = node.args[0]
    if not (isinstance(affine, fx.Node) and meta.get(affine).shift):
        return affine, None, None, None
    if affine.target is torch.ops.aten.sub.Tensor:
        return affine.args[0], fetch_attr(gm, affine.args[1].target), None, affine
    offset, x, inv = affine.args
    inv_value = fetch_attr(gm, inv.target)
    return x, -fetch_attr(gm, offset.target) / inv_value, 1 / inv_value, affine


class MigrateOutliers(PassBase):
    """The pass; ``factors`` maps linear node name -> per-input-channel factors ``a`` (>= 1)."""

    name = "migrate_outliers"

    def __init__(self, factors: Mapping[str, Tensor]):
        self.factors = factors

    def requires(self, gm: fx.GraphModule) -> None:
        """``fold_shift_into_bias`` ran on each named linear (migration works on shifted activations)."""
        for name, factors in self.factors.items():
            shifted = linear_node(gm, name, f"{self.name}: migration factors").args[0]
            if not (isinstance(shifted, fx.Node) and shifted.target is torch.ops.aten.sub.Tensor
                    and meta.get(shifted).shift):
                raise PreconditionError(f"layer node '{name}' has no shift in front of it: run fold_shift_into_bias "
                                        "first (migration works on shifted activations)")
            shift = fetch_attr(gm, shifted.args[1].target)
            if factors.shape != shift.shape or not bool((factors > 0).all()):
                raise PreconditionError(f"{self.name}: factors for '{name}' must be positive with shape "
                                        f"{tuple(shift.shape)}, got shape {tuple(factors.shape)}")

    def call(self, gm: fx.GraphModule) -> PassResult:
        for name, factors in self.factors.items():
            node = linear_node(gm, name, "migration factors")
            self._rewrite(gm, node, node.args[0], factors)
        if self.factors:
            gm.graph.lint()
            gm.recompile()
        return PassResult(gm, bool(self.factors))

    @staticmethod
    def _rewrite(gm: fx.GraphModule, node: fx.Node, shifted: fx.Node, factors: Tensor) -> None:
        x, shift_node = shifted.args
        shift = fetch_attr(gm, shift_node.target)
        weight_node = node.args[1]
        weight = fetch_attr(gm, weight_node.target).detach()
        factors = factors.to(weight.dtype)
        offset = register_constant(gm, f"ditq_{node.name}_affine_offset", -shift / factors, shifted)
        inv = register_constant(gm, f"ditq_{node.name}_affine_scale", 1 / factors, shifted)
        migrated = register_constant(gm, f"ditq_{node.name}_migrated_weight", weight * factors, node)
        with gm.graph.inserting_before(shifted):
            affine = gm.graph.call_function(torch.ops.aten.addcmul.default, (offset, x, inv))
        affine.meta["val"] = shifted.meta.get("val")
        meta.update(affine, shift=True)
        meta.copy_location(affine, node)
        shifted.replace_all_uses_with(affine)
        gm.graph.erase_node(shifted)
        if not shift_node.users:
            gm.graph.erase_node(shift_node)
        node.args = (node.args[0], migrated, *node.args[2:])
        meta.record_applied(node, "migrate_outliers", migrated_channels=int((factors > 1).sum()),
                       max_factor=float(factors.max()))
        if not weight_node.users:
            gm.graph.erase_node(weight_node)
