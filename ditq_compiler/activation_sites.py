"""Activation sites: which inputs TQ-DiT's recipe sections quantize, and with which quantizer.

A site is one input of one op: argument ``arg`` of node ``consumer``. With ``scale_search`` every
quantized linear/conv input with a static quantizer is a site (its scale is searched); with
``attention`` the two operands of both attention matmuls are sites too. The attention matmuls
are found from the graph's ``post_softmax`` activation sites (``graph.py``): the matmul that
consumes the probabilities (``attn_value``, operands P and v) and the one that produced the
scores (``attn_scores``, operands q and k^T).

    kind                quantizer (``multi_region``)    time-grouped when ``time_groups.sites`` has
    post_softmax  P     softmax_mrq (post_softmax) or uniform        post_softmax
    post_gelu     fc2   gelu_mrq (post_gelu) or uniform              post_gelu
    linear_input        uniform                                      linear_inputs
    attention_operand   uniform (q, k^T, v)                          attention_operands

A site is time-grouped only when the recipe asks for it, G > 1 and its input depends on the
timestep (``GraphAnalysis.timestep_dependent``): with one group, or an input that is the same
function of the data at every timestep (PixArt's cross-attention k, v; a U-Net's ``conv_in``), the
quantizer is the ungrouped one. ``ditq_compiler.recipe_rules`` refuses a recipe whose listed
site kinds end up with no time-grouped site. Sites that a ``ditq::quant_linear`` cannot hold itself
(two-region or time-grouped linear inputs, every matmul operand) become standalone quantizer ops
(``passes/quantize_activations.py``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import fx

from ditq_compiler.graph import VIEW_OPS, GraphAnalysis, _reach_forward, _trace_back, module_path, op_name
from ditq_compiler.quant import QuantSpec
from ditq_compiler.recipe import Recipe, RecipeError
from ditq_compiler.recipe_rules import GROUPED_BY
from ditq_compiler import meta
from ditq_compiler.meta import ActivationSite, LayerAnnotation, MatmulLayer

MATMULS = ("matmul", "bmm")

@dataclass
class SitePlan:
    sites: list[ActivationSite] = field(default_factory=list)
    matmuls: dict[str, MatmulLayer] = field(default_factory=dict)
    groups: int = 1

    def of(self, consumer: str) -> list[ActivationSite]:
        return [s for s in self.sites if s.consumer == consumer]


def attention_matmuls(gm: fx.GraphModule, analysis: GraphAnalysis) -> dict[str, tuple[fx.Node, int, fx.Node]]:
    """For each post-softmax site: (scores matmul, index of P in the value matmul, value matmul), by value node."""
    nodes = {n.name: n for n in gm.graph.nodes}
    found = {}
    for name, kind in analysis.sites.items():
        if kind != "post_softmax":
            continue
        softmax = nodes[name]
        scores = _trace_back(softmax.args[0], VIEW_OPS | {"mul", "div", "add", "masked_fill"})
        for user in _reach_forward(softmax, VIEW_OPS):
            if op_name(user) not in MATMULS or op_name(scores) not in MATMULS:
                continue
            index = next(i for i, a in enumerate(user.args[:2])
                         if isinstance(a, fx.Node) and _trace_back(a, VIEW_OPS) is softmax)
            found[user.name] = (scores, index, user)
    return found


def plan_sites(gm: fx.GraphModule, analysis: GraphAnalysis, annotations: dict[str, LayerAnnotation],
               recipe: Recipe) -> SitePlan:
    """The sites the recipe's TQ-DiT sections quantize (none without ``scale_search``)."""
    if recipe.scale_search is None:
        return SitePlan()
    multi, groups = recipe.multi_region, recipe.time_groups
    count = groups.groups if groups is not None else 1
    grouped_kinds = {kind for kind, site in GROUPED_BY.items() if groups is not None and site in groups.sites}
    plan = SitePlan(groups=count)

    def add(consumer: fx.Node, arg: int, layer: str, operand: str, kind: str, spec: QuantSpec) -> None:
        two_regions = multi is not None and ((kind == "post_softmax" and multi.post_softmax)
                                             or (kind == "post_gelu" and multi.post_gelu))
        quantizer = ("softmax_mrq" if kind == "post_softmax" else "gelu_mrq") if two_regions else "uniform"
        varies = isinstance(consumer.args[arg], fx.Node) and consumer.args[arg].name in analysis.timestep_dependent
        plan.sites.append(ActivationSite(consumer.name, arg, layer, operand, kind, quantizer, spec,
                                         kind in grouped_kinds and count > 1 and varies))

    nodes = {n.name: n for n in gm.graph.nodes}
    for name, annotation in annotations.items():
        if annotation.activations is None:
            continue
        if annotation.activations.granularity == "token":
            raise RecipeError(f"recipe '{recipe.name}': layer '{annotation.name}' has per-token activations; "
                              "the scale search fits static per-tensor ones")
        kind = "post_gelu" if annotation.role == "fc2" else "linear_input"
        add(nodes[name], 0, annotation.name, "input", kind, annotation.activations)

    if recipe.attention is not None and recipe.attention.matmuls:
        names: dict[str, int] = {}
        for scores, p_index, value in attention_matmuls(gm, analysis).values():
            for node, role, suffix in ((scores, "attn_scores", "matmul_qk"), (value, "attn_value", "matmul_pv")):
                if node.name in plan.matmuls:
                    continue
                base = f"{module_path(node)}.{suffix}"
                names[base] = names.get(base, 0) + 1
                layer = base if names[base] == 1 else f"{base}#{names[base]}"
                plan.matmuls[node.name] = MatmulLayer(node.name, layer, role)
                if role == "attn_scores":
                    add(node, 0, layer, "q", "attention_operand", recipe.activations)
                    add(node, 1, layer, "k^T", "attention_operand", recipe.activations)
                else:
                    add(node, p_index, layer, "P", "post_softmax", recipe.activations)
                    add(node, 1 - p_index, layer, "v", "attention_operand", recipe.activations)
        if not plan.matmuls:
            raise RecipeError(f"recipe '{recipe.name}' quantizes attention matmuls, but the graph has no "
                              "matmul -> softmax -> matmul attention (nor SDPA to decompose)")
    order = {n.name: i for i, n in enumerate(gm.graph.nodes)}
    plan.sites.sort(key=lambda s: (order[s.consumer], s.arg))
    for node in (n for n in gm.graph.nodes if n.name in plan.matmuls):
        meta.update(node, matmul_layer=plan.matmuls[node.name])
    return plan


__all__ = ["ActivationSite", "MatmulLayer", "SitePlan", "attention_matmuls", "plan_sites"]
