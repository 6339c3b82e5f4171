"""``compile(model, recipe)``: capture, analyse, annotate, calibrate, rewrite, lower, measure."""

from __future__ import annotations

import copy
import time
import warnings
from pathlib import Path
from typing import Any, Iterable

import torch
from torch import fx

from ditq_compiler.activation_sites import SitePlan, plan_sites
from ditq_compiler.annotate import LayerAnnotation, annotate
from ditq_compiler.calibration import as_batches, observe_activations
from ditq_compiler.calibration.cache import WorkCache, open_cache, pack, unpack
from ditq_compiler.calibration.channel_stats import calibrate_transforms, transform_passes
from ditq_compiler.calibration.reconstruct import apply_factors, reconstruct
from ditq_compiler.calibration.scale_search import SearchResult, check_search_inputs, noise_of, search_scales
from ditq_compiler.calibration.time_groups import describe_groups
from ditq_compiler.capture import CapturedModel, capture
from ditq_compiler.graph import UnsupportedLayerError, analyse, unsupported_layers
from ditq_compiler.inspection.activations import record_activation_stats
from ditq_compiler.inspection.summary import Summary
from ditq_compiler.provenance import Provenance, provenance_of
from ditq_compiler.pipeline import PassPipeline, copy_graph_sharing_tensors
from ditq_compiler.recipe import Recipe
from ditq_compiler.time_group_checks import check_time_group_calibration, check_time_group_sites
from ditq_compiler.report import (LayerReport, SiteReport, layer_reports, measure, rotation_table, site_reports,
                                  sites_table, summary_rows)
from ditq_compiler.passes.attach_time_groups import AttachTimeGroups
from ditq_compiler.passes.decompose_attention import DecomposeAttention
from ditq_compiler.passes.insert_hadamard import InsertHadamard, Rotation
from ditq_compiler.passes.migrate_outliers import channel_affine
from ditq_compiler.passes.quantize_activations import QuantizeActivations
from ditq_compiler.passes.quantize_linears import QuantizeLinears
from ditq_compiler.train import Allocation, choose_activation_bits, distill
from ditq_compiler import meta

BACKENDS = ("torch", "torch-int8")
# compile()'s stages in the order they run (``CompiledModel.stage_seconds`` keys, a subset of these)
STAGES = ("capture", "calibration", "reconstruction", "mixed precision", "distillation", "rewrite", "measure",
          "inspect")


