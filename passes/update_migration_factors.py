"""Put learned migration factors in place of the calibrated ones (TaQ-DiT joint reconstruction, Eq. 10).

After ``migrate_outliers`` a layer computes ``((x - d) / a) (W diag(a))^T``: the affine
``addcmul(-d / a, x, 1 / a)`` in front of it and the migrated weight ``W diag(a)``. Reconstruction
learns new factors ``a'``; this pass rewrites both places,

    offset <- -d / a',    scale <- 1 / a',    weight <- (W diag(a)) diag(1 / a) diag(a') = W diag(a')

which is the same function for any ``a' > 0`` (exact in real arithmetic), with the activation
quantizer now seeing the channels divided by ``a'``.
"""

from __future__ import annotations

from typing import Mapping

from torch import Tensor, fx
from torch.fx.passes.infra.pass_base import PassBase, PassResult

from ditq_compiler import meta
from ditq_compiler.passes.migrate_outliers import channel_affine
from ditq_compiler.pipeline import PreconditionError, fetch_attr, register_constant


class UpdateMigrationFactors(PassBase):
    """The pass; ``factors`` maps linear node name -> learned factors ``a'`` (positive, one per input channel)."""

    name = "update_migration_factors"

    def __init__(self, factors: Mapping[str, Tensor]):
        self.factors = factors

    def requires(self, gm: fx.GraphModule) -> None:
        nodes = {n.name: n for n in gm.graph.nodes}
        for name, new in self.factors.items():
            node = nodes.get(name)
            old = None if node is None else channel_affine(gm, node)[2]
            if old is None:
                raise PreconditionError(f"{self.name}: layer node '{name}' has no migration affine in front of it "
                                        "(run migrate_outliers first)")
            if new.shape != old.shape or not bool((new > 0).all()):
                raise PreconditionError(f"{self.name}: learned factors for '{name}' must be positive with shape "
                                        f"{tuple(old.shape)}, got shape {tuple(new.shape)}")

    def call(self, gm: fx.GraphModule) -> PassResult:
        nodes = {n.name: n for n in gm.graph.nodes}
        for name, new in self.factors.items():
            node = nodes[name]
            _, shift, old, affine = channel_affine(gm, node)
            base = fetch_attr(gm, node.args[1].target) / old.reshape(1, -1)
            offset, _, inv = affine.args
            for target, value in ((offset.target, -shift / new), (inv.target, 1 / new)):
                owner, _, attr = target.rpartition(".")
                setattr(gm.get_submodule(owner) if owner else gm, attr, value)
            weight = register_constant(gm, f"ditq_{name}_reconstructed_weight", base * new.reshape(1, -1), node)
            node.args = (node.args[0], weight, *node.args[2:])
            meta.record_applied(node, "reconstruct (migration factors)", max_factor=float(new.max()))
        gm.graph.eliminate_dead_code()
        gm.recompile()
        return PassResult(gm, bool(self.factors))


__all__ = ["UpdateMigrationFactors"]
