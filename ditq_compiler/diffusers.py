"""diffusers integration: quantize a pipeline's denoiser in place, calibrated on the pipeline's own sampler.

    import ditq_compiler as dq
    pipe = dq.diffusers.quantize_pipeline(pipe, "w8a8")            # pipe.transformer (or pipe.unet) replaced
    images = pipe(class_labels=[1, 2, 3], num_inference_steps=50).images

Calibration. ``calibration`` is

* ``None``: the pipeline is called once with arguments made up for it (``class_labels`` spread
  over the classes the denoiser knows, up to 10, or ``batch_size=4`` for an unconditional
  pipeline; ``num_inference_steps=50``; a generator seeded with ``seed``). A text-conditioned
  pipeline needs prompts, so it must be given them (next item);
* a dict: the arguments of that one pipeline call, e.g. ``{"prompt": [...], "num_inference_steps": 30}``;
* anything else: the calibration batches themselves, as ``dq.compile`` takes them.

For the first two, every call the pipeline makes to its denoiser is recorded (a forward pre-hook
on the denoiser, removed afterwards) exactly as the pipeline made it: its scheduler, its guidance
(the doubled batch with the null condition), its latent scaling. Of the ``N`` calls, ``steps``
spread uniformly over the trajectory (``round(linspace(0, N - 1, steps))``, TaQ-DiT's uniform
selection, 25 by default) become the calibration batches, each with all its rows.

The compiled module replaces the denoiser as a ``CompiledDenoiser``, which answers what pipelines
ask of a diffusers model: ``.config`` (and config fields as attributes), ``.dtype``, ``.device``,
and ``return_dict=False`` (a tuple instead of the output class). Keyword arguments the pipeline
passes as ``None`` (``attention_mask``, ``cross_attention_kwargs`` ...) are dropped on both sides,
recording and serving, so the compiled graph takes exactly the inputs that carry data. The
pipeline object is modified (its denoiser attribute) and returned; the original denoiser module
is not modified.
"""

from __future__ import annotations

import contextlib
import inspect
import itertools
import json
from typing import Any

import torch
from torch.utils._pytree import tree_map

from ditq_compiler.compiled import CompiledModel
from ditq_compiler.compiler import compile

DENOISERS = ("transformer", "unet")
DEFAULT_STEPS = 25
DEFAULT_INFERENCE_STEPS = 50
MAX_DEFAULT_CLASSES = 10
DROPPED_KWARGS = ("return_dict",)


class CompiledDenoiser(torch.nn.Module):
    """A ``CompiledModel`` in the place of a pipeline's diffusers denoiser."""

    def __init__(self, compiled: CompiledModel, config: dict[str, Any] | None = None):
        super().__init__()
        from diffusers.configuration_utils import FrozenDict

        self.compiled = compiled
        config = config if config is not None else compiled.provenance.model_config
        self.__dict__["_config"] = FrozenDict(config or {})

    @property
    def config(self):
        return self.__dict__["_config"]

    def _first_tensor(self) -> torch.Tensor | None:
        """The first floating-point parameter or buffer (what diffusers' ``ModelMixin.dtype`` reads)."""
        gm = self.compiled.graph_module
        return next((t for t in itertools.chain(gm.parameters(), gm.buffers()) if t.is_floating_point()), None)

    @property
    def dtype(self) -> torch.dtype:
        tensor = self._first_tensor()
        return torch.float32 if tensor is None else tensor.dtype

    @property
    def device(self) -> torch.device:
        tensor = self._first_tensor()
        return torch.device("cpu") if tensor is None else tensor.device

    def cache_context(self, name: str, **kwargs: Any):
        """diffusers' cache hook (``CacheMixin``), which pipelines enter around each call: nothing to cache here."""
        return contextlib.nullcontext()

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            config = self.__dict__.get("_config")
            if config is not None and name in config:
                return config[name]
            raise

    def forward(self, *args: Any, return_dict: bool = True, **kwargs: Any) -> Any:
        kwargs = essential_kwargs(kwargs)
        if self.compiled.stateful:     # a pipeline cannot start a run (TES): a call that does not continue one does
            timesteps = self.compiled.captured.bind(args, kwargs)[self.compiled.captured.timestep_input]
            if not self.compiled.trajectory.continues(timesteps):
                self.compiled.reset_trajectory()
        out = self.compiled(*args, **kwargs)
        if return_dict:
            return out
        if hasattr(out, "to_tuple"):
            return out.to_tuple()
        return out if isinstance(out, tuple) else (out,)


def essential_kwargs(kwargs: dict[str, Any]) -> dict[str, Any]:
    """The keyword arguments that carry data: ``return_dict`` and ``None`` values dropped."""
    return {k: v for k, v in kwargs.items() if k not in DROPPED_KWARGS and v is not None}


def denoiser_name(pipe: Any) -> str:
    for name in DENOISERS:
        if isinstance(getattr(pipe, name, None), torch.nn.Module):
            return name
    raise ValueError(f"{type(pipe).__name__} has no denoiser to quantize: expected a torch module in "
                     f"pipe.{' or pipe.'.join(DENOISERS)}")