class CompiledModel(torch.nn.Module):
    """A quantized denoiser: call it like the original model.

    Besides the graph it carries what ``save`` writes and ``ditq inspect`` shows: ``provenance``
    (FP size, model config, calibration seed, an example call), ``activation_stats`` (per layer,
    ``ditq_compiler.inspection.activations``) and, for a lowered backend, the reference graph.
    """

    provenance: Provenance = Provenance()
    activation_stats: dict = {}

    def __init__(self, graph_module: fx.GraphModule, captured: CapturedModel, recipe: Recipe,
                 layers: list[LayerReport], output_sqnr_db: float | None, backend: str,
                 stage_seconds: dict[str, float] | None = None, sites: list[SiteReport] | None = None,
                 time_groups: list[str] | None = None):
        super().__init__()
        self.sites = list(sites or [])              # TQ-DiT activation sites (regions, time groups)
        self.time_groups = list(time_groups or [])  # the timestep range of each time group
        self.graph_module = graph_module
        self.recipe = recipe
        self.layers = layers
        self.output_sqnr_db = output_sqnr_db
        self.backend = backend
        self.stage_seconds = dict(stage_seconds or {})
        self.resumed_from_cache: list[str] = []     # work an interrupted compile had finished
        self.unsupported: list = []                  # weighted ops left in float (graph.UnsupportedLayer)
        self.unit_seconds: dict[str, dict[str, float]] = {}   # phase:block -> {"total", "learning"} s (0: cached)
        self._captured = captured
        self.rotations: list[Rotation] = []           # RobuQ: where each rotation runs
        self.allocation: Allocation | None = None     # AMPN: chosen activation bits and sensitivities

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.graph_module(**self._captured.bind(args, kwargs))

    # ---- dtype casts are refused --------------------------------------------------------------
    _CAST_REFUSED = ("holds integer weight codes with their calibrated scales; casting it would silently "
                     "dequantize them or change the quantizers' arithmetic. Compile the float model again "
                     "for another precision, or export it (export_onnx) for a runtime that picks its own.")

    def _refuse_cast(self, what: str):
        raise TypeError(f"CompiledModel.{what}: a compiled {self._captured.model_class} {self._CAST_REFUSED}")

    def half(self):
        self._refuse_cast("half()")

    def bfloat16(self):
        self._refuse_cast("bfloat16()")

    def double(self):
        self._refuse_cast("double()")

    def type(self, dst_type):
        self._refuse_cast(f"type({dst_type})")

    def to(self, *args: Any, **kwargs: Any):
        """Moves to another device; a dtype change is refused (see ``half``).

        Parameters and buffers move as in any module; the captured graph also names the device it was
        exported on in some nodes' ``device=`` arguments (``arange``, ``_assert_tensor_metadata``), and
        those are rewritten to the new device so the graph runs there."""
        device, dtype, _, _ = torch._C._nn._parse_to(*args, **kwargs)
        if dtype is not None:
            self._refuse_cast(f"to({dtype})")
        moved = super().to(*args, **kwargs)
        if device is not None:
            _retarget_device(self.graph_module, device)
        return moved

    def cuda(self, device: Any = None):
        return self.to(torch.device("cuda", device) if isinstance(device, int) else device or "cuda")

    def cpu(self):
        return self.to("cpu")

    def summary(self) -> Summary:
        quantized = len(self.layers)
        total = sum(1 for n in self._captured_layers())
        sqnr = "n/a" if self.output_sqnr_db is None else f"{self.output_sqnr_db:.1f} dB"
        head = (f"{self._captured.model_class} compiled with recipe '{self.recipe.name}' "
                f"(backend {self.backend}): {quantized} of {total} linear/conv layers quantized; "
                f"output SQNR vs FP on the calibration data: {sqnr}")
        if self.stage_seconds:
            head += "\nstages: " + ", ".join(f"{k} {v:.1f} s" for k, v in self.stage_seconds.items())
        learned = [v["total"] for v in self.unit_seconds.values() if v["total"] > 0]
        if learned:
            head += (f"\nreconstruction: {len(self.unit_seconds)} block(s), "
                     f"median {sorted(learned)[len(learned) // 2]:.1f} s per block learned")
        if self.unsupported:
            head += (f"\nleft in float, no quantized lowering ({len(self.unsupported)}): " +
                     ", ".join(f"{u.name} (aten.{u.op})" for u in self.unsupported))
        if self.resumed_from_cache:
            head += "\nresumed an interrupted compile: " + ", ".join(self.resumed_from_cache) + " taken from the cache"
        if self.allocation is not None:
            head += (f"\nmixed precision (AMPN, sensitivity {self.allocation.sensitivity_from}): average activation "
                     f"bits {self.allocation.average_bits:.2f}")
        tail = []
        if self.sites:
            tail.append("activation sites:\n" + sites_table(self.sites, self.time_groups))
        if self.rotations:
            tail.append("Hadamard rotations:\n" + rotation_table(self.rotations))
        return Summary(head, *summary_rows(self.layers), tail="\n\n".join(tail))

    def _captured_layers(self):
        return [n for n in self.graph_module.graph.nodes
                if n.op in ("call_function", "call_module") and (meta.get(n).role is not None)]

    def print_readable(self, print_output: bool = True) -> str:
        return self.graph_module.print_readable(print_output=print_output)

    @property
    def reference_graph_module(self) -> fx.GraphModule:
        """The fake-quant reference graph (the one saved); ``graph_module`` itself for backend 'torch'."""
        reference = self.__dict__.get("_reference_graph")
        return self.graph_module if reference is None else reference

    def save(self, path: str | Path, progress: bool = False) -> Path:
        """Write a versioned artifact directory (``ditq_compiler.artifact``); ``dq.load`` reads it back."""
        from ditq_compiler.artifact import save
        return save(self, path, progress=progress)

    def plot(self, out_dir: str | Path, layers: Iterable[str] | None = None) -> list[Path]:
        """PNGs of each layer's activation range over timesteps, before and after the transformations."""
        from ditq_compiler.inspection.plot import plot_activations
        return plot_activations(self, out_dir, layers)

    def export_onnx(self, path: str | Path, target: str = "ort", **options: Any) -> Path:
        """Write an opset-21 Q/DQ ONNX model for ``target`` ("ort" or "tensorrt"); see ``backends/onnx.py``."""
        from ditq_compiler.backends.onnx import export_compiled
        return export_compiled(self, path, target, **options)


