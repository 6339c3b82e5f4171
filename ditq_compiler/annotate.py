"""Annotation: the recipe's decision for each layer, recorded on the node (``meta.NodeMeta.annotation``).

Deciding what to quantize is kept apart from rewriting: passes read these annotations.
"""

from __future__ import annotations

from torch import fx

from ditq_compiler.graph import GraphAnalysis
from ditq_compiler.recipe import Recipe, RecipeError
from ditq_compiler import meta
from ditq_compiler.meta import LayerAnnotation


def annotate(gm: fx.GraphModule, analysis: GraphAnalysis, recipe: Recipe) -> dict[str, LayerAnnotation]:
    """Record the annotation on every layer the recipe quantizes; return them by node name."""
    nodes = {n.name: n for n in gm.graph.nodes}
    plans: dict[str, LayerAnnotation] = {}
    for node_name, layer in analysis.layers.items():
        plan = recipe.plan(layer)
        if plan is None:
            continue
        if layer.op == "conv2d" and plan.weights.granularity == "group":
            raise RecipeError(f"recipe '{recipe.name}': layer '{layer.name}' is a conv; per-group weights "
                              "are defined for linears (use an override with granularity: channel)")
        if layer.op == "conv2d" and plan.activations is not None and plan.activations.granularity == "token":
            raise RecipeError(f"recipe '{recipe.name}': layer '{layer.name}' is a conv; per-token activations "
                              "are defined for linears")
        annotation = LayerAnnotation(layer.name, layer.role, layer.op, plan.weights, plan.activations)
        meta.update(nodes[node_name], annotation=annotation)
        plans[node_name] = annotation
    if not plans and recipe.rotation is None:   # a rotation-only recipe (hadamard-only) quantizes nothing
        found = sorted({layer.role for layer in analysis.layers.values()})
        raise RecipeError(f"recipe '{recipe.name}' selects no layer: it quantizes roles "
                          f"{list(recipe.quantize_roles)}, the model has layers with roles {found}")
    return plans
