"""Time groups that cannot work on this model or this calibration set, refused before any calibration.

TQ-DiT's time groups (``recipe.time_groups``, ``ditq_compiler.calibration.time_groups``) give an
activation site one set of parameters per group of timesteps, chosen at run time from the timestep
input. That needs three things the recipe alone cannot promise; each is checked right after the
graph is analysed and the sites are planned (``activation_sites.plan_sites``), so a compile that
would fail in the scale search, or quietly fit G copies of one quantizer, stops in a second with the
field to change:

* the model takes a timestep input (``recipe(NAME).time_groups``);
* every site kind listed in ``time_groups.sites`` exists in the graph and at least one of its inputs
  depends on the timestep (``time_groups.sites[i]``; the layers are named). A site whose input does
  not depend on the timestep (PixArt's cross-attention k and v read only the caption; a U-Net's
  ``conv_in`` reads only the sample) has one distribution for every group, so ``plan_sites`` gives it
  the ungrouped quantizer; a listed kind none of whose inputs depends on the timestep is an error.
  ``multi_region.post_gelu`` likewise needs a post-GELU site;
* the calibration set has at least G distinct timesteps (``time_groups.groups``): a group is a run
  of the distinct calibration timesteps, so fewer than G (an empty set, one timestep) leaves groups
  with no data. The message lists the timesteps seen and the groups asked for.

With ``groups: 1`` the quantizer is the ungrouped one and none of this applies.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import fx

from ditq_compiler.activation_sites import GROUPED_BY, SitePlan
from ditq_compiler.calibration.batches import CalibrationError
from ditq_compiler.graph import GraphAnalysis
from ditq_compiler.recipe import Recipe, RecipeError

MAX_LISTED = 6
WHAT = {"post_softmax": "the post-softmax probabilities P of the attention matmuls",
        "post_gelu": "the post-GELU inputs of the fc2 layers",
        "linear_inputs": "the inputs of the quantized linears and convs other than fc2",
        "attention_operands": "the q, k^T and v operands of the attention matmuls"}
MISSING = {"post_softmax": "the graph has no quantized attention matmul",
           "post_gelu": "no fc2 layer (a linear fed by a GELU) is quantized with activations",
           "linear_inputs": "no linear or conv other than fc2 is quantized with activations",
           "attention_operands": "the graph has no quantized attention matmul"}


def _grouped(recipe: Recipe) -> bool:
    return recipe.time_groups is not None and recipe.time_groups.groups > 1


def _listing(items: Sequence[str]) -> str:
    shown = ", ".join(items[:MAX_LISTED])
    return shown + (f", ... ({len(items)} in all)" if len(items) > MAX_LISTED else "")


def check_time_group_sites(recipe: Recipe, plan: SitePlan, analysis: GraphAnalysis, gm: fx.GraphModule,
                           timestep_input: str | None, model_class: str) -> None:
    """RecipeError naming the field (and layers) if the recipe's time groups or MRQ sites cannot apply here."""
    path = f"recipe({recipe.name})"
    if recipe.multi_region is not None and recipe.multi_region.post_gelu and recipe.scale_search is not None \
            and not any(s.kind == "post_gelu" for s in plan.sites):
        raise RecipeError(f"{path}.multi_region.post_gelu: {model_class} has no post-GELU site: {MISSING['post_gelu']} "
                          "(set post_gelu: false)")
    if not _grouped(recipe):
        return
    if timestep_input is None:
        raise RecipeError(f"{path}.time_groups: {model_class} has no timestep input, so no time group can be chosen "
                          "at run time; drop the time_groups section (or set groups: 1)")
    nodes = {n.name: n for n in gm.graph.nodes}
    for i, listed in enumerate(recipe.time_groups.sites):
        sites = [s for s in plan.sites if GROUPED_BY[s.kind] == listed]
        if not sites:
            raise RecipeError(f"{path}.time_groups.sites[{i}]: '{listed}' groups {WHAT[listed]}, but "
                              f"{MISSING[listed]} in {model_class}; remove '{listed}' from time_groups.sites")
        if not any(s.time_grouped for s in sites):
            inputs = [f"'{s.layer}' {s.operand} (node {s.consumer}, input {nodes[s.consumer].args[s.arg]})"
                      for s in sites]
            raise RecipeError(f"{path}.time_groups.sites[{i}]: '{listed}' groups {WHAT[listed]}, but none of them "
                              f"depends on the timestep input '{timestep_input}' of {model_class}, so every time "
                              f"group would see the same {recipe.activations.bits}-bit "
                              f"{recipe.activations.granularity} activations: {_listing(inputs)}. Remove "
                              f"'{listed}' from time_groups.sites")


def _seen(timesteps: torch.Tensor) -> str:
    values = [f"{v:g}" for v in timesteps.tolist()]
    return ", ".join(values) if len(values) <= 2 * MAX_LISTED else \
        ", ".join(values[:MAX_LISTED]) + ", ..., " + ", ".join(values[-MAX_LISTED:])


def check_time_group_calibration(recipe: Recipe, flat_batches: Sequence[Sequence[Any]] | None,
                                 timestep_index: int | None, plan: SitePlan | None = None) -> None:
    """CalibrationError if the calibration set has fewer distinct timesteps than the recipe has time groups.

    ``flat_batches`` empty (or None) is checked before capture; with ``plan`` only when a site is time-grouped.
    """
    if not _grouped(recipe) or (plan is not None and not any(s.time_grouped for s in plan.sites)):
        return
    groups = recipe.time_groups.groups
    field = f"recipe({recipe.name}).time_groups.groups"
    if not flat_batches:
        raise CalibrationError(f"{field} is {groups}: each time group is fitted on calibration inputs from its own "
                               "timesteps, and the calibration set is empty (timesteps seen: none). Pass "
                               f"calibration=dq.calibration.from_sampler(model, scheduler, selection='time_groups', "
                               f"groups={groups}, ...)")
    if timestep_index is None:
        return
    seen = torch.cat([torch.as_tensor(f[timestep_index]).detach().reshape(-1).to(torch.float64)
                      for f in flat_batches]).unique()
    if len(seen) < groups:
        raise CalibrationError(f"{field} is {groups}, but the calibration set has {len(seen)} distinct "
                               f"timestep{'s' if len(seen) != 1 else ''} (seen: {_seen(seen)}), so "
                               f"{groups - len(seen)} group(s) would have no data: draw the set from at least "
                               f"{groups} sampler steps (from_sampler(selection='time_groups', groups={groups})) or "
                               f"set time_groups.groups <= {len(seen)}")


__all__ = ["check_time_group_calibration", "check_time_group_sites"]
