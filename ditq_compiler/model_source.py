"""What ``ditq compile MODEL`` accepts as MODEL, and the calibration set it draws for it.

MODEL is one of

* a zoo name (``dit-digits``, ``unet-digits``): the bundled model and the scheduler it was trained with;
* a diffusers folder: a model folder (``config.json`` naming a diffusers model class in
  ``_class_name``) or a pipeline folder (``model_index.json``; its ``transformer`` or ``unet``
  subfolder is the model). The scheduler is the pipeline's ``scheduler/`` folder, a
  ``scheduler/`` folder next to a model folder, or ``scheduler_config.json`` inside it;
* ``module:factory``: ``factory()`` from an importable module (the current directory is on the path),
  returning a model or a ``(model, scheduler)`` pair.

``--scheduler`` (a folder or ``module:factory``) names the scheduler where none is found.
Calibration is a saved ``CalibrationSet`` (``--calibration FILE``) or, where a scheduler is known,
``dq.calibration.from_sampler`` on the model's own sampler: class-conditional trajectories with the
model's null class (``num_embeds_ada_norm`` for a DiT, ``num_class_embeds - 1`` for a U-Net) and
TaQ-DiT's uniform selection. Without either, the command stops with a message saying what to pass.
Only diffusers classes are instantiated from a folder: the class name is looked up in ``diffusers``.
"""

from __future__ import annotations

import importlib
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch


class ModelSourceError(ValueError):
    """MODEL, ``--scheduler`` or the calibration cannot be resolved; the message says what to pass."""


@dataclass
class ModelSource:
    model: torch.nn.Module
    scheduler: Any | None
    description: str


def _factory(spec: str) -> Any:
    module_name, _, attr = spec.partition(":")
    if "" not in sys.path and "." not in sys.path:
        sys.path.insert(0, "")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ModelSourceError(f"cannot import module {module_name!r} for {spec!r}: {e}") from None
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise ModelSourceError(f"{spec!r}: module {module_name!r} has no callable {attr!r}")
    return factory()


def _diffusers_class(name: str, kind: str, where: Path):
    import diffusers

    cls = getattr(diffusers, str(name), None)
    base = diffusers.ModelMixin if kind == "model" else diffusers.SchedulerMixin
    if not (isinstance(cls, type) and issubclass(cls, base)):
        raise ModelSourceError(f"{where}: _class_name {name!r} is not a diffusers {kind} class")
    return cls


def load_scheduler(spec: str | Path) -> Any:
    if isinstance(spec, str) and ":" in spec and not Path(spec).exists():
        return _factory(spec)
    folder = Path(spec)
    config_file = folder / "scheduler_config.json" if folder.is_dir() else folder
    if not config_file.is_file():
        raise ModelSourceError(f"--scheduler {spec}: no scheduler_config.json there")
    config = json.loads(config_file.read_text())
    return _diffusers_class(config.get("_class_name"), "scheduler", config_file).from_config(config)


def _scheduler_near(folder: Path) -> Any | None:
    for candidate in (folder / "scheduler", folder.parent / "scheduler", folder):
        if (candidate / "scheduler_config.json").is_file():
            return load_scheduler(candidate)
    return None


def _from_folder(folder: Path) -> ModelSource:
    if (folder / "model_index.json").is_file():
        for name in ("transformer", "unet"):
            if (folder / name / "config.json").is_file():
                source = _from_folder(folder / name)
                return ModelSource(source.model, _scheduler_near(folder), f"{name} of the pipeline in {folder}")
        raise ModelSourceError(f"{folder}: a pipeline folder without a transformer/ or unet/ model")
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise ModelSourceError(f"{folder}: not a diffusers model folder (no config.json)")
    config = json.loads(config_file.read_text())
    cls = _diffusers_class(config.get("_class_name"), "model", config_file)
    model = cls.from_pretrained(folder, local_files_only=True, low_cpu_mem_usage=False).eval()
    return ModelSource(model, _scheduler_near(folder), f"{cls.__name__} from {folder}")


def resolve_model(spec: str, scheduler: str | None = None) -> ModelSource:
    from ditq_compiler import zoo

    if spec in zoo.MODELS and zoo.MODELS[spec].kind != "classifier":
        source = ModelSource(zoo.load(spec), zoo.scheduler(spec), f"zoo model {spec}")
    elif Path(spec).is_dir():
        source = _from_folder(Path(spec))
    elif ":" in spec:
        made = _factory(spec)
        model, found = made if isinstance(made, tuple) else (made, None)
        if not isinstance(model, torch.nn.Module):
            raise ModelSourceError(f"{spec}() returned {type(model).__name__}, not a torch.nn.Module")
        source = ModelSource(model.eval(), found, f"{type(model).__name__} from {spec}")
    else:
        denoisers = [n for n, s in zoo.MODELS.items() if s.kind != "classifier"]
        raise ModelSourceError(f"MODEL {spec!r} is not a zoo model ({', '.join(denoisers)}), a diffusers model or "
                               "pipeline folder, or module:factory")
    if scheduler is not None:
        source.scheduler = load_scheduler(scheduler)
    return source


def null_class(model: torch.nn.Module) -> int | None:
    """The class index classifier-free guidance uses as 'no class', or None for an unconditional model."""
    config = getattr(model, "config", None) or {}
    if config.get("num_embeds_ada_norm"):
        return int(config["num_embeds_ada_norm"])
    if config.get("num_class_embeds"):
        return int(config["num_class_embeds"]) - 1
    return None


def calibration_for(source: ModelSource, *, calibration_file: str | None, num_inference_steps: int,
                    guidance_scale: float, trajectories: int, seed: int, progress: bool):
    from ditq_compiler.calibration import CalibrationSet, from_sampler

    if calibration_file is not None:
        return CalibrationSet.load(calibration_file)
    if source.scheduler is None:
        raise ModelSourceError(f"no scheduler is known for {source.description}, so calibration cannot be drawn from "
                               "its sampler: pass --scheduler (a folder with scheduler_config.json, or module:factory) "
                               "or --calibration FILE (a CalibrationSet saved with .save())")
    null = null_class(source.model)
    if null is None:
        raise ModelSourceError(f"{source.description} is not class-conditional, and the built-in sampler draws "
                               "class-conditional trajectories: pass --calibration FILE, or quantize its pipeline with "
                               "dq.diffusers.quantize_pipeline (which records the pipeline's own calls)")
    labels = torch.arange(trajectories) % min(null, 10)
    rows_per_step = trajectories * (1 if guidance_scale == 1.0 else 2)     # guidance doubles each call
    return from_sampler(source.model, source.scheduler, num_inference_steps=num_inference_steps,
                        class_labels=labels, guidance_scale=guidance_scale, null_class=null,
                        steps=min(25, num_inference_steps), samples_per_step=min(10, rows_per_step), seed=seed,
                        progress=progress)


__all__ = ["ModelSource", "ModelSourceError", "calibration_for", "load_scheduler", "null_class", "resolve_model"]
