"""The rules between a recipe's sections, and between a recipe and the model and calibration set it meets.

One table, ``RULES``. A rule is checked at one moment (``when``):

    "recipe"       when the recipe is built (``Recipe.from_dict``): rules between its sections
    "calls"        at the start of ``compile()``, with the calibration calls as given
    "graph"        after the graph is analysed and TQ-DiT's sites are planned
    "calibration"  after the calibration calls are bound to the graph's inputs

and says what is wrong as ``(field, message)`` pairs, the field a path inside the recipe
(``time_groups.sites[0]``); ``check_rules`` raises the first as ``RecipeError`` (or ``CalibrationError`` for a
rule about the data), prefixed with the recipe's path. Each rule's docstring says why it holds.

Time groups (TQ-DiT TGQ) need three things the recipe alone cannot promise: a timestep input, grouped site
kinds that exist and depend on the timestep in this graph, and at least G distinct calibration timesteps
(a group is a run of the distinct calibration timesteps). With ``groups: 1`` the quantizer is the ungrouped
one and none of those apply.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import torch

from ditq_compiler.calibration.batches import CalibrationError
from ditq_compiler.recipe_sections import RecipeError

Problems = Iterator[tuple[str, str]]
MAX_LISTED = 6
# the time_groups.sites entry that groups each kind of activation site (``activation_sites``)
GROUPED_BY = {"post_softmax": "post_softmax", "post_gelu": "post_gelu", "linear_input": "linear_inputs",
              "attention_operand": "attention_operands"}
WHAT = {"post_softmax": "the post-softmax probabilities P of the attention matmuls",
        "post_gelu": "the post-GELU inputs of the fc2 layers",
        "linear_inputs": "the inputs of the quantized linears and convs other than fc2",
        "attention_operands": "the q, k^T and v operands of the attention matmuls"}
MISSING = {"post_softmax": "the graph has no quantized attention matmul",
           "post_gelu": "no fc2 layer (a linear fed by a GELU) is quantized with activations",
           "linear_inputs": "no linear or conv other than fc2 is quantized with activations",
           "attention_operands": "the graph has no quantized attention matmul"}


@dataclass
class RuleContext:
    """What a rule may look at; fields past ``recipe`` are filled at the later moments."""

    recipe: Any
    calls: Sequence[Any] | None = None             # "calls": the calibration calls as given
    plan: Any = None                               # "graph": activation_sites.SitePlan
    gm: Any = None                                 # "graph": the analysed graph
    timestep_input: str | None = None              # "graph"
    model_class: str = "model"                     # "graph"
    flat: Sequence[Sequence[Any]] | None = None    # "calibration": bound, flattened calls
    timestep_index: int | None = None              # "calibration"


@dataclass(frozen=True)
class Rule:
    when: str
    problems: Callable[[RuleContext], Problems]
    error: type = RecipeError


# ---- between sections ------------------------------------------------------------------------------

def migration_needs_shift(c: RuleContext) -> Problems:
    """Outlier migration divides shifted activations (TaQ-DiT Eq. 9 is defined after the shift)."""
    if c.recipe.migration is not None and c.recipe.shift is None:
        yield "migration", "outlier migration runs on shifted activations; add a 'shift' section"


def methods_need_activations(c: RuleContext) -> Problems:
    """Smoothing, shift, reconstruction and TQ-DiT's sections act on quantized activations."""
    for name in ("smoothing", "shift", "reconstruction", "attention", "multi_region", "time_groups"):
        if getattr(c.recipe, name) is not None and c.recipe.activations is None:
            yield name, "needs quantized activations (activations is false)"


def search_fits_tq_parameters(c: RuleContext) -> Problems:
    """The attention operands, two-region steps and time-group tables are fitted by the scale search."""
    r = c.recipe
    if r.attention is not None and r.attention.matmuls and r.scale_search is None:
        yield "attention", ("the attention operands are calibrated by the scale search; add a 'scale_search' "
                            "section (metric: mse for the plain output error)")
    for name in ("multi_region", "time_groups"):
        if getattr(r, name) is not None and r.scale_search is None:
            yield name, "its parameters are fitted by the scale search; add a 'scale_search' section"


