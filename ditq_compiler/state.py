"""CompileState: the one object the compile stages read and write.

``compile()`` makes a ``CompileState`` from the user's model, recipe, calibration data and options,
runs the stages over it in order (``ditq_compiler.stages``), and turns it into a ``CompileRecord``.
A stage reads what earlier stages put here and adds its own part:

    captured        CapturedModel: the exported graph and how to call it       capture
    gm              the graph being rewritten (exact transformations first)    capture, then rewriting stages
    analysis        roles, activation sites, timestep dependence               analyse
    annotations     the recipe's decision for each quantized layer             annotate (mixed precision)
    plan            TQ-DiT's activation sites                                  annotate
    data            CalibrationData (bound to the graph's inputs)              bind
    params          QuantParams fitted so far (merged, newest last)            calibration stages
    float_graph     the float graph the quantized one is measured against      quantize
    reference_output the graph whose output is the reference (before rotations) rotate
    quantized       the fake-quant reference graph                             quantize
    lowered, kernels what runs on the chosen backend, and each layer's kernel  lower
    reports         everything the summary shows                               every stage
    stage_seconds   wall time per summary column                               compile()'s loop
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import fx

from ditq_compiler.activation_sites import SitePlan
from ditq_compiler.calibration.cache import WorkCache
from ditq_compiler.calibration.data import CalibrationData
from ditq_compiler.calibration.params import QuantParams
from ditq_compiler.capture import CapturedModel
from ditq_compiler.distributed import SINGLE, Distributed
from ditq_compiler.graph import GraphAnalysis
from ditq_compiler.meta import LayerAnnotation
from ditq_compiler.pipeline import PassPipeline
from ditq_compiler.provenance import provenance_of
from ditq_compiler.recipe import Recipe
from ditq_compiler.records import CompileRecord, Reports, StageNote
from ditq_compiler.trajectory import state_inputs, stateless_inputs


@dataclass(frozen=True)
class CompileOptions:
    """``compile()``'s keyword arguments (see its docstring)."""

    backend: str = "torch"
    example_inputs: Any = None
    debug: bool = False
    progress: bool = True
    cache_dir: str | Path | bool | None = None
    dynamic_shapes: dict | None = None
    strict: bool = False
    distributed: Distributed = SINGLE    # this process's rank and share of the work (``distributed.py``)

    @property
    def show_progress(self) -> bool:
        """Progress bars: asked for, and this is the first rank (the others would draw the same bars)."""
        return self.progress and self.distributed.is_main


@dataclass
class CompileState:
    model: torch.nn.Module          # the user's model: read, never modified
    recipe: Recipe
    data: CalibrationData
    options: CompileOptions = field(default_factory=CompileOptions)
    captured: CapturedModel | None = None
    gm: fx.GraphModule | None = None
    analysis: GraphAnalysis | None = None
    annotations: dict[str, LayerAnnotation] = field(default_factory=dict)
    plan: SitePlan = field(default_factory=SitePlan)
    params: QuantParams = field(default_factory=QuantParams)
    cache: WorkCache = field(default_factory=lambda: WorkCache(None, ""))
    float_graph: fx.GraphModule | None = None
    reference_output: fx.GraphModule | None = None
    quantized: fx.GraphModule | None = None
    lowered: fx.GraphModule | None = None
    kernels: dict[str, str] = field(default_factory=dict)
    reports: Reports = field(default_factory=Reports)
    stage_seconds: dict[str, float] = field(default_factory=dict)

    # ---- helpers for stages --------------------------------------------------------------------
    def run_passes(self, *passes: Any) -> None:
        """Rewrite ``gm`` with ``passes`` (verified between passes in debug mode)."""
        self.gm = PassPipeline(list(passes), debug=self.options.debug)(self.gm).graph_module

    def fit(self, params: QuantParams) -> None:
        """Lay newly fitted parameters over the ones fitted before (``QuantParams.merged``)."""
        self.params = self.params.merged(params)

    def note(self, stage: str, text: str) -> None:
        """A line for the summary's head."""
        self.reports.notes.append(StageNote(stage, text))

    def record(self) -> CompileRecord:
        """The finished compile, as the record a ``CompiledModel`` is built from."""
        lowered = self.lowered if self.lowered is not None else self.quantized
        provenance = provenance_of(self.model, self.data.source, self.data.calls, self.captured.bind,
                                   self.captured.call_plan.batched)
        states = state_inputs(self.quantized)
        if states and provenance.example_inputs is not None:   # the saved example call fills the state inputs too
            batch = len(provenance.example_inputs[self.captured.timestep_input])
            provenance.example_inputs.update(stateless_inputs(states, batch))
        return CompileRecord(graph_module=lowered, captured=self.captured, recipe=self.recipe,
                             backend=self.options.backend,
                             reference_graph=None if lowered is self.quantized else self.quantized,
                             reports=self.reports, stage_seconds=dict(self.stage_seconds),
                             resumed_from_cache=list(self.cache.loaded),
                             world_size=self.options.distributed.world_size, provenance=provenance)


__all__ = ["CompileOptions", "CompileState"]
