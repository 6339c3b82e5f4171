"""Run the float graph on calibration batches and fit each quantized layer's input quantizer.

An ``fx.Interpreter`` runs the captured float graph; before each annotated layer executes,
its input activation is handed to that layer's observer (min-max, percentile or MSE search,
``ditq_compiler.quant.observers``). Every floating-point value computed is checked: the first
node that produces NaN or Inf stops calibration with its name, module and batch index.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import torch
from torch import Tensor, fx
from tqdm.auto import tqdm

from ditq_compiler.annotate import LayerAnnotation
from ditq_compiler.calibration.batches import Batch, CalibrationError
from ditq_compiler.graph import module_path
from ditq_compiler.quant import make_observer


class InputObservingInterpreter(fx.Interpreter):
    """Runs the graph, handing the first input of each node in ``on_input`` to its callback."""

    def __init__(self, gm: fx.GraphModule, on_input: Mapping[str, Callable[[Tensor], None]], batch_index: int):
        super().__init__(gm)
        self.on_input = on_input
        self.batch_index = batch_index

    def run_node(self, node: fx.Node) -> Any:
        if node.name in self.on_input:
            self.on_input[node.name](self.env[node.args[0]])
        out = super().run_node(node)
        if isinstance(out, Tensor) and out.is_floating_point() and not torch.isfinite(out).all():
            bad = int((~torch.isfinite(out)).sum())
            raise CalibrationError(
                f"calibration batch {self.batch_index}: node '{node.name}' ({node.target}) in module "
                f"'{module_path(node)}' produced {bad} NaN/Inf values")
        return out


def observe_activations(gm: fx.GraphModule, annotations: Mapping[str, LayerAnnotation],
                        batches: list[list[Any]], progress: bool = True) -> dict[str, tuple[Tensor, Tensor]]:
    """(scale, zero_point) of the input quantizer of every layer with static activation quantization."""
    static = {name: a for name, a in annotations.items()
              if a.activations is not None and a.activations.granularity != "token"}
    if not static:
        return {}
    if not batches:
        layers = ", ".join(a.name for a in list(static.values())[:3])
        raise CalibrationError(f"the recipe quantizes input activations (e.g. {layers}) but the calibration "
                               "set is empty: pass calibration=[(args, kwargs), ...] with at least one batch")
    observers = {name: make_observer(a.activations) for name, a in static.items()}
    with torch.no_grad():
        for i, flat in enumerate(tqdm(batches, desc="calibrate", unit="batch", disable=not progress)):
            InputObservingInterpreter(gm, {name: obs.update for name, obs in observers.items()}, i).run(*flat)
    return {name: obs.compute() for name, obs in observers.items()}


__all__ = ["Batch", "InputObservingInterpreter", "observe_activations"]
