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

from ditq_compiler.calibration.batches import Batch, CalibrationError
from ditq_compiler.calibration.params import QuantParams
from ditq_compiler.graph import module_path
from ditq_compiler.meta import LayerAnnotation
from ditq_compiler.quant import make_observer


class InputObservingInterpreter(fx.Interpreter):
    """Runs the graph, handing the first input of each node in ``on_input`` to its callback."""

    def __init__(self, gm: fx.GraphModule, on_input: Mapping[str, Callable[[Tensor], None]], batch_index: int,
                 timesteps: Tensor | None = None):
        super().__init__(gm)
        self.on_input = on_input
        self.batch_index = batch_index
        self.timesteps = timesteps

    def run_node(self, node: fx.Node) -> Any:
        if node.name in self.on_input:
            self.on_input[node.name](self.env[node.args[0]])
        out = super().run_node(node)
        if isinstance(out, Tensor) and out.is_floating_point() and not torch.isfinite(out).all():
            bad = ~torch.isfinite(out)
            raise CalibrationError(
                f"calibration batch {self.batch_index}{self._where(bad)}: node '{node.name}' ({node.target}) in "
                f"module '{module_path(node)}' produced {int(bad.sum())} NaN/Inf values")
        return out

    def _where(self, bad: Tensor) -> str:
        """', sample i (timestep t)' for the first sample of the batch with a bad value, when known."""
        t = self.timesteps
        if t is None or t.dim() != 1 or bad.dim() == 0 or bad.shape[0] != t.shape[0]:
            return ""
        row = int(bad.reshape(bad.shape[0], -1).any(1).nonzero()[0])
        return f", sample {row} (timestep {t[row].item():g})"


def observe_activations(gm: fx.GraphModule, annotations: Mapping[str, LayerAnnotation],
                        batches: list[list[Any]], progress: bool = True,
                        timestep_index: int | None = None) -> QuantParams:
    """(scale, zero_point) of the input quantizer of every layer with static activation quantization
    (``QuantParams.activations``).

    A layer whose input was exactly zero on every calibration sample has no range to calibrate,
    and a scale that comes out non-positive or non-finite is unusable: both are errors naming
    the layer, before anything is rewritten.
    """
    static = {name: a for name, a in annotations.items()
              if a.activations is not None and a.activations.granularity != "token"}
    if not static:
        return QuantParams()
    if not batches:
        layers = ", ".join(a.name for a in list(static.values())[:3])
        raise CalibrationError(f"the recipe quantizes input activations (e.g. {layers}) but the calibration "
                               "set is empty: pass calibration=[(args, kwargs), ...] with at least one batch")
    observers = {name: make_observer(a.activations) for name, a in static.items()}
    peaks = {name: 0.0 for name in static}

    def watch(name: str) -> Callable[[Tensor], None]:
        def update(x: Tensor) -> None:
            peaks[name] = max(peaks[name], float(x.detach().abs().max()) if x.numel() else 0.0)
            observers[name].update(x)
        return update

    timesteps: list[float] = []
    with torch.no_grad():
        for i, flat in enumerate(tqdm(batches, desc="calibrate", unit="batch", disable=not progress)):
            t = flat[timestep_index] if timestep_index is not None else None
            t = torch.as_tensor(t).reshape(-1) if t is not None else None
            if t is not None:
                timesteps += t.tolist()
            InputObservingInterpreter(gm, {name: watch(name) for name in observers}, i, t).run(*flat)
    span = f" over timesteps {min(timesteps):g}..{max(timesteps):g}" if timesteps else ""
    qparams = {}
    for name, observer in observers.items():
        layer = static[name].name
        if peaks[name] == 0.0:
            raise CalibrationError(
                f"layer '{layer}' (node {name}): its input activation was exactly zero on every calibration sample "
                f"({len(batches)} batches{span}), so its activation scale cannot be calibrated; calibrate with data "
                "that reaches it, or keep it in float with an override (activations: false)")
        scale, zero_point = observer.compute()
        if not bool(torch.isfinite(scale).all()) or bool((scale <= 0).any()):
            raise CalibrationError(f"layer '{layer}' (node {name}): calibration gave the activation scale "
                                   f"{scale.flatten()[:4].tolist()}, which is not a positive finite number")
        qparams[name] = (scale, zero_point)
    return QuantParams(activations=qparams)


__all__ = ["Batch", "InputObservingInterpreter", "observe_activations"]