def compile(model: torch.nn.Module, recipe: Recipe | str | Path,
            calibration: Iterable[Any] | None = None, *, example_inputs: Any = None,
            backend: str = "torch", debug: bool = False, progress: bool = True,
            cache_dir: str | Path | bool | None = None, dynamic_shapes: dict | None = None,
            strict: bool = False) -> CompiledModel:
    """Quantize ``model`` as ``recipe`` says; ``model`` itself is never modified.

    ``calibration`` is an iterable of ``(args, kwargs)`` calls of the model. ``backend`` is
    ``"torch"`` (the fake-quant reference) or ``"torch-int8"`` (real int8 GEMMs where they are
    exact on this machine, the reference elsewhere; see ``ditq_compiler.backends.torch``).
    ``cache_dir``: where finished calibration work is kept until the compile completes, so an
    interrupted compile resumes (``ditq_compiler.calibration.cache``); None is
    ``$DITQ_CACHE_DIR`` or ``~/.cache/ditq-compiler``, False keeps nothing. ``dynamic_shapes``:
    dims besides the batch that may vary at run time (``ditq_compiler.capture.capture``).
    ``strict``: weight-carrying ops with no quantized lowering (conv1d/3d, transposed convs,
    matmuls with a weight) are an error listing them all; otherwise they stay in float and the
    summary lists them.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    recipe = recipe if isinstance(recipe, Recipe) else Recipe.load(recipe)
    clock = _StageClock()
    batches = as_batches(calibration)
    noise = noise_of(calibration)
    check_time_group_calibration(recipe, batches, None)
    check_search_inputs(recipe.scale_search, batches, noise)
    captured = capture(model, example_inputs if example_inputs is not None else (batches[0] if batches else None),
                       dynamic_shapes)
    gm = captured.graph_module
    if recipe.attention is not None:
        gm = PassPipeline([DecomposeAttention()], debug=debug)(gm).graph_module
    analysis = analyse(gm, captured.sample_input, captured.timestep_input)
    unsupported = unsupported_layers(gm)
    if strict and unsupported:
        raise UnsupportedLayerError(f"strict compile of {captured.model_class}: {len(unsupported)} layer(s) carry "
                                    "weights the compiler cannot quantize:\n  - " +
                                    "\n  - ".join(u.describe() for u in unsupported))
    annotations = annotate(gm, analysis, recipe)
    plan = plan_sites(gm, analysis, annotations, recipe)
    check_time_group_sites(recipe, plan, analysis, gm, captured.timestep_input, captured.model_class)
    inputs = [captured.bind(args, kwargs) for args, kwargs in batches]
    flat_batches = [_flat(call) for call in inputs]
    check_time_group_calibration(recipe, flat_batches, _timestep_index(captured), plan)
    cache = open_cache(cache_dir, dict(graph_code=gm.code, state=gm.state_dict(), recipe=recipe.to_dict(),
                                       batches=flat_batches, versions=_versions()))
    unrotated = copy_graph_sharing_tensors(gm) if recipe.rotation is not None else None
    clock.lap("capture")
    rotations = []
    if recipe.rotation is not None:
        rotate = InsertHadamard({n: info for n, info in analysis.layers.items() if info.role in recipe.rotation.roles},
                                {n: info.name for n, info in analysis.layers.items()}, fuse=recipe.rotation.fuse)
        gm, rotations = PassPipeline([rotate], debug=debug)(gm).graph_module, rotate.rotations
    gm, act_qparams, searched = _calibrate(gm, annotations, plan, recipe, flat_batches, noise,
                                           _timestep_index(captured), cache, debug, progress)
    clock.lap("calibration")
    weight_codes = None if searched is None else searched.weights
    unit_seconds = {}
    if recipe.reconstruction is not None:
        learned = reconstruct(gm, annotations, act_qparams, flat_batches, recipe.reconstruction, progress, cache)
        unit_seconds = {unit: {"total": total, "learning": learned.train_seconds.get(unit, 0.0)}
                        for unit, total in learned.seconds.items()}
        apply_factors(gm, learned.factors)
        act_qparams, weight_codes = {**act_qparams, **learned.activations}, learned.weights
        clock.lap("reconstruction")
    allocation = None
    if recipe.mixed_precision is not None:
        annotations, allocation = choose_activation_bits(gm, annotations, act_qparams, inputs, recipe,
                                                         analysis.sample_dependent, progress)
        clock.lap("mixed precision")
    token_clips, biases = {}, {}
    if recipe.distillation is not None:
        trained = distill(gm, annotations, act_qparams, inputs, recipe.distillation, analysis.sample_dependent,
                          progress)
        act_qparams, weight_codes = {**act_qparams, **trained.activations}, trained.weights
        token_clips, biases = trained.token_clips, trained.biases
        clock.lap("distillation")
    float_graph = copy_graph_sharing_tensors(gm)
    rewrite = [QuantizeLinears(act_qparams, weight_codes, token_clips, biases)]
    if plan.sites:
        rewrite = [QuantizeActivations(plan.sites, searched.tables),
                   AttachTimeGroups(searched.boundaries, captured.timestep_input), *rewrite]
    quantized = PassPipeline(rewrite, debug=debug)(gm).graph_module
    reports = layer_reports(quantized, annotations)
    reference = None if backend == "torch" else _copy_graph(quantized)
    lowered, kernels = _lower(quantized, backend)
    clock.lap("rewrite")
    layer_sqnr, output_sqnr = measure(float_graph, lowered, flat_batches, unrotated) if flat_batches else ({}, None)
    clock.lap("measure")
    activations = record_activation_stats(float_graph, list(annotations), flat_batches, _timestep_index(captured),
                                          {name for name, a in annotations.items() if a.op == "conv2d"})
    clock.lap("inspect")
    placement = {r.layer: f"hadamard {r.placement}" for r in rotations}
    for report, source in zip(reports, annotations, strict=True):
        report.kernel = kernels.get(source, "reference")
        report.sqnr_db = layer_sqnr.get(source)
        report.transforms = _transforms_of(float_graph, source) or placement.get(report.name, "")
    cache.finish()
    sites, groups = _site_summary(reports, annotations, plan, searched)
    compiled = CompiledModel(lowered, captured, recipe, reports, output_sqnr, backend, clock.seconds, sites,
                             groups)
    compiled.rotations, compiled.allocation = rotations, allocation
    compiled.resumed_from_cache = list(cache.loaded)
    compiled.unsupported = unsupported
    compiled.unit_seconds = unit_seconds
    compiled.provenance = provenance_of(model, calibration, batches, captured.bind)
    compiled.activation_stats = activations
    compiled.__dict__["_reference_graph"] = reference   # not a submodule: no second copy in state_dict()
    return compiled


def _calibrate(gm: fx.GraphModule, annotations: dict[str, LayerAnnotation], plan: SitePlan, recipe: Recipe,
               flat_batches: list[list[Any]], noise: Any, timestep_index: int | None, cache: WorkCache, debug: bool,
               progress: bool) -> tuple[fx.GraphModule, dict[str, tuple[torch.Tensor, torch.Tensor]],
                                        SearchResult | None]:
    """Shift/migration constants put in place, and every static input quantizer's (scale, zero point).

    With a ``scale_search`` section (TQ-DiT) the scales come from the Hessian-guided search, which also
    fixes the weights and every activation site's table (returned as the ``SearchResult``); it is not
    cached (minutes, not the hour a reconstruction takes). Otherwise the observers' ranges, taken from
    ``cache`` when an interrupted compile of the same inputs finished this stage.
    """
    finished = cache.load("calibration")
    if finished is not None:
        tensors, _ = finished
        shifts, factors = unpack("shift", tensors), unpack("factors", tensors)
    else:
        shifts, factors = calibrate_transforms(gm, annotations, recipe, flat_batches, timestep_index, progress)
    passes = transform_passes(shifts, factors)
    if passes:
        gm = PassPipeline(passes, debug=debug)(gm).graph_module
    if recipe.scale_search is not None:
        searched = search_scales(gm, annotations, plan, flat_batches, recipe.scale_search, noise, timestep_index,
                                 progress)
        return gm, searched.linear_input_qparams(plan), searched
    if finished is not None:
        scales, zero_points = unpack("act_scale", tensors), unpack("act_zero_point", tensors)
        return gm, {name: (scales[name], zero_points[name]) for name in scales}, None
    act_qparams = observe_activations(gm, annotations, flat_batches, progress, timestep_index)
    cache.save("calibration", {**pack("shift", shifts), **pack("factors", factors),
                               **pack("act_scale", {n: q[0] for n, q in act_qparams.items()}),
                               **pack("act_zero_point", {n: q[1] for n, q in act_qparams.items()})})
    return gm, act_qparams, None


def _versions() -> dict[str, str]:
    from ditq_compiler import __version__
    return {"ditq-compiler": __version__, "torch": torch.__version__}


def _site_summary(reports: list[LayerReport], annotations: dict[str, LayerAnnotation], plan: SitePlan,
                  searched: SearchResult | None) -> tuple[list[SiteReport], list[str]]:
    """The TQ-DiT site reports and time-group labels; layers whose input has an op of its own point to it
    and take the layer SQNR the search measured with that quantizer."""
    if searched is None or not plan.sites:
        return [], []
    sites = site_reports(plan.sites, searched.tables, searched.layer_sqnr)
    for report, source in zip(reports, annotations, strict=True):
        if any(s.standalone for s in plan.of(source)):
            report.input_site = next(r.quantizer for r in sites if r.layer == report.name)
            report.sqnr_db = searched.layer_sqnr[source]
    return sites, [] if searched.boundaries is None else describe_groups(searched.boundaries)


class _StageClock:
    """Wall time of each compile stage, for the summary."""

    def __init__(self):
        self.seconds: dict[str, float] = {}
        self._last = time.perf_counter()

    def lap(self, stage: str) -> None:
        assert stage in STAGES, f"unknown compile stage {stage!r}"
        now = time.perf_counter()
        self.seconds[stage] = self.seconds.get(stage, 0.0) + now - self._last
        self._last = now


def _timestep_index(captured: CapturedModel) -> int | None:
    names = [n.name for n in captured.graph_module.graph.nodes if n.op == "placeholder"]
    return names.index(captured.timestep_input) if captured.timestep_input in names else None


def _transforms_of(gm: fx.GraphModule, node_name: str) -> str:
    _, shift, factors, _ = channel_affine(gm, next(n for n in gm.graph.nodes if n.name == node_name))
    return "" if shift is None else "shift" if factors is None else "shift+migrate"


def _lower(gm: fx.GraphModule, backend: str) -> tuple[fx.GraphModule, dict[str, str]]:
    if backend == "torch":
        return gm, {}
    from ditq_compiler.backends.torch import lower_int8
    return lower_int8(gm)


def _copy_graph(gm: fx.GraphModule) -> fx.GraphModule:
    with warnings.catch_warnings():  # torch's own pytree deprecation notice on deepcopy
        warnings.filterwarnings("ignore", message=".*treespec, LeafSpec.*", category=FutureWarning)
        return copy.deepcopy(gm)


def _flat(inputs: dict[str, Any]) -> list[Any]:
    return torch.utils._pytree.tree_leaves(((), inputs))


def _retarget_device(gm: fx.GraphModule, device: torch.device) -> None:
    """Point every ``device=`` argument of ``gm``'s nodes at ``device`` (see ``CompiledModel.to``)."""
    changed = False
    for node in gm.graph.nodes:
        if isinstance(node.kwargs.get("device"), (torch.device, str)) and torch.device(node.kwargs["device"]) != device:
            node.update_kwarg("device", device)
            changed = True
    if changed:
        gm.recompile()


__all__ = ["STAGES", "CompiledModel", "LayerAnnotation", "compile"]

