"""Annotation: the recipe's decision for each layer, recorded on the node (``meta.NodeMeta.annotation``).

Deciding what to quantize is kept apart from rewriting: passes read these annotations.
"""

from __future__ import annotations

import re
import warnings
from collections import Counter

from torch import fx

from ditq_compiler.graph import GraphAnalysis, LayerInfo
from ditq_compiler.recipe import Recipe, RecipeError, RecipeWarning
from ditq_compiler import meta
from ditq_compiler.meta import LayerAnnotation


def annotate(gm: fx.GraphModule, analysis: GraphAnalysis, recipe: Recipe,
             strict: bool = False) -> dict[str, LayerAnnotation]:
    """Record the annotation on every layer the recipe quantizes; return them by node name.

    An override that matches no layer (a typo in a name regex, a role the model does not have) changes
    nothing, silently: it is a ``RecipeWarning`` listing the roles and layer names the model has, or with
    ``strict`` a ``RecipeError``."""
    check_overrides(recipe, list(analysis.layers.values()), strict)
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


def layer_names_summary(layers: list[LayerInfo], limit: int = 12) -> str:
    """The layer names, numbered path parts shown as ``*`` with how many layers share the pattern."""
    patterns = Counter(re.sub(r"(?<=\.)[0-9]+(?=\.|$)", "*", layer.name) for layer in layers)
    shown = [f"{p} (x{n})" if n > 1 else p for p, n in patterns.items()]
    more = f", ... ({len(shown) - limit} more patterns)" if len(shown) > limit else ""
    return ", ".join(shown[:limit]) + more


def check_overrides(recipe: Recipe, layers: list[LayerInfo], strict: bool) -> None:
    """Each override selects at least one layer (see ``annotate``)."""
    for i, override in enumerate(recipe.overrides):
        if any(override.matches(layer) for layer in layers):
            continue
        selector = " and ".join(f"{key} {getattr(override, key)!r}" for key in ("role", "name")
                                if getattr(override, key) is not None)
        message = (f"recipe '{recipe.name}': overrides[{i}] ({selector}) matches no layer of the model, so it "
                   f"changes nothing. The model's roles: {sorted({layer.role for layer in layers})}; its layers: "
                   f"{layer_names_summary(layers)} (a name is a regular expression matched against the whole "
                   "layer name)")
        if strict:
            raise RecipeError(message)
        warnings.warn(message, RecipeWarning, stacklevel=4)