def multi_region_sites_exist(c: RuleContext) -> Problems:
    """Two-region post-softmax quantizers exist only where the attention matmuls are quantized."""
    r, multi = c.recipe, c.recipe.multi_region
    matmuls = r.attention is not None and r.attention.matmuls
    if multi is not None and not multi.post_softmax and not multi.post_gelu:
        yield "multi_region", "post_softmax and post_gelu are both false, so the section changes nothing; drop it"
    if multi is not None and multi.post_softmax and not matmuls:
        yield "multi_region.post_softmax", ("the probabilities are quantized only where the attention matmuls are; "
                                            "add 'attention: {matmuls: true}' or set post_softmax: false")
    if r.time_groups is not None and not matmuls:
        for i, site in enumerate(r.time_groups.sites):
            if site in ("post_softmax", "attention_operands"):
                yield f"time_groups.sites[{i}]", f"'{site}' needs the attention matmuls quantized; add " \
                                                 "'attention: {matmuls: true}'"


def search_formats(c: RuleContext) -> Problems:
    """The scale search fits per-channel / per-tensor weight scales and static activation scales, and sets
    what reconstruction would set."""
    r = c.recipe
    if r.scale_search is None:
        return
    if r.weights.granularity == "group":
        yield "scale_search", "searches per-channel or per-tensor weight scales; weights.granularity is 'group'"
    if r.activations is not None and r.activations.granularity == "token":
        yield "scale_search", "searches static activation scales; activations.granularity is 'token' (dynamic)"
    if r.reconstruction is not None:
        yield "scale_search", "the recipe also has a 'reconstruction' section; both would set the same scales, " \
                              "keep one"
    for i, override in enumerate(r.overrides):
        weights = dict(override.weights or ())
        acts = dict(override.activations) if isinstance(override.activations, tuple) else {}
        if weights.get("granularity") == "group":
            yield f"overrides[{i}].weights.granularity", ("the scale_search searches per-channel or per-tensor "
                                                          "weight scales, not 'group'")
        if acts.get("granularity") == "token":
            yield f"overrides[{i}].activations.granularity", ("the scale_search fits static activation scales (and "
                                                              "time groups a table of them); 'token' is dynamic")


def one_fitting_method(c: RuleContext) -> Problems:
    """Rotation and shift both rewrite the same inputs; distillation and reconstruction both fit the quantized
    model; RobuQ's sections refit what the scale search fits on the unrotated graph."""
    r = c.recipe
    if r.rotation is not None and r.shift is not None:
        yield "rotation", ("the Hadamard rotation and TaQ-DiT's shift both rewrite the input of the same linears; "
                           "use one of them")
    if r.distillation is not None and r.reconstruction is not None:
        yield "distillation", "distillation and block reconstruction both fit the quantized model; use one of them"
    robuq = next((k for k in ("rotation", "distillation", "mixed_precision") if getattr(r, k) is not None), None)
    if r.scale_search is not None and robuq is not None:
        yield robuq, ("RobuQ's sections and TQ-DiT's scale_search are not combined (the search fits scales on the "
                      "unrotated graph, distillation refits them); use one method per recipe")


def mixed_precision_inputs(c: RuleContext) -> Problems:
    """AMPN chooses per-token bits (dynamic ranges run at any width) from sensitivities measured after
    distillation, unless asked to measure them before (the PTQ metric)."""
    r, mixed = c.recipe, c.recipe.mixed_precision
    if mixed is None:
        return
    if r.activations is None or r.activations.granularity != "token":
        yield "mixed_precision", ("chooses per-token activation bits (dynamic ranges, so any width runs without "
                                  "recalibration); set activations.granularity: token")
    if mixed.sensitivity == "distilled" and r.distillation is None:
        yield "mixed_precision.sensitivity", ("'distilled' measures sensitivity after distillation; add a "
                                              "'distillation' section (or use sensitivity: ptq)")


# ---- with the model and the calibration set -------------------------------------------------------------

def _grouped(recipe: Any) -> bool:
    return recipe.time_groups is not None and recipe.time_groups.groups > 1


