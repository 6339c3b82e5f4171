"""Run the float graph on calibration batches and fit each quantized layer's input quantizer.

An ``fx.Interpreter`` runs the captured float graph; before each annotated layer executes,
its input activation is handed to that layer's observer (min-max, percentile or MSE search,
``ditq_compiler.quant.observers``). Every floating-point value computed is checked: the first
node that produces NaN or Inf stops calibration with its name, module and batch index.

Over several processes (``ditq_compiler.distributed``) each runs the graph on its shard of the batches
and summarises every update (``Observer.part``); the summaries are exchanged and every process folds all
of them in batch order (``Observer.fold``), so the ranges are bitwise those of one process. A sampled
observer (percentile, MSE) then knows which of its own columns end in the sample; columns it did not
keep (an update larger than a sample takes from it) are read in a second run of those batches, and the
processes put their columns together (``Observer.settle``).
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import torch
from torch import Tensor, fx
from tqdm.auto import tqdm

from ditq_compiler.calibration.batches import Batch, CalibrationError
from ditq_compiler.calibration.params import QuantParams
from ditq_compiler.distributed import SINGLE, Distributed
from ditq_compiler.graph import module_path
from ditq_compiler.meta import LayerAnnotation
from ditq_compiler.quant import make_observer
from ditq_compiler.quant.observers import Observer, rows_per_qparam


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
                        timestep_index: int | None = None, dist: Distributed = SINGLE) -> QuantParams:
    """(scale, zero_point) of the input quantizer of every layer with static activation quantization
    (``QuantParams.activations``).

    A layer whose input was exactly zero on every calibration sample has no range to calibrate,
    and a scale that comes out non-positive or non-finite is unusable: both are errors naming
    the layer, before anything is rewritten. ``dist``: this process's shard of the batches (module doc).
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

    if dist.active:
        peaks = _observe_sharded(gm, observers, batches, progress, timestep_index, dist)
    else:
        with torch.no_grad():
            for i, flat in enumerate(tqdm(batches, desc="calibrate", unit="batch", disable=not progress)):
                _run(gm, {name: watch(name) for name in observers}, i, flat, timestep_index)
    timesteps = [] if timestep_index is None else [
        v for flat in batches for v in torch.as_tensor(flat[timestep_index]).reshape(-1).tolist()]
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


def _run(gm: fx.GraphModule, callbacks: Mapping[str, Callable[[Tensor], None]], index: int, flat: list[Any],
         timestep_index: int | None) -> None:
    """Batch ``index`` through the graph, its layers' inputs handed to ``callbacks``."""
    t = flat[timestep_index] if timestep_index is not None else None
    InputObservingInterpreter(gm, callbacks, index, torch.as_tensor(t).reshape(-1) if t is not None else None
                              ).run(*flat)


def _observe_sharded(gm: fx.GraphModule, observers: Mapping[str, Observer], batches: list[list[Any]],
                     progress: bool, timestep_index: int | None, dist: Distributed) -> dict[str, float]:
    """Fold this rank's shard of the batches and every other rank's into ``observers`` (module doc); returns
    each layer's largest |input| over all batches."""
    mine = dist.shard(len(batches))
    parts: dict[str, dict[int, Any]] = {name: {} for name in observers}
    with torch.no_grad():
        for i in tqdm(mine, desc="calibrate", unit="batch", disable=not progress):
            callbacks = {name: (lambda x, name=name, i=i: parts[name].__setitem__(i, observers[name].part(x)))
                         for name in observers}
            _run(gm, callbacks, i, batches[i], timestep_index)
    everyone = dist.gather({name: {i: p.light() for i, p in found.items()} for name, found in parts.items()})
    for name, observer in observers.items():
        observer.fold([rank_parts[name][i] for rank_parts in everyone for i in sorted(rank_parts[name])])
    _settle_samples(gm, observers, parts, batches, mine, timestep_index, dist)
    peaks = {name: max(float(p.row_max.abs().max().clamp_min(p.row_min.abs().max())) for p in found.values())
             if found else 0.0 for name, found in parts.items()}
    return {name: float(dist.maximum(torch.tensor(peak, dtype=torch.float64))) for name, peak in peaks.items()}


def _settle_samples(gm: fx.GraphModule, observers: Mapping[str, Observer], parts: Mapping[str, dict[int, Any]],
                    batches: list[list[Any]], mine: range, timestep_index: int | None, dist: Distributed) -> None:
    """The sampled observers' samples: the columns of this rank's updates that end in them, from the parts
    where they were kept, else from a second run of those batches."""
    sampled = {name: o for name, o in observers.items() if hasattr(o, "settle")}
    needed = {name: o.columns_needed(range(mine.start, mine.stop)) for name, o in sampled.items()}
    columns: dict[str, dict[int, Tensor]] = {name: {} for name in sampled}
    rerun: set[int] = set()
    for name in sampled:
        for i, index in needed[name].items():
            kept = parts[name][i].columns
            if kept is not None:
                columns[name][i] = kept[:, index]
            elif len(index):
                rerun.add(i)
    with torch.no_grad():
        for i in sorted(rerun):
            def take(x: Tensor, name: str, i: int = i) -> None:
                if parts[name][i].columns is None:
                    rows, _ = rows_per_qparam(x.detach().to(torch.float32), sampled[name].spec)
                    columns[name][i] = rows[:, needed[name][i].to(rows.device)]
            _run(gm, {name: (lambda x, name=name: take(x, name)) for name in sampled}, i, batches[i], timestep_index)
    for name, observer in sampled.items():
        observer.settle(columns[name], dist)


__all__ = ["Batch", "InputObservingInterpreter", "observe_activations"]
