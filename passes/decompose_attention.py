"""Decompose ``scaled_dot_product_attention`` into matmul, scale, softmax, matmul (TQ-DiT Sec. III-D).

Fused attention hides the values TQ-DiT quantizes: both operands of the two attention matmuls
and the post-softmax probabilities. Every ``aten.scaled_dot_product_attention`` node (the form
diffusers' attention processors export to, self- and cross-attention alike) becomes

    S = matmul(q, transpose(k, -2, -1))          the q.k^T matmul   (meta record: matmul = 'attn_scores')
    S = S * scale                                scale = 1 / sqrt(q.shape[-1]) unless given
    S = S + attn_mask          (float mask)      or  masked_fill(S, ~attn_mask, -inf)   (boolean mask)
    S = masked_fill(S, ~tril(ones(L, S)), -inf)  (is_causal)
    P = softmax(S, -1)                           the post-softmax site
    O = matmul(P, v)                             the P.v matmul     (meta record: matmul = 'attn_value')

which is the definition of SDPA, so the rewrite is exact up to float rounding (the fused CPU
kernel accumulates in another order; tested to 1e-5 on diffusers DiT, PixArt and UNet2DCondition
attention). ``dropout_p`` must be 0 (inference graphs) and grouped-query attention
(``enable_gqa``) is refused with the node's name; both would change what is computed.
The new nodes keep the attention module's location (``nn_module_stack``), so layer names and
block grouping still work.
"""

from __future__ import annotations

import math

import torch
from torch import fx
from torch._guards import detect_fake_mode
from torch.fx.passes.infra.pass_base import PassBase, PassResult


from ditq_compiler import meta
from ditq_compiler.pipeline import PreconditionError

aten = torch.ops.aten
SDPA = aten.scaled_dot_product_attention.default


def _query(node: fx.Node) -> fx.Node:
    return node.args[0] if node.args else node.kwargs["query"]


class DecomposeAttention(PassBase):
    """The pass: every SDPA node of the graph becomes the explicit attention above."""

    name = "decompose_attention"

    def requires(self, gm: fx.GraphModule) -> None:
        for node in gm.graph.nodes:
            if node.op == "call_function" and node.target is SDPA and "val" not in _query(node).meta:
                raise PreconditionError(f"{self.name}: attention node '{node.name}' has inputs without shapes "
                                        "(meta['val']); decompose graphs captured by torch.export")

    def call(self, gm: fx.GraphModule) -> PassResult:
        nodes = [n for n in gm.graph.nodes if n.op == "call_function" and n.target is SDPA]
        for node in nodes:
            self._rewrite(gm, node)
        if nodes:
            gm.graph.lint()
            gm.recompile()
        return PassResult(gm, bool(nodes))

    @staticmethod
    def _rewrite(gm: fx.GraphModule, node: fx.Node) -> None:
        names = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal")
        bound = {**dict(zip(names, node.args, strict=False)), **node.kwargs}
        q, k, v = bound["query"], bound["key"], bound["value"]
        mask, dropout, causal = bound.get("attn_mask"), bound.get("dropout_p", 0.0), bound.get("is_causal", False)
        if dropout:
            raise ValueError(f"attention node '{node.name}' has dropout_p={dropout}; decompose inference graphs "
                             "(model.eval()) only")
        if bound.get("enable_gqa", False):
            raise ValueError(f"attention node '{node.name}' uses grouped-query attention (enable_gqa), which "
                             "decompose_attention does not rewrite")
        head_dim = q.meta["val"].shape[-1]
        scale = bound.get("scale")
        scale = 1.0 / math.sqrt(head_dim) if scale is None else scale
        graph = gm.graph
        fake_mode = detect_fake_mode([q.meta["val"]])

        def emit(target, *args):
            with graph.inserting_before(node):
                new = graph.call_function(target, args)
            values = [a.meta["val"] if isinstance(a, fx.Node) else a for a in args]
            with fake_mode:
                new.meta["val"] = target(*values)
            meta.copy_location(new, node)
            return new

        scores = emit(aten.matmul.default, q, emit(aten.transpose.int, k, -2, -1))
        meta.update(scores, matmul="attn_scores")
        scaled = emit(aten.mul.Tensor, scores, scale)
        if mask is not None and mask.meta["val"].dtype == torch.bool:
            scaled = emit(aten.masked_fill.Scalar, scaled, emit(aten.logical_not.default, mask), -math.inf)
        elif mask is not None:
            scaled = emit(aten.add.Tensor, scaled, mask)
        if causal:
            length, source = q.meta["val"].shape[-2], k.meta["val"].shape[-2]
            if not (isinstance(length, int) and isinstance(source, int)):
                raise ValueError(f"attention node '{node.name}' is causal with a dynamic sequence length")
            future = ~torch.ones(length, source, dtype=torch.bool).tril()
            owner = f"ditq_{node.name}_causal_mask"
            gm.register_buffer(owner, future)
            with graph.inserting_before(node):
                future_node = graph.get_attr(owner)
            future_node.meta["val"] = fake_mode.from_tensor(future) if fake_mode else future
            scaled = emit(aten.masked_fill.Scalar, scaled, future_node, -math.inf)
        probs = emit(aten.softmax.int, scaled, -1)
        out = emit(aten.matmul.default, probs, v)
        meta.update(out, matmul="attn_value")
        node.replace_all_uses_with(out)
        graph.erase_node(node)