def _listing(items: Sequence[str]) -> str:
    shown = ", ".join(items[:MAX_LISTED])
    return shown + (f", ... ({len(items)} in all)" if len(items) > MAX_LISTED else "")


def calls_for_time_groups(c: RuleContext) -> Problems:
    """Each time group is fitted on calibration inputs from its own timesteps."""
    if _grouped(c.recipe) and not len(c.calls):
        groups = c.recipe.time_groups.groups
        yield "time_groups.groups", (f"is {groups}: each time group is fitted on calibration inputs from its own "
                                     "timesteps, and the calibration set is empty (timesteps seen: none). Pass "
                                     "calibration=dq.calibration.from_sampler(model, scheduler, selection="
                                     f"'time_groups', groups={groups}, ...)")


def smoothing_metric(recipe: Any, has_noise: bool) -> str:
    """The error smoothing scores candidates by: "auto" is the Hessian-weighted error when the calibration set
    carries the diffusion-loss noise (``from_sampler`` sets do), else the plain output error."""
    metric = recipe.smoothing.metric
    return ("hessian" if has_noise else "mse") if metric == "auto" else metric


def calls_carry_noise_for_smoothing(c: RuleContext) -> Problems:
    """Hessian-weighted smoothing backpropagates the diffusion loss, which pairs each input with its noise."""
    if c.recipe.smoothing is not None and c.recipe.smoothing.metric == "hessian" and c.calls is not None \
            and getattr(c.calls, "noise", None) is None:
        yield "smoothing.metric", ("'hessian' weights the error with gradients of the diffusion loss, which needs the "
                                   "noise of each calibration input: use dq.calibration.from_sampler(...) (its sets "
                                   "carry it), or metric: mse")


def calls_carry_noise_for_dm_loss(c: RuleContext) -> Problems:
    """BiDM+'s diffusion loss pairs each calibration input with the noise that made it."""
    d = c.recipe.distillation
    if d is not None and d.dm_weight > 0 and c.calls is not None and getattr(c.calls, "noise", None) is None:
        yield "distillation.dm_weight", ("the diffusion loss needs the noise of each calibration input: use "
                                         "dq.calibration.from_sampler(...) (its sets carry it), or dm_weight: 0")


def binary_layers(c: RuleContext) -> Problems:
    """A binarized layer is W1A1 with one binarizer, and is trained by distillation or used as initialised; the
    PTQ methods fit integer grids it does not have."""
    r = c.recipe
    w_binary = r.weights.binary
    a_binary = r.activations is not None and r.activations.binary
    if w_binary != a_binary:
        yield ("activations.bits" if w_binary else "weights.bits"), \
            "binary layers are W1A1: weights and activations both bits: 1, with the same binarizer"
    elif w_binary and r.weights.binarizer != r.activations.binarizer:
        yield "activations.binarizer", f"must be the weights' binarizer, {r.weights.binarizer!r}"
    if w_binary:
        for name in ("smoothing", "shift", "reconstruction", "scale_search", "rotation", "mixed_precision"):
            if getattr(r, name) is not None:
                yield name, "is not defined for binarized (bits: 1) layers; train them with a distillation section"


def connections_are_learned(c: RuleContext) -> Problems:
    """TES's coefficients are learned by distillation; with the initial ones blindly applied the model would
    average features the network never learned to average."""
    if c.recipe.timestep_connections is not None and c.recipe.distillation is None:
        yield "timestep_connections", "its coefficients are learned by distillation; add a 'distillation' section"


def post_gelu_site_exists(c: RuleContext) -> Problems:
    """A two-region post-GELU quantizer needs a post-GELU site."""
    r = c.recipe
    if r.multi_region is not None and r.multi_region.post_gelu and r.scale_search is not None \
            and not any(s.kind == "post_gelu" for s in c.plan.sites):
        yield "multi_region.post_gelu", (f"{c.model_class} has no post-GELU site: {MISSING['post_gelu']} "
                                         "(set post_gelu: false)")


