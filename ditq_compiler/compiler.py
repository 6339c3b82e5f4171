"""``compile(model, recipe)``: capture, analyse, annotate, calibrate, rewrite, lower, measure."""

from __future__ import annotations

import copy
import time
import warnings
from pathlib import Path
from typing import Any, Iterable

import torch
from torch import fx

from ditq_compiler.annotate import LayerAnnotation, annotate
from ditq_compiler.calibration import as_batches, observe_activations
from ditq_compiler.calibration.channel_stats import plan_transforms
from ditq_compiler.calibration.reconstruct import apply_factors, reconstruct
from ditq_compiler.capture import CapturedModel, capture
from ditq_compiler.graph import analyse
from ditq_compiler.pipeline import PassPipeline
from ditq_compiler.recipe import Recipe
from ditq_compiler.report import LayerReport, layer_reports, measure, rotation_table, summary_table
from ditq_compiler.passes.insert_hadamard import InsertHadamard, Rotation
from ditq_compiler.passes.migrate_outliers import channel_affine
from ditq_compiler.passes.quantize_linears import QuantizeLinears
from ditq_compiler.train import Allocation, choose_activation_bits, distill

BACKENDS = ("torch", "torch-int8")


class CompiledModel(torch.nn.Module):
    """A quantized denoiser: call it like the original model."""

    def __init__(self, graph_module: fx.GraphModule, captured: CapturedModel, recipe: Recipe,
                 layers: list[LayerReport], output_sqnr_db: float | None, backend: str,
                 stage_seconds: dict[str, float] | None = None):
        super().__init__()
        self.graph_module = graph_module
        self.recipe = recipe
        self.layers = layers
        self.output_sqnr_db = output_sqnr_db
        self.backend = backend
        self.stage_seconds = dict(stage_seconds or {})
        self._captured = captured
        self.rotations: list[Rotation] = []           # RobuQ: where each rotation runs
        self.allocation: Allocation | None = None     # AMPN: chosen activation bits and sensitivities

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.graph_module(**self._captured.bind(args, kwargs))

    def summary(self) -> str:
        quantized = len(self.layers)
        total = sum(1 for n in self._captured_layers())
        sqnr = "n/a" if self.output_sqnr_db is None else f"{self.output_sqnr_db:.1f} dB"
        head = (f"{self._captured.model_class} compiled with recipe '{self.recipe.name}' "
                f"(backend {self.backend}): {quantized} of {total} linear/conv layers quantized; "
                f"output SQNR vs FP on the calibration data: {sqnr}")
        if self.stage_seconds:
            head += "\nstages: " + ", ".join(f"{k} {v:.1f} s" for k, v in self.stage_seconds.items())
        if self.allocation is not None:
            head += (f"\nmixed precision (AMPN, sensitivity {self.allocation.sensitivity_from}): average activation "
                     f"bits {self.allocation.average_bits:.2f}")
        text = head + "\n" + summary_table(self.layers)
        if self.rotations:
            text += "\n\nHadamard rotations:\n" + rotation_table(self.rotations)
        return text

    def _captured_layers(self):
        return [n for n in self.graph_module.graph.nodes
                if n.op in ("call_function", "call_module") and ("ditq_role" in n.meta)]

    def print_readable(self, print_output: bool = True) -> str:
        return self.graph_module.print_readable(print_output=print_output)


def compile(model: torch.nn.Module, recipe: Recipe | str | Path,
            calibration: Iterable[Any] | None = None, *, example_inputs: Any = None,
            backend: str = "torch", debug: bool = False, progress: bool = True) -> CompiledModel:
    """Quantize ``model`` as ``recipe`` says; ``model`` itself is never modified.

    ``calibration`` is an iterable of ``(args, kwargs)`` calls of the model. ``backend`` is
    ``"torch"`` (the fake-quant reference) or ``"torch-int8"`` (real int8 GEMMs where they are
    exact on this machine, the reference elsewhere; see ``ditq_compiler.backends.torch``).
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    recipe = recipe if isinstance(recipe, Recipe) else Recipe.load(recipe)
    clock = _StageClock()
    batches = as_batches(calibration)
    captured = capture(model, example_inputs if example_inputs is not None else (batches[0] if batches else None))
    gm = captured.graph_module
    analysis = analyse(gm, captured.sample_input, captured.timestep_input)
    annotations = annotate(gm, analysis, recipe)
    inputs = [captured.bind(args, kwargs) for args, kwargs in batches]
    flat_batches = [_flat(call) for call in inputs]
    reference = _copy_graph(gm) if recipe.rotation is not None else None
    clock.lap("capture")
    rotations = []
    if recipe.rotation is not None:
        rotate = InsertHadamard({n: info for n, info in analysis.layers.items() if info.role in recipe.rotation.roles},
                                {n: info.name for n, info in analysis.layers.items()}, fuse=recipe.rotation.fuse)
        gm, rotations = PassPipeline([rotate], debug=debug)(gm).graph_module, rotate.rotations
    transforms = plan_transforms(gm, annotations, recipe, flat_batches, _timestep_index(captured), progress)
    if transforms:
        gm = PassPipeline(transforms, debug=debug)(gm).graph_module
    act_qparams = observe_activations(gm, annotations, flat_batches, progress)
    clock.lap("calibration")
    weight_codes = None
    if recipe.reconstruction is not None:
        learned = reconstruct(gm, annotations, act_qparams, flat_batches, recipe.reconstruction, progress)
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
    float_graph = _copy_graph(gm)
    quantized = PassPipeline([QuantizeLinears(act_qparams, weight_codes, token_clips, biases)],
                             debug=debug)(gm).graph_module
    reports = layer_reports(quantized, annotations)
    lowered, kernels = _lower(quantized, backend)
    clock.lap("rewrite")
    layer_sqnr, output_sqnr = measure(float_graph, lowered, flat_batches, reference) if flat_batches else ({}, None)
    clock.lap("measure")
    placement = {r.layer: f"hadamard {r.placement}" for r in rotations}
    for report, source in zip(reports, annotations, strict=True):
        report.kernel = kernels.get(source, "reference")
        report.sqnr_db = layer_sqnr.get(source)
        report.transforms = _transforms_of(float_graph, source) or placement.get(report.name, "")
    compiled = CompiledModel(lowered, captured, recipe, reports, output_sqnr, backend, clock.seconds)
    compiled.rotations, compiled.allocation = rotations, allocation
    return compiled


class _StageClock:
    """Wall time of each compile stage, for the summary."""

    def __init__(self):
        self.seconds: dict[str, float] = {}
        self._last = time.perf_counter()

    def lap(self, stage: str) -> None:
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


__all__ = ["CompiledModel", "LayerAnnotation", "compile"]
