"""``compile(model, recipe)``: capture, analyse, annotate, calibrate, rewrite, lower, measure."""

from __future__ import annotations

import copy
import warnings
from pathlib import Path
from typing import Any, Iterable

import torch
from torch import fx

from ditq_compiler.annotate import LayerAnnotation, annotate
from ditq_compiler.calibration import as_batches, observe_activations
from ditq_compiler.capture import CapturedModel, capture
from ditq_compiler.graph import analyse
from ditq_compiler.pipeline import PassPipeline
from ditq_compiler.recipe import Recipe
from ditq_compiler.report import LayerReport, layer_reports, measure, summary_table
from ditq_compiler.passes.quantize_linears import QuantizeLinears

BACKENDS = ("torch", "torch-int8")


class CompiledModel(torch.nn.Module):
    """A quantized denoiser: call it like the original model."""

    def __init__(self, graph_module: fx.GraphModule, captured: CapturedModel, recipe: Recipe,
                 layers: list[LayerReport], output_sqnr_db: float | None, backend: str):
        super().__init__()
        self.graph_module = graph_module
        self.recipe = recipe
        self.layers = layers
        self.output_sqnr_db = output_sqnr_db
        self.backend = backend
        self._captured = captured

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.graph_module(**self._captured.bind(args, kwargs))

    def summary(self) -> str:
        quantized = len(self.layers)
        total = sum(1 for n in self._captured_layers())
        sqnr = "n/a" if self.output_sqnr_db is None else f"{self.output_sqnr_db:.1f} dB"
        head = (f"{self._captured.model_class} compiled with recipe '{self.recipe.name}' "
                f"(backend {self.backend}): {quantized} of {total} linear/conv layers quantized; "
                f"output SQNR vs FP on the calibration data: {sqnr}")
        return head + "\n" + summary_table(self.layers)

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
    batches = as_batches(calibration)
    captured = capture(model, example_inputs if example_inputs is not None else (batches[0] if batches else None))
    analysis = analyse(captured.graph_module, captured.sample_input, captured.timestep_input)
    annotations = annotate(captured.graph_module, analysis, recipe)
    flat_batches = [_flat(captured.bind(args, kwargs)) for args, kwargs in batches]
    act_qparams = observe_activations(captured.graph_module, annotations, flat_batches, progress)
    float_graph = _copy_graph(captured.graph_module)
    quantized = PassPipeline([QuantizeLinears(act_qparams)], debug=debug)(captured.graph_module).graph_module
    reports = layer_reports(quantized, annotations)
    lowered, kernels = _lower(quantized, backend)
    layer_sqnr, output_sqnr = measure(float_graph, lowered, flat_batches) if flat_batches else ({}, None)
    for report, source in zip(reports, annotations, strict=True):
        report.kernel = kernels.get(source, "reference")
        report.sqnr_db = layer_sqnr.get(source)
    return CompiledModel(lowered, captured, recipe, reports, output_sqnr, backend)


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
