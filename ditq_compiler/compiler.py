"""``compile(model, recipe)``: the declared stages (``ditq_compiler.stages``) run over one ``CompileState``."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch

from ditq_compiler import lora as lora_module
from ditq_compiler.backends.registry import get_backend
from ditq_compiler.calibration.data import CalibrationData
from ditq_compiler.compiled import CompiledModel
from ditq_compiler.distributed import Distributed, model_device, resolve
from ditq_compiler.recipe import Recipe
from ditq_compiler.stages import CLOCKS, DEFAULT_STAGES, Stage
from ditq_compiler.state import CompileOptions, CompileState

STAGES = CLOCKS   # the summary's time columns (``CompiledModel.stage_seconds`` keys), in compile order


def compile(model: torch.nn.Module, recipe: Recipe | str | Path, calibration: Iterable[Any] | None = None, *,
            example_inputs: Any = None, backend: str = "torch", debug: bool = False, progress: bool = True,
            cache_dir: str | Path | bool | None = None, dynamic_shapes: dict | None = None, strict: bool = False,
            stages: Sequence[Stage] = DEFAULT_STAGES, distributed: bool | Distributed | None = None,
            lora: Any = None, lora_mode: str = "fuse", lora_scale: float = 1.0) -> CompiledModel:
    """Quantize ``model`` as ``recipe`` says; ``model`` itself is never modified.

    ``calibration``: calls of the model, ``(args, kwargs)`` pairs (``dq.calibration.from_sampler`` makes
    them from the model's own sampler). ``backend``: ``"torch"`` (the fake-quant reference), ``"torch-int8"``
    (real int8 GEMMs where they are exact) or another registered backend (``backends.registry``).
    ``cache_dir``: where finished calibration work is kept until the compile completes, so an interrupted
    compile resumes (None: ``$DITQ_CACHE_DIR`` or ``~/.cache/ditq-compiler``; False: nothing kept).
    ``dynamic_shapes``: dims besides the batch that may vary at run time (``capture.capture``). ``strict``:
    weight-carrying ops with no quantized lowering are an error listing them (else they stay in float and
    the summary lists them), and so is a recipe override that matches no layer (else a ``RecipeWarning``).
    ``stages``: the stage list to run (``stages.with_stage`` adds one).
    ``distributed``: spread the calibration over the processes of a ``torch.distributed`` group, every one
    of them calling ``compile`` with the same arguments (``ditq_compiler.distributed``; ``torchrun``
    starts them): True (the group is initialised from torchrun's environment if it is not yet), None (when
    a group of several processes is initialised) or False (this process alone). Every rank returns the
    same model; save it from every rank (rank 0 writes, the others wait for it).
    ``lora``: a LoRA adapter (a safetensors file, a state dict or ``dq.lora.load(...)``), ``lora_mode``
    ``"fuse"`` (into the weights, then quantized) or ``"branch"`` (a float ``B (A x)`` beside each quantized
    linear, swappable with ``dq.lora.swap`` without recalibrating); see ``ditq_compiler.lora``.
    """
    get_backend(backend)                                     # an unknown name fails before any work
    adapter = None
    if lora is not None:
        if lora_mode not in lora_module.MODES:
            raise ValueError(f"lora_mode={lora_mode!r}: expected one of {lora_module.MODES}")
        adapter = lora_module.load(lora, lora_scale)
        lora_module.check(model, adapter)
        if lora_mode == "fuse":
            model = lora_module.fuse(model, adapter)
    group = resolve(distributed, model_device(model))
    state = CompileState(model, recipe if isinstance(recipe, Recipe) else Recipe.load(recipe),
                         CalibrationData.of(calibration),
                         CompileOptions(backend, example_inputs, debug, progress, cache_dir, dynamic_shapes, strict,
                                        group))
    try:
        for stage in stages:
            if stage.enabled(state.recipe):
                started = time.perf_counter()
                with group.failure_named(stage.name):
                    stage.run(state)
                clock = stage.column
                state.stage_seconds[clock] = state.stage_seconds.get(clock, 0.0) + time.perf_counter() - started
    finally:
        if group is not distributed:        # a group this compile opened (not one the caller passed)
            group.close()
    if adapter is not None:
        state.note("lora", f"adapter '{adapter.name}' on {len(adapter.layers)} linear(s), "
                           + ("fused into the weights before quantization" if lora_mode == "fuse"
                              else "a float branch beside the quantized layers (dq.lora.swap replaces it)"))
    compiled = CompiledModel(state.record())
    if adapter is not None and lora_mode == "branch":
        lora_module.swap(compiled, adapter)
    return compiled


__all__ = ["STAGES", "CompiledModel", "compile"]