def time_groups_can_apply(c: RuleContext) -> Problems:
    """Time groups are chosen at run time from the timestep input, and a grouped site kind must exist and
    depend on the timestep (else every group would see the same data)."""
    r = c.recipe
    if not _grouped(r):
        return
    if c.timestep_input is None:
        yield "time_groups", (f"{c.model_class} has no timestep input, so no time group can be chosen at run time; "
                              "drop the time_groups section (or set groups: 1)")
        return
    nodes = {n.name: n for n in c.gm.graph.nodes}
    for i, listed in enumerate(r.time_groups.sites):
        sites = [s for s in c.plan.sites if GROUPED_BY[s.kind] == listed]
        if not sites:
            yield f"time_groups.sites[{i}]", (f"'{listed}' groups {WHAT[listed]}, but {MISSING[listed]} in "
                                              f"{c.model_class}; remove '{listed}' from time_groups.sites")
        elif not any(s.time_grouped for s in sites):
            inputs = [f"'{s.layer}' {s.operand} (node {s.consumer}, input {nodes[s.consumer].args[s.arg]})"
                      for s in sites]
            yield f"time_groups.sites[{i}]", (
                f"'{listed}' groups {WHAT[listed]}, but none of them depends on the timestep input "
                f"'{c.timestep_input}' of {c.model_class}, so every time group would see the same "
                f"{r.activations.bits}-bit {r.activations.granularity} activations: {_listing(inputs)}. Remove "
                f"'{listed}' from time_groups.sites")


def _seen(timesteps: torch.Tensor) -> str:
    values = [f"{v:g}" for v in timesteps.tolist()]
    return ", ".join(values) if len(values) <= 2 * MAX_LISTED else \
        ", ".join(values[:MAX_LISTED]) + ", ..., " + ", ".join(values[-MAX_LISTED:])


def timesteps_for_time_groups(c: RuleContext) -> Problems:
    """A group is a run of the distinct calibration timesteps: fewer than G leaves groups with no data."""
    r = c.recipe
    if not _grouped(r) or (c.plan is not None and not any(s.time_grouped for s in c.plan.sites)):
        return
    groups = r.time_groups.groups
    if not c.flat:
        yield from calls_for_time_groups(RuleContext(r, calls=[]))
        return
    if c.timestep_index is None:
        return
    seen = torch.cat([torch.as_tensor(f[c.timestep_index]).detach().reshape(-1).to(torch.float64)
                      for f in c.flat]).unique()
    if len(seen) < groups:
        yield "time_groups.groups", (
            f"is {groups}, but the calibration set has {len(seen)} distinct timestep{'s' if len(seen) != 1 else ''} "
            f"(seen: {_seen(seen)}), so {groups - len(seen)} group(s) would have no data: draw the set from at least "
            f"{groups} sampler steps (from_sampler(selection='time_groups', groups={groups})) or set "
            f"time_groups.groups <= {len(seen)}")


RULES: tuple[Rule, ...] = (
    Rule("recipe", migration_needs_shift),
    Rule("recipe", methods_need_activations),
    Rule("recipe", search_fits_tq_parameters),
    Rule("recipe", multi_region_sites_exist),
    Rule("recipe", search_formats),
    Rule("recipe", one_fitting_method),
    Rule("recipe", mixed_precision_inputs),
    Rule("recipe", binary_layers),
    Rule("recipe", connections_are_learned),
    Rule("calls", calls_for_time_groups, CalibrationError),
    Rule("calls", calls_carry_noise_for_smoothing, CalibrationError),
    Rule("calls", calls_carry_noise_for_dm_loss, CalibrationError),
    Rule("graph", post_gelu_site_exists),
    Rule("graph", time_groups_can_apply),
    Rule("calibration", timesteps_for_time_groups, CalibrationError),
)


def check_rules(context: RuleContext, when: str, path: str | None = None) -> None:
    """Raise the first problem any rule checked at ``when`` finds, naming the field (``path`` is the recipe's)."""
    path = path or f"recipe({context.recipe.name})"
    for rule in RULES:
        if rule.when != when:
            continue
        for field, message in rule.problems(context):
            separator = " " if message.startswith("is ") else ": "
            raise rule.error(f"{path}.{field}{separator}{message}")


__all__ = ["GROUPED_BY", "RULES", "Rule", "RuleContext", "check_rules"]
