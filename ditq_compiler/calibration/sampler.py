"""Calibration sets drawn from the full-precision sampler's own trajectories.

``from_sampler`` runs the FP model through ``ditq_compiler.sampling.sample`` and records every input
the model is called with: ``(x_t, t, class)`` at each of the ``S = num_inference_steps`` steps. With
classifier-free guidance that includes the null-class half of each doubled batch, because the quantized
model will see both halves too. A selection then keeps a small, balanced subset:

- ``uniform`` (TaQ-DiT, "Time-aware Quantization for Diffusion Transformers", 2024): ``steps`` step
  indices spread uniformly over the trajectory, ``round(linspace(0, S - 1, steps))``,
  ``samples_per_step`` recorded inputs drawn at random at each, and the whole set shuffled. The
  defaults, 25 steps x 10 samples, follow the paper.
- ``time_groups`` (TQ-DiT, Hwang, Lee and Kang, "Efficient Time-Aware Quantization for Diffusion
  Transformers", 2025): the ``S`` steps split into ``groups`` contiguous groups (sizes differ by at most
  one, the earlier groups are the larger), ``samples_per_group`` inputs drawn at random from all the
  inputs recorded in each group's steps. Rows stay ordered by group (by step within a group), so group
  ``g``'s rows are contiguous; ``step_index`` is kept so that a time-grouped pass can map rows (and, at
  run time, timesteps) to groups. The defaults, 10 groups x 32 samples, follow the paper.

Step index 0 is the first, noisiest step. Everything is deterministic under ``seed``: the sampler's
noise comes from ``Generator().manual_seed(seed)`` and the selection's draws from
``Generator().manual_seed(seed + 1)``.

Each row also carries the noise that the diffusion loss (TQ-DiT Eq. 11) pairs with it: with ``x_0`` the
final sample of the row's trajectory and ``abar_t`` the training schedule's cumulative alpha,

    noise = (x_t - sqrt(abar_t) x_0) / sqrt(1 - abar_t)        so that  x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) noise

i.e. ``(x_0, noise)`` is a forward-process pair that produces exactly the recorded ``x_t``; with an exact
model, ancestral sampling makes these pairs distributed as in training. The Hessian-guided scale search
backpropagates ``|| noise - eps_theta(x_t, t) ||^2`` through the FP model.

A ``CalibrationSet`` is an iterable of ``(args, kwargs)`` batches, so it goes straight into
``ditq_compiler.compile(model, recipe, calibration=...)``. It saves to one safetensors file: the four
tensors, and the sample input's name, the batch size and the selection settings in the metadata.
"""

from __future__ import annotations

import inspect
import json
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
from torch import Tensor

from ditq_compiler.atomic import replacing
from ditq_compiler.sampling import sample

SELECTIONS = ("uniform", "time_groups")
FORMAT = "ditq-calibration-set"
FORMAT_VERSION = "1"
TENSOR_NAMES = ("inputs", "timesteps", "class_labels", "step_index")
OPTIONAL_TENSOR_NAMES = ("noise", "alphas_cumprod")