class RecordedCalls(list):
    """Calibration batches recorded from a pipeline call; ``selection`` says how (kept in the artifact)."""

    def __init__(self, batches: list, selection: dict[str, Any]):
        super().__init__(batches)
        self.selection = selection

    @property
    def num_samples(self) -> int:
        return sum(next((v.shape[0] for v in [*args, *kwargs.values()] if isinstance(v, torch.Tensor) and v.dim()), 1)
                   for args, kwargs in self)


def default_call(pipe: Any, denoiser: torch.nn.Module, seed: int) -> dict[str, Any]:
    """Arguments for one calibration call of ``pipe`` (see the module docs)."""
    parameters = inspect.signature(pipe.__call__).parameters
    call: dict[str, Any] = {}
    if "class_labels" in parameters:
        config = getattr(denoiser, "config", {}) or {}
        classes = config.get("num_embeds_ada_norm") or config.get("num_class_embeds") or MAX_DEFAULT_CLASSES
        count = min(classes, MAX_DEFAULT_CLASSES)
        call["class_labels"] = torch.linspace(0, classes - 1, count).round().long().tolist()
    elif "prompt" in parameters:
        raise ValueError(f"{type(pipe).__name__} is text-conditioned: pass the prompts to calibrate on, "
                         "e.g. calibration={'prompt': ['a photo of a cat', ...], 'num_inference_steps': 30}")
    elif "batch_size" in parameters:
        call["batch_size"] = 4
    if "num_inference_steps" in parameters:
        call["num_inference_steps"] = DEFAULT_INFERENCE_STEPS
    return call


def record_pipeline_calls(pipe: Any, call: dict[str, Any], steps: int = DEFAULT_STEPS, seed: int = 0,
                          progress: bool = True) -> RecordedCalls:
    """Run ``pipe(**call)`` and keep ``steps`` of its denoiser calls, spread uniformly (see the module docs)."""
    name = denoiser_name(pipe)
    denoiser = getattr(pipe, name)
    call = dict(call)
    if "generator" in inspect.signature(pipe.__call__).parameters and "generator" not in call:
        call["generator"] = torch.Generator().manual_seed(seed)
    calls: list[tuple[tuple, dict]] = []

    def record(module, args, kwargs):
        detached = tree_map(lambda v: v.detach().clone() if isinstance(v, torch.Tensor) else v,
                            (tuple(args), essential_kwargs(kwargs)))
        calls.append(detached)

    handle = denoiser.register_forward_pre_hook(record, with_kwargs=True)
    bar_config = dict(getattr(pipe, "_progress_bar_config", {}))
    if not progress and hasattr(pipe, "set_progress_bar_config"):
        pipe.set_progress_bar_config(disable=True)
    try:
        with torch.no_grad():
            pipe(**call)
    finally:
        handle.remove()
        if hasattr(pipe, "set_progress_bar_config"):
            pipe._progress_bar_config = bar_config
    if not calls:
        raise ValueError(f"{type(pipe).__name__}(**{sorted(call)}) never called pipe.{name}")
    chosen = sorted(set(torch.linspace(0, len(calls) - 1, min(steps, len(calls))).round().long().tolist()))
    described = {k: v for k, v in call.items() if k != "generator"}
    selection = {"source": "pipeline", "pipeline": type(pipe).__name__, "denoiser": name,
                 "call": json.loads(json.dumps(described, default=repr)), "seed": seed,
                 "denoiser_calls": len(calls), "steps": chosen}
    return RecordedCalls([calls[i] for i in chosen], selection)


def install(pipe: Any, compiled: CompiledModel, name: str | None = None) -> Any:
    """Put ``compiled`` (e.g. ``dq.load(dir)``) in ``pipe`` as its denoiser; returns ``pipe``."""
    name = name or denoiser_name(pipe)
    setattr(pipe, name, CompiledDenoiser(compiled))
    return pipe


def quantize_pipeline(pipe: Any, recipe: Any, calibration: Any = None, *, steps: int = DEFAULT_STEPS, seed: int = 0,
                      backend: str = "torch", progress: bool = True) -> Any:
    """Compile ``pipe``'s denoiser with ``recipe``, calibrated on the pipeline's own sampler, and put it in place."""
    name = denoiser_name(pipe)
    denoiser = getattr(pipe, name)
    if isinstance(denoiser, CompiledDenoiser):
        raise ValueError(f"pipe.{name} is already quantized (a CompiledDenoiser)")
    if calibration is None or isinstance(calibration, dict):
        call = default_call(pipe, denoiser, seed) if calibration is None else calibration
        calibration = record_pipeline_calls(pipe, call, steps=steps, seed=seed, progress=progress)
    compiled = compile(denoiser, recipe, calibration=calibration, backend=backend, progress=progress)
    return install(pipe, compiled, name)


__all__ = ["CompiledDenoiser", "RecordedCalls", "default_call", "install", "quantize_pipeline",
           "record_pipeline_calls"]
