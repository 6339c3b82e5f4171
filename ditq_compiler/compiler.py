"""``compile(model, recipe)``: the declared stages (``ditq_compiler.stages``) run over one ``CompileState``."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable, Sequence

import torch

from ditq_compiler import lora as lora_module
from ditq_compiler.backends.registry import get_backend
from ditq_compiler.calibration.data import CalibrationData
from ditq_compiler.compiled import CompiledModel
from ditq_compiler.distributed import Distributed, model_device, resolve
from ditq_compiler.recipe import Recipe
from ditq_compiler.stages import CLOCKS, DEFAULT_STAGES, Stage, run_stages
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
    plan = lora_module.LoraPlan.of(lora, lora_mode, lora_scale, model)
    model = plan.model_to_compile(model)                     # fused into a copy, or the model as given
    group = resolve(distributed, model_device(model))
    state = CompileState(model, recipe if isinstance(recipe, Recipe) else Recipe.load(recipe),
                         CalibrationData.of(calibration),
                         CompileOptions(backend, example_inputs, debug, progress, cache_dir, dynamic_shapes, strict,
                                        group))
    try:
        run_stages(state, stages)
    finally:
        if group is not distributed:        # a group this compile opened (not one the caller passed)
            group.close()
    return plan.finish(state)


__all__ = ["STAGES", "CompiledModel", "compile"]
