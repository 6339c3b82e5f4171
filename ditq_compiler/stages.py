"""The compile stages, in the order they run: ``compile()`` is this list run over one ``CompileState``.

    stage              runs when the recipe has      does
    check              always                        refuse recipe x calibration mismatches before any work
    capture            always                        torch.export of a copy of the model
    decompose          attention                     SDPA -> matmul, softmax, matmul (TQ-DiT)
    analyse            always                        roles, activation sites, timestep dependence
    annotate           always                        the recipe's decision per layer; TQ-DiT's sites
    bind               always                        calibration calls bound to the graph; the resume cache
    smooth             smoothing                     per-channel smoothing folded through the modulation
    rotate             rotation                      Hadamard rotations (RobuQ)
    transform          shift                         momentum shift and outlier migration (TaQ-DiT)
    calibrate          always                        Hessian-guided scale search (TQ-DiT) or observers
    reconstruct        reconstruction                block-wise AdaRound + LSQ (+ factors) (TaQ-DiT)
    mixed precision    mixed_precision               per-layer activation bits (RobuQ's AMPN)
    distill            distillation                  quantization-aware distillation (RobuQ, BiDM+ SBM)
    quantize           always                        layers and activation sites become ditq:: ops
    lower              always                        the backend's kernels (``backends.registry``)
    measure            always                        per-layer and output SQNR against FP
    inspect            always                        activation statistics; the per-layer report
    connect            timestep_connections          block outputs mixed across sampler steps (BiDM+'s TES)

A stage is a name, a ``run(state)`` and an ``enabled(recipe)``; its wall time counts toward the
summary column ``clock`` (``CLOCKS``). A new method is one more entry: a stage function that reads
what earlier stages left in the state, runs its passes through ``state.run_passes`` and returns its
parameters through ``state.fit``. ``compile(..., stages=with_stage(DEFAULT_STAGES, stage, after=...))``
runs a list with an added stage, without editing this module.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from ditq_compiler import meta
from ditq_compiler.activation_sites import plan_sites
from ditq_compiler.annotate import annotate
from ditq_compiler.backends.registry import get_backend, lower
from ditq_compiler.calibration.batches import CalibrationError
from ditq_compiler.calibration.cache import load_params, open_cache, run_key, save_params
from ditq_compiler.calibration.channel_stats import calibrate_transforms
from ditq_compiler.calibration.observe import observe_activations
from ditq_compiler.calibration.params import QuantParams
from ditq_compiler.calibration.reconstruct import reconstruct
from ditq_compiler.calibration.scale_search import check_search_inputs, search_scales
from ditq_compiler.calibration.smoothing import choose_smoothing
from ditq_compiler.calibration.time_groups import describe_groups
from ditq_compiler.capture import capture, split_rows
from ditq_compiler.distributed import DistributedError
from ditq_compiler.graph import UnsupportedLayerError, analyse, block_sites, unsupported_layers
from ditq_compiler.inspection.activations import record_activation_stats
from ditq_compiler.passes.attach_time_groups import AttachTimeGroups
from ditq_compiler.passes.connect_timesteps import ConnectTimesteps
from ditq_compiler.passes.decompose_attention import DecomposeAttention
from ditq_compiler.passes.fold_shift_into_bias import FoldShiftIntoBias
from ditq_compiler.passes.insert_hadamard import InsertHadamard
from ditq_compiler.passes.migrate_outliers import MigrateOutliers, channel_affine
from ditq_compiler.passes.quantize_activations import QuantizeActivations
from ditq_compiler.passes.quantize_linears import QuantizeLinears
from ditq_compiler.passes.smooth_through_modulation import SmoothThroughModulation, find_sites
from ditq_compiler.passes.update_migration_factors import UpdateMigrationFactors
from ditq_compiler.pipeline import copy_graph_sharing_tensors
from ditq_compiler.recipe import Recipe
from ditq_compiler.records import FloatLayer
from ditq_compiler.recipe_rules import RuleContext, check_rules, smoothing_metric
from ditq_compiler.report import layer_reports, measure, site_reports
from ditq_compiler.state import CompileState
from ditq_compiler.train import choose_activation_bits, distill
from ditq_compiler.train.distill import Connection
from ditq_compiler.version import __version__

# the summary's time columns, in the order the stages that count toward them run
CLOCKS = ("capture", "calibration", "reconstruction", "mixed precision", "distillation", "rewrite", "measure",
          "inspect")


def _always(recipe: Recipe) -> bool:
    return True


@dataclass(frozen=True)
class Stage:
    name: str
    run: Callable[[CompileState], None]
    enabled: Callable[[Recipe], bool] = field(default=_always)
    clock: str = ""          # the summary column its time counts toward ("": its own name)

    @property
    def column(self) -> str:
        return self.clock or self.name


# ---- the stages ------------------------------------------------------------------------------------

def check_inputs(state: CompileState) -> None:
    """What the recipe needs from the calibration set, checked before capture (seconds, not minutes)."""
    check_rules(RuleContext(state.recipe, calls=state.data), "calls")
    check_search_inputs(state.recipe.scale_search, state.data.calls, state.data.noise)
    world = state.options.distributed.world_size
    if world > 1 and len(state.data.calls) < world:
        raise CalibrationError(f"{len(state.data.calls)} calibration batches for {world} processes: each process "
                               "calibrates on its share of the batches and needs at least one")


EXAMPLE_ROWS = 2      # rows of the calibration call that torch.export traces (1 would specialise the batch)


def capture_graph(state: CompileState) -> None:
    """Export on the user's example, else on the first calibration call cut to 2 rows: a model whose code
    branches on the batch (diffusers' Upsample2D at 64) then exports for the small batches, and larger
    calls run in chunks (``capture.max_batch``) rather than small ones being refused."""
    example = state.options.example_inputs
    if example is None and state.data.calls:
        example = split_rows(state.data.calls[0], EXAMPLE_ROWS)[0]
    state.captured = capture(state.model, example, state.options.dynamic_shapes)
    state.gm = state.captured.graph_module


def decompose_attention(state: CompileState) -> None:
    state.run_passes(DecomposeAttention())


def analyse_graph(state: CompileState) -> None:
    state.analysis = analyse(state.gm, state.captured.sample_input, state.captured.timestep_input)
    unsupported = unsupported_layers(state.gm)
    if state.options.strict and unsupported:
        raise UnsupportedLayerError(f"strict compile of {state.captured.model_class}: {len(unsupported)} layer(s) "
                                    "carry weights the compiler cannot quantize:\n  - " +
                                    "\n  - ".join(u.describe() for u in unsupported))
    state.reports.unsupported = unsupported


# roles only a diffusion model's structure gives: without any, the role defaults that keep layers in float
# (patch_embed, final) are guesses about a model they were not made for
DIFFUSION_ROLES = ("qkv", "attn_out", "fc1", "fc2", "adaln", "embed")


def annotate_layers(state: CompileState) -> None:
    state.annotations = annotate(state.gm, state.analysis, state.recipe, strict=state.options.strict)
    state.reports.float_layers = [
        FloatLayer(info.name, info.role, "role" if info.role not in state.recipe.quantize_roles else "override")
        for node, info in state.analysis.layers.items() if node not in state.annotations]
    roles = sorted({info.role for info in state.analysis.layers.values()})
    if not set(roles) & set(DIFFUSION_ROLES):
        text = (f"no attention, MLP or conditioning layer found (roles: {', '.join(roles)}): this does not look like a "
                "diffusion denoiser, and the roles kept in float by default (patch_embed, final) may not mean what "
                "they do in one; list the roles to quantize in the recipe's quantize_roles")
        warnings.warn(f"{state.captured.model_class}: {text}", stacklevel=2)
        state.note("analyse", text)
    state.plan = plan_sites(state.gm, state.analysis, state.annotations, state.recipe)
    check_rules(RuleContext(state.recipe, plan=state.plan, gm=state.gm, timestep_input=state.captured.timestep_input,
                            model_class=state.captured.model_class), "graph")


def bind_calibration(state: CompileState) -> None:
    """Calls bound to the graph's inputs; the cache of interrupted work keyed by everything that follows."""
    state.data = state.data.bind(state.captured)
    check_rules(RuleContext(state.recipe, plan=state.plan, flat=state.data.flat,
                            timestep_index=state.data.timestep_index), "calibration")
    versions = {"ditq-compiler": __version__, "torch": torch.__version__}
    parts = dict(graph_code=state.gm.code, state=state.gm.state_dict(), recipe=state.recipe.to_dict(),
                 batches=state.data.flat, versions=versions)
    dist, key = state.options.distributed, None
    if dist.active:     # every rank must compile the same model on the same data, or their work does not add up
        key = run_key(**parts)
        differ = [rank for rank, theirs in enumerate(dist.gather(key)) if theirs != key]
        if differ:
            raise DistributedError(f"rank {dist.rank}'s model, recipe or calibration data differ from rank(s) "
                                   f"{differ}'s: every process must call compile() with the same arguments")
    state.cache = open_cache(state.options.cache_dir, parts, dist, key)


def smooth(state: CompileState) -> None:
    """Smoothing through the modulation: the sites the recipe's roles give, their ``s`` chosen on the calibration
    data (cached), folded into the graph; the sites skipped are listed with why."""
    spec = state.recipe.smoothing
    layers = {n: a.name for n, a in state.annotations.items() if a.role in spec.sites and a.activations is not None}
    found = find_sites(state.gm, layers)
    fitted = load_params(state.cache, "smoothing")
    if fitted is None:
        fitted = choose_smoothing(state.gm, found.sites, state.annotations, spec, state.data.flat, state.data.noise,
                                  state.data.timestep_index,
                                  smoothing_metric(state.recipe, state.data.noise is not None) == "hessian",
                                  state.options.show_progress)
        save_params(state.cache, "smoothing", fitted)
    alphas = {s.consumers[0].name: fitted.trace.get(f"smooth:{s.name}", {}).get("alpha") for s in found.sites}
    state.run_passes(SmoothThroughModulation(found.sites, fitted.smoothing, alphas))
    state.fit(fitted)
    state.note("smoothing", f"{len(found.sites)} input(s) smoothed, read by "
                            f"{sum(len(s.consumers) for s in found.sites)} layer(s)")
    for reason in sorted({k.reason for k in found.skipped}):
        names = [k.layer for k in found.skipped if k.reason == reason]
        state.note("smoothing", f"not smoothed ({len(names)}): {names[0]}{' ...' if len(names) > 1 else ''}: {reason}")


def rotate(state: CompileState) -> None:
    layers = state.analysis.layers
    state.reference_output = copy_graph_sharing_tensors(state.gm)   # the output reference: before rotating
    rotation = InsertHadamard({n: info for n, info in layers.items() if info.role in state.recipe.rotation.roles},
                              {n: info.name for n, info in layers.items()}, fuse=state.recipe.rotation.fuse)
    state.run_passes(rotation)
    state.reports.rotations = rotation.rotations


def shift_and_migrate(state: CompileState) -> None:
    """TaQ-DiT's shift (and migration) constants from per-timestep channel statistics, folded into the graph."""
    found = load_params(state.cache, "transforms")
    if found is None:
        found = calibrate_transforms(state.gm, state.annotations, state.recipe, state.data.flat,
                                     state.data.timestep_index, state.options.show_progress,
                                     state.options.distributed)
        save_params(state.cache, "transforms", found)
    passes = transform_passes(found)
    if passes:
        state.run_passes(*passes)
    state.fit(found)


def transform_passes(params: QuantParams) -> list:
    """The passes that put fitted shifts (and migration factors) in place: the shift first."""
    passes: list = [FoldShiftIntoBias(params.shifts)] if params.shifts else []
    if params.factors:
        passes.append(MigrateOutliers(params.factors))
    return passes


def calibrate(state: CompileState) -> None:
    """TQ-DiT's scale search (not cached: minutes), or the observers' ranges (cached)."""
    spec, data, progress = state.recipe.scale_search, state.data, state.options.show_progress
    dist = state.options.distributed
    if spec is not None:
        state.fit(search_scales(state.gm, state.annotations, state.plan, data.flat, spec, data.noise,
                                data.timestep_index, progress, dist))
        return
    found = load_params(state.cache, "observers")
    if found is None:
        found = observe_activations(state.gm, state.annotations, data.flat, progress, data.timestep_index, dist)
        save_params(state.cache, "observers", found)
    state.fit(found)


def reconstruct_blocks(state: CompileState) -> None:
    learned = reconstruct(state.gm, state.annotations, state.params.activations, state.data.flat,
                          state.recipe.reconstruction, state.options.show_progress, state.cache,
                          state.options.distributed)
    for unit, figures in learned.trace.items():
        state.reports.unit_seconds[unit] = {"total": figures["seconds"], "learning": figures["learning_seconds"]}
    if learned.factors:
        state.run_passes(UpdateMigrationFactors(learned.factors))
    state.fit(learned)


def choose_bits(state: CompileState) -> None:
    state.annotations, state.reports.allocation = choose_activation_bits(
        state.gm, state.annotations, state.params.activations, state.data.bound, state.recipe,
        state.analysis.sample_dependent, state.options.show_progress, state.captured.max_batch,
        state.options.distributed)


def distill_layers(state: CompileState) -> None:
    state.fit(distill(state.gm, state.annotations, state.params.activations, state.data.bound,
                      state.recipe.distillation, state.analysis.sample_dependent, state.options.show_progress,
                      state.data.noise, _connection(state), state.captured.max_batch,
                      state.options.distributed))


def _connection(state: CompileState) -> Connection | None:
    """BiDM+'s TES for the student, when the recipe connects timesteps."""
    spec = state.recipe.timestep_connections
    if spec is None:
        return None
    if state.data.schedule is None or state.data.noise is None:
        raise CalibrationError("timestep_connections trains on each input's neighbouring sampler step, rebuilt from "
                               "its noise and the training schedule: use dq.calibration.from_sampler(...), whose "
                               "sets carry both")
    return Connection(spec, block_sites(state.gm, state.analysis.sample_dependent), state.captured.sample_input,
                      state.captured.timestep_input, state.data.schedule)


def connect_timesteps(state: CompileState) -> None:
    """TES on what runs and on the reference, with the learned coefficients (measured before: the first-step
    rule of a connected model is the unconnected one)."""
    spec = state.recipe.timestep_connections
    sites = block_sites(state.float_graph, state.analysis.sample_dependent)
    for graph in {id(g): g for g in (state.quantized, state.lowered)}.values():
        ConnectTimesteps(sites, state.captured.timestep_input, spec.groups, spec.train_timesteps,
                         state.params.timestep_lambdas, spec.initial)(graph)
    state.note("timestep connections", f"{len(sites)} block output(s) mixed with the previous sampler step's "
                                       f"({spec.groups} coefficients each)")


def quantize(state: CompileState) -> None:
    """The float graph is kept (shared tensors) to measure against; layers and sites become ditq:: ops."""
    state.float_graph = copy_graph_sharing_tensors(state.gm)
    rewrite = [QuantizeLinears(state.params)]
    if state.plan.sites:
        rewrite = [QuantizeActivations(state.plan.sites, state.params.site_tables),
                   AttachTimeGroups(state.params.boundaries, state.captured.timestep_input), *rewrite]
    state.run_passes(*rewrite)
    state.quantized = state.gm
    state.reports.layers = layer_reports(state.quantized, state.annotations)


def lower_to_backend(state: CompileState) -> None:
    state.lowered, state.kernels = lower(state.options.backend, state.quantized)


def measure_error(state: CompileState) -> None:
    """SQNR of each layer and of the output against FP, on the calibration data; of the reference when the
    backend's kernels cannot run on this machine (a GPU backend compiled on a CPU)."""
    if not state.data.flat:
        return
    measured = state.lowered
    if not get_backend(state.options.backend).runs_here():
        measured = state.quantized
        state.note("measure", f"SQNR measured on the fake-quant reference: backend '{state.options.backend}' "
                              "runs on a GPU, and this machine has none")
    layer_sqnr, state.reports.output_sqnr_db = measure(state.float_graph, measured, state.data.flat,
                                                       state.reference_output)
    for report, source in zip(state.reports.layers, state.annotations, strict=True):
        report.sqnr_db = layer_sqnr.get(source)


def inspect_layers(state: CompileState) -> None:
    """Activation statistics for the HTML view; each layer's kernel, transformations and TQ-DiT site."""
    annotations, reports = state.annotations, state.reports
    reports.activation_stats = record_activation_stats(
        state.float_graph, list(annotations), state.data.flat, state.data.timestep_index,
        {name for name, a in annotations.items() if a.op == "conv2d"})
    placement = {r.layer: f"hadamard {r.placement}" for r in reports.rotations}
    for report, source in zip(reports.layers, annotations, strict=True):
        report.kernel = state.kernels.get(source, "reference")
        report.transforms = _transforms_of(state.float_graph, source) or placement.get(report.name, "")
    _report_sites(state)
    state.cache.finish()


def _transforms_of(gm, node_name: str) -> str:
    """The exact transformations in front of a layer: smoothing, TaQ-DiT's shift (+ migration)."""
    node = next(n for n in gm.graph.nodes if n.name == node_name)
    _, shift, factors, _ = channel_affine(gm, node)
    smoothed = any(entry.get("pass") == "smooth_through_modulation" for entry in meta.get(node).applied)
    shifted = "" if shift is None else "shift" if factors is None else "shift+migrate"
    return "+".join(t for t in ("smooth" if smoothed else "", shifted) if t)


def _report_sites(state: CompileState) -> None:
    """TQ-DiT's site reports and time-group labels; a layer whose input has an op of its own points to it
    and takes the layer SQNR the search measured with that quantizer."""
    plan, params, reports = state.plan, state.params, state.reports
    if state.recipe.scale_search is None or not plan.sites:
        return
    reports.sites = site_reports(plan.sites, params.site_tables, params.layer_sqnr)
    reports.time_groups = [] if params.boundaries is None else describe_groups(params.boundaries)
    for report, source in zip(reports.layers, state.annotations, strict=True):
        if any(s.standalone for s in plan.of(source)):
            report.input_site = next(r.quantizer for r in reports.sites if r.layer == report.name)
            report.sqnr_db = params.layer_sqnr[source]


DEFAULT_STAGES: tuple[Stage, ...] = (
    Stage("check", check_inputs, clock="capture"),
    Stage("capture", capture_graph),
    Stage("decompose", decompose_attention, lambda r: r.attention is not None, clock="capture"),
    Stage("analyse", analyse_graph, clock="capture"),
    Stage("annotate", annotate_layers, clock="capture"),
    Stage("bind", bind_calibration, clock="capture"),
    Stage("smooth", smooth, lambda r: r.smoothing is not None, clock="calibration"),
    Stage("rotate", rotate, lambda r: r.rotation is not None, clock="calibration"),
    Stage("transform", shift_and_migrate, lambda r: r.shift is not None, clock="calibration"),
    Stage("calibrate", calibrate, clock="calibration"),
    Stage("reconstruct", reconstruct_blocks, lambda r: r.reconstruction is not None, clock="reconstruction"),
    Stage("mixed precision", choose_bits, lambda r: r.mixed_precision is not None),
    Stage("distill", distill_layers, lambda r: r.distillation is not None, clock="distillation"),
    Stage("quantize", quantize, clock="rewrite"),
    Stage("lower", lower_to_backend, clock="rewrite"),
    Stage("measure", measure_error),
    Stage("inspect", inspect_layers),
    Stage("connect", connect_timesteps, lambda r: r.timestep_connections is not None, clock="rewrite"),
)


def with_stage(stages: Sequence[Stage], stage: Stage, *, after: str | None = None,
               before: str | None = None) -> tuple[Stage, ...]:
    """``stages`` with ``stage`` inserted after (or before) the stage of that name."""
    names = [s.name for s in stages]
    anchor = after if after is not None else before
    if (after is None) == (before is None) or anchor not in names:
        raise ValueError(f"with_stage: give exactly one of after= / before= naming a stage of {names}")
    if stage.name in names:
        raise ValueError(f"with_stage: a stage named {stage.name!r} is already in the list")
    index = names.index(anchor) + (1 if after is not None else 0)
    return (*stages[:index], stage, *stages[index:])



def run_stages(state: CompileState, stages: Sequence[Stage]) -> None:
    """Each stage the recipe enables, in order, timed into its clock; over several processes a failing stage is
    named with the rank it failed on."""
    group = state.options.distributed
    for stage in stages:
        if stage.enabled(state.recipe):
            started = time.perf_counter()
            with group.failure_named(stage.name):
                stage.run(state)
            state.stage_seconds[stage.column] = (state.stage_seconds.get(stage.column, 0.0)
                                                 + time.perf_counter() - started)


__all__ = ["CLOCKS", "DEFAULT_STAGES", "Stage", "run_stages", "transform_passes", "with_stage"]