@dataclass
class CalibrationSet:
    """Recorded denoiser inputs; iterating yields ``((), {sample_name: x, "timestep": t, "class_labels": y})``."""

    sample_name: str
    inputs: Tensor          # (M, C, H, W) x_t exactly as the model saw it
    timesteps: Tensor       # (M,) long
    class_labels: Tensor    # (M,) long, the null class included when the sampler guided
    step_index: Tensor      # (M,) long, position along the sampler trajectory, 0 = first/noisiest step
    batch_size: int = 32
    selection: dict[str, Any] = field(default_factory=dict)   # how the rows were chosen (JSON-able)
    noise: Tensor | None = None   # (M, C, ...) the diffusion-loss noise of each row (module docs); optional
    alphas_cumprod: Tensor | None = None   # (T,) the training schedule's abar_t (rebuilds neighbouring steps)

    def __post_init__(self) -> None:
        if not isinstance(self.sample_name, str) or not self.sample_name:
            raise ValueError(f"CalibrationSet.sample_name must be a non-empty string, got {self.sample_name!r}")
        if not isinstance(self.batch_size, int) or isinstance(self.batch_size, bool) or self.batch_size < 1:
            raise ValueError(f"CalibrationSet.batch_size must be an integer >= 1, got {self.batch_size!r}")
        if not isinstance(self.inputs, Tensor) or self.inputs.dim() < 2 or not self.inputs.is_floating_point():
            raise ValueError("CalibrationSet.inputs must be a floating-point tensor (M, C, ...)")
        if len(self.inputs) == 0:
            raise ValueError("CalibrationSet is empty")
        for name in TENSOR_NAMES[1:]:
            value = getattr(self, name)
            if not isinstance(value, Tensor) or value.dim() != 1 or value.dtype != torch.long:
                raise ValueError(f"CalibrationSet.{name} must be a 1-D long tensor")
            if len(value) != len(self.inputs):
                raise ValueError(f"CalibrationSet.{name} has {len(value)} rows but inputs has {len(self.inputs)}")
        if self.noise is not None and (not isinstance(self.noise, Tensor) or self.noise.shape != self.inputs.shape):
            raise ValueError(f"CalibrationSet.noise must be a tensor of the inputs' shape {tuple(self.inputs.shape)}")

    @property
    def num_samples(self) -> int:
        return len(self.inputs)

    def __len__(self) -> int:
        return -(-self.num_samples // self.batch_size)

    def __iter__(self) -> Iterator[tuple[tuple, dict]]:
        for start in range(0, self.num_samples, self.batch_size):
            rows = slice(start, start + self.batch_size)
            yield (), {self.sample_name: self.inputs[rows], "timestep": self.timesteps[rows],
                       "class_labels": self.class_labels[rows]}

    def noise_batches(self) -> list[Tensor] | None:
        """The noise of each batch, in iteration order; None when the set has none."""
        if self.noise is None:
            return None
        return list(self.noise.split(self.batch_size))

    def save(self, path: str | os.PathLike) -> None:
        """Write a safetensors file atomically (a temporary file next to ``path``, then ``os.replace``)."""
        from safetensors.torch import save_file

        path = Path(path)
        tensors = {name: getattr(self, name).detach().cpu().contiguous()
                   for name in TENSOR_NAMES + OPTIONAL_TENSOR_NAMES if getattr(self, name) is not None}
        metadata = {"format": FORMAT, "version": FORMAT_VERSION, "sample_name": self.sample_name,
                    "batch_size": str(self.batch_size), "selection": json.dumps(self.selection, sort_keys=True)}
        with replacing(path) as tmp:
            save_file(tensors, str(tmp), metadata=metadata)

    @classmethod
    def load(cls, path: str | os.PathLike) -> CalibrationSet:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as file:
            metadata = file.metadata() or {}
            if metadata.get("format") != FORMAT:
                raise ValueError(f"{path}: not a ditq calibration set (metadata format is {metadata.get('format')!r})")
            missing = [name for name in TENSOR_NAMES if name not in file.keys()]
            missing += [f"metadata '{key}'" for key in ("sample_name", "batch_size") if key not in metadata]
            if missing:
                raise ValueError(f"{path}: calibration set is missing {', '.join(missing)}")
            tensors = {name: file.get_tensor(name)
                       for name in TENSOR_NAMES + OPTIONAL_TENSOR_NAMES if name in file.keys()}
        try:
            return cls(sample_name=metadata["sample_name"], batch_size=int(metadata["batch_size"]),
                       selection=json.loads(metadata.get("selection", "{}")), **tensors)
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None


def from_sampler(model: Any, scheduler: Any, *, num_inference_steps: int = 100, method: str = "ddpm",
                 class_labels: Tensor | Sequence[int] | None = None, num_trajectories: int = 32,
                 guidance_scale: float | None = None, null_class: int | None = None, selection: str = "uniform",
                 steps: int = 25, samples_per_step: int = 10, groups: int = 10, samples_per_group: int = 32,
                 batch_size: int = 32, shape: tuple[int, ...] | None = None, seed: int = 0,
                 progress: bool = True) -> CalibrationSet:
    """Record the FP sampler's model inputs and select a calibration set from them (see the module docs).

    One trajectory per class label; ``class_labels`` defaults to ``arange(num_trajectories) % 10`` and,
    when given, decides the number of trajectories. ``shape`` defaults to the model config's
    ``(in_channels, sample_size, sample_size)``. ``batch_size`` is the calibration batch size.

    ``guidance_scale`` must be the scale the model will be sampled with (1.0: none): with guidance the
    sampler's doubled batch holds null-class calls, which the quantized model sees too, so a set drawn
    without them does not calibrate for them; it has no default, since a wrong guess silently leaves
    them out. ``null_class`` defaults to the model config's: a DiT's ``num_embeds_ada_norm`` (the class
    past the last, 1000 for ImageNet DiTs), a class-conditional UNet2D's ``num_class_embeds - 1``. Both
    are recorded in the set's ``selection``.
    """
    if guidance_scale is None:
        raise ValueError("from_sampler: pass guidance_scale=, the classifier-free guidance scale the model will be "
                         "sampled with (1.0 for none; the demo and the benchmarks sample dit-digits with 2.0): with "
                         "guidance, the calibration set must hold the null-class calls the sampler makes")
    null_class = config_null_class(model) if null_class is None else null_class
    if guidance_scale != 1.0 and null_class is None:
        raise ValueError(f"from_sampler: guidance_scale={guidance_scale} needs the null class, and "
                         f"{type(model).__name__}'s config does not give one: pass null_class=")
    if selection not in SELECTIONS:
        raise ValueError(f"unknown selection {selection!r}; expected one of {SELECTIONS}")
    for name, value in (("num_trajectories", num_trajectories), ("steps", steps), ("groups", groups),
                        ("samples_per_step", samples_per_step), ("samples_per_group", samples_per_group),
                        ("batch_size", batch_size), ("num_inference_steps", num_inference_steps)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    num_steps = num_inference_steps
    if selection == "uniform" and steps > num_steps:
        raise ValueError(f"steps={steps} is more than the sampler's num_inference_steps={num_steps}")
    if selection == "time_groups" and groups > num_steps:
        raise ValueError(f"groups={groups} is more than the sampler's num_inference_steps={num_steps}")
    labels = _trajectory_labels(class_labels, num_trajectories)
    shape = _sample_shape(model, shape)
    sample_name = _sample_input_name(model)

    wanted = _uniform_steps(num_steps, steps) if selection == "uniform" else list(range(num_steps))
    recorded = _record_inputs(model, scheduler, labels, set(wanted), num_inference_steps=num_steps, method=method,
                              guidance_scale=guidance_scale, null_class=null_class, shape=shape, seed=seed,
                              progress=progress, desc=f"calibration: FP sampler, {len(labels)} trajectories")
    noise = _diffusion_noise(scheduler, recorded)
    draws, shortfalls = torch.Generator().manual_seed(seed + 1), []
    if selection == "uniform":
        rows = _select_uniform(recorded["step_index"], wanted, samples_per_step, draws, shortfalls)
    else:
        rows = _select_time_groups(recorded["step_index"], num_steps, groups, samples_per_group, draws, shortfalls)
    if shortfalls:
        warnings.warn("from_sampler: fewer samples were recorded than asked for, so all of them were taken at "
                      + ", ".join(shortfalls), stacklevel=2)
    info = {"selection": selection, "method": method, "num_inference_steps": num_steps,
            "num_trajectories": len(labels), "guidance_scale": guidance_scale, "null_class": null_class,
            "seed": seed}
    info.update({"steps": steps, "samples_per_step": samples_per_step} if selection == "uniform"
                else {"groups": groups, "samples_per_group": samples_per_group})
    abar = getattr(scheduler, "alphas_cumprod", None)
    return CalibrationSet(sample_name=sample_name, batch_size=batch_size, selection=info,
                          noise=None if noise is None else noise[rows],
                          alphas_cumprod=None if abar is None else torch.as_tensor(abar, dtype=torch.float32),
                          **{name: recorded[name][rows] for name in TENSOR_NAMES})


def config_null_class(model: Any) -> int | None:
    """The class index a model's config reserves for 'no class' (classifier-free guidance), if it has one."""
    config = getattr(model, "config", None)
    classes = getattr(config, "num_embeds_ada_norm", None)
    if classes:                                   # DiT: the label embedding has one row past the classes
        return int(classes)
    embeds = getattr(config, "num_class_embeds", None)
    return int(embeds) - 1 if embeds else None    # UNet2D: the last row of its class embedding


def _record_inputs(model: Any, scheduler: Any, labels: Tensor, wanted_steps: set[int], **sampling: Any
                   ) -> dict[str, Tensor]:
    """Run the sampler and keep every model input at ``wanted_steps``, in call order, as flat tensors,
    with the final sample of each row's trajectory (``final``). ``sample`` runs the labels as one chunk,
    and a guided call is the doubled batch ``[x, x]``, so call row i belongs to trajectory i mod N."""
    calls: list[tuple[Tensor, Tensor, Tensor, Tensor, Tensor]] = []

    def record(step_index: int, timesteps: Tensor, x: Tensor, call_labels: Tensor, output: Tensor) -> None:
        if step_index in wanted_steps:
            calls.append((x.detach().cpu().clone(), timesteps.cpu().clone(), call_labels.cpu().clone(),
                          torch.full((len(x),), step_index, dtype=torch.long), torch.arange(len(x)) % len(labels)))

    final = sample(model, scheduler, labels, record=record, **sampling).cpu()
    columns = dict(zip((*TENSOR_NAMES, "trajectory"), zip(*calls, strict=True), strict=True))
    recorded = {name: torch.cat(column) for name, column in columns.items()}
    recorded["final"] = final[recorded.pop("trajectory")]
    return recorded


def _diffusion_noise(scheduler: Any, recorded: dict[str, Tensor]) -> Tensor | None:
    """(x_t - sqrt(abar_t) x_0) / sqrt(1 - abar_t) per row (module docs); None without ``alphas_cumprod``."""
    alphas_cumprod = getattr(scheduler, "alphas_cumprod", None)
    if alphas_cumprod is None:
        return None
    abar = torch.as_tensor(alphas_cumprod, dtype=torch.float64)[recorded["timesteps"]]
    abar = abar.reshape(-1, *[1] * (recorded["inputs"].dim() - 1))
    x_t, x_0 = recorded["inputs"].double(), recorded["final"].double()
    return ((x_t - abar.sqrt() * x_0) / (1 - abar).sqrt()).to(recorded["inputs"].dtype)


def _uniform_steps(num_steps: int, steps: int) -> list[int]:
    """``steps`` distinct step indices spread evenly over ``0 .. num_steps - 1`` (both ends included)."""
    return torch.linspace(0, num_steps - 1, steps).round().long().tolist()


def _select_uniform(step_index: Tensor, steps: list[int], per_step: int, generator: torch.Generator,
                    shortfalls: list[str]) -> Tensor:
    """TaQ-DiT: ``per_step`` rows at each of ``steps``, then all of them shuffled."""
    rows = torch.cat([_draw(step_index == step, per_step, generator, f"step {step}", shortfalls) for step in steps])
    return rows[torch.randperm(len(rows), generator=generator)]


def _select_time_groups(step_index: Tensor, num_steps: int, groups: int, per_group: int,
                        generator: torch.Generator, shortfalls: list[str]) -> Tensor:
    """TQ-DiT: ``per_group`` rows from each of ``groups`` contiguous step ranges, kept in group order."""
    selected = []
    for g, group in enumerate(torch.arange(num_steps).tensor_split(groups)):
        first, last = int(group[0]), int(group[-1])
        in_group = (step_index >= first) & (step_index <= last)
        where = f"group {g} (steps {first}-{last})"
        selected.append(_draw(in_group, per_group, generator, where, shortfalls).sort().values)
    return torch.cat(selected)


def _draw(candidates: Tensor, count: int, generator: torch.Generator, where: str, shortfalls: list[str]) -> Tensor:
    """``count`` row indices drawn without replacement where the mask ``candidates`` is true; all of them when
    there are fewer (noted in ``shortfalls``)."""
    rows = candidates.nonzero().flatten()
    if len(rows) < count:
        shortfalls.append(f"{where} ({len(rows)} of {count})")
        return rows
    return rows[torch.randperm(len(rows), generator=generator)[:count]]


def _trajectory_labels(class_labels: Tensor | Sequence[int] | None, num_trajectories: int) -> Tensor:
    if class_labels is None:
        return torch.arange(num_trajectories) % 10
    labels = torch.as_tensor(class_labels)
    if labels.dim() != 1 or labels.dtype.is_floating_point or labels.dtype == torch.bool or len(labels) == 0:
        raise ValueError(f"class_labels must be a non-empty 1-D sequence of integers, got {class_labels!r}")
    return labels.long()


def _sample_shape(model: Any, shape: tuple[int, ...] | None) -> tuple[int, ...]:
    if shape is not None:
        return tuple(shape)
    config = getattr(model, "config", None)
    channels, size = getattr(config, "in_channels", None), getattr(config, "sample_size", None)
    if channels is None or size is None:
        raise ValueError(f"{type(model).__name__} has no config with in_channels and sample_size; pass shape=(C, H, W)")
    return (channels, *size) if isinstance(size, (tuple, list)) else (channels, size, size)


def _sample_input_name(model: Any) -> str:
    """The name of the first parameter of ``model.forward``: the key the sample goes under in a batch."""
    parameters = list(inspect.signature(getattr(model, "forward", model)).parameters.values())
    positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    if not parameters or parameters[0].kind not in positional:
        raise ValueError(f"cannot name the sample input of {type(model).__name__}: its forward has no named first "
                         "parameter")
    return parameters[0].name


__all__ = ["SELECTIONS", "CalibrationSet", "from_sampler"]
