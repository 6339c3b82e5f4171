"""Class-conditional DDPM / DDIM sampling with classifier-free guidance, for any denoiser.

The denoiser is called positionally, ``denoiser(x_t, timesteps, class_labels)``: the signature of
diffusers' ``DiTTransformer2DModel`` and ``UNet2DModel``, of a ``ditq_compiler.CompiledModel`` and of
an ONNX Runtime wrapper. Its output may be a diffusers output (``.sample``), a tuple (its first item)
or a tensor; with ``2 C`` channels (learned variance) the first ``C`` are the prediction.

The update rule is diffusers' own: a fresh ``DDPMScheduler`` or ``DDIMScheduler`` is built from the
config of the scheduler the model was trained with, so ``beta`` schedule, ``prediction_type``, clipping
and timestep spacing all carry over. With ``abar_t`` the cumulative product of ``1 - beta``, both
first predict ``x0 = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t)``, then

- DDPM (Ho et al. 2020) draws ``x_prev ~ N(mu, sigma_t^2)`` from the posterior ``q(x_prev | x_t, x0)``,
  ``mu = sqrt(abar_prev) beta_t / (1 - abar_t) x0 + sqrt(alpha_t) (1 - abar_prev) / (1 - abar_t) x_t``;
- DDIM (Song et al. 2021, ``eta = 0``) steps deterministically,
  ``x_prev = sqrt(abar_prev) x0 + sqrt(1 - abar_prev) eps``.

Classifier-free guidance (Ho & Salimans 2022) evaluates the conditional and the null-class inputs in
one doubled batch, ``[x, x]`` with labels ``[y, null]``, and extrapolates from the unconditional
prediction towards the conditional one:

    eps = eps_null + s * (eps_cond - eps_null)

``s = 1`` is the plain conditional model (one batch, no null pass); ``s = 0`` is unconditional.
The rule is linear, so it applies to whatever the model predicts (eps, v or x0).

Randomness: the initial noise and DDPM's per-step noise come from one ``torch.Generator``, so the same
seed gives bitwise identical samples. The initial noise of all samples is drawn up front, so with
``batch_size`` each chunk starts from its own slice of the same noise: DDIM results do not depend on
``batch_size``. DDPM's per-step noise is drawn chunk after chunk from the shared generator, so DDPM
samples do depend on ``batch_size`` (same distribution, different draws).
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor
from tqdm.auto import tqdm

METHODS = ("ddpm", "ddim")

Recorder = Callable[[int, Tensor, Tensor, Tensor, Tensor], None]


def make_scheduler(scheduler: Any, method: str, num_inference_steps: int) -> Any:
    """A fresh ``method`` scheduler with the training scheduler's config; ``scheduler`` is left untouched."""
    from diffusers import DDIMScheduler, DDPMScheduler

    if method not in METHODS:
        raise ValueError(f"unknown sampling method {method!r}; expected one of {METHODS}")
    scheduler_class = DDPMScheduler if method == "ddpm" else DDIMScheduler
    fresh = scheduler_class.from_config(scheduler.config)
    fresh.set_timesteps(num_inference_steps)
    return fresh


def _new_trajectory(denoiser: Any) -> None:
    """A model with state across sampler steps (BiDM+'s TES, ``ditq_compiler.trajectory``) starts each run empty."""
    reset = getattr(denoiser, "reset_trajectory", None)
    if callable(reset):
        reset()


def sample(denoiser: Callable[..., Any], scheduler: Any, class_labels: Tensor, *, num_inference_steps: int = 100,
           method: str = "ddpm", guidance_scale: float = 1.0, null_class: int = 10,
           shape: tuple[int, ...] = (1, 8, 8), generator: torch.Generator | None = None, seed: int | None = None,
           batch_size: int | None = None, record: Recorder | None = None, progress: bool = True,
           desc: str | None = None) -> Tensor:
    """Generate one sample per entry of ``class_labels``; returns ``x0`` of shape ``(N, *shape)`` in [-1, 1].

    ``record(step_index, timesteps, x_model_input, class_labels, model_output)``, if given, is called at
    every denoiser call with exactly the tensors the denoiser saw (the doubled batch when guiding) and
    its output tensor (unwrapped from ``.sample`` / a tuple, before guidance). ``step_index`` counts
    from 0 at the first, noisiest step.

    Noise comes from ``generator``, or from ``torch.Generator().manual_seed(seed)``; with neither, seed 0.
    ``batch_size`` splits ``class_labels`` into chunks of that many samples, sampled one after the other
    (a guided chunk is one denoiser call of twice that batch). ``desc`` labels the progress bar (default: what is
    sampled and how many, e.g. ``sample ddpm: 100 samples``).
    """
    labels = _check_labels(class_labels)
    _check_options(method, num_inference_steps, guidance_scale, null_class, shape, batch_size)
    guided = guidance_scale != 1.0
    if guided and bool((labels == null_class).any()):
        raise ValueError(f"class_labels contain the null class {null_class}; classifier-free guidance needs "
                         "conditional labels distinct from the null class")
    if generator is not None and seed is not None:
        raise ValueError("pass either generator or seed, not both")
    if generator is None:
        generator = torch.Generator().manual_seed(0 if seed is None else seed)

    device, dtype = _device_and_dtype(denoiser)
    noise = torch.randn((len(labels), *shape), generator=generator, device=generator.device, dtype=torch.float32)
    noise = noise.to(device=device, dtype=dtype)
    labels = labels.to(device)
    chunk = batch_size or len(labels)
    starts = range(0, len(labels), chunk)

    bar = tqdm(total=len(starts) * num_inference_steps, desc=desc or f"sample {method}: {len(labels)} samples",
               unit="step", disable=not progress)
    samples = []
    with torch.no_grad(), bar:
        for start in starts:
            _new_trajectory(denoiser)
            step_scheduler = make_scheduler(scheduler, method, num_inference_steps)
            samples.append(_denoise(denoiser, step_scheduler, noise[start:start + chunk],
                                    labels[start:start + chunk], guidance_scale, null_class, generator, record, bar))
    return torch.cat(samples).clamp(-1.0, 1.0)


def _denoise(denoiser: Callable[..., Any], scheduler: Any, noise: Tensor, labels: Tensor, guidance_scale: float,
             null_class: int, generator: torch.Generator, record: Recorder | None, bar: tqdm) -> Tensor:
    guided = guidance_scale != 1.0
    channels = noise.shape[1]
    call_labels = torch.cat([labels, torch.full_like(labels, null_class)]) if guided else labels
    keep_variance = getattr(scheduler.config, "variance_type", None) in ("learned", "learned_range")
    x = noise * scheduler.init_noise_sigma
    for step_index, t in enumerate(scheduler.timesteps):
        model_input = scheduler.scale_model_input(x, t)
        if guided:
            model_input = torch.cat([model_input, model_input])
        timesteps = torch.full((len(call_labels),), int(t), dtype=torch.long, device=x.device)
        output = model_output_tensor(denoiser(model_input, timesteps, call_labels), len(call_labels), channels)
        if record is not None:
            record(step_index, timesteps, model_input, call_labels, output)
        prediction, variance = output[:, :channels], output[:, channels:]
        if guided:
            cond, null = prediction.chunk(2)
            prediction = null + guidance_scale * (cond - null)
            variance = variance.chunk(2)[0]
        if keep_variance and variance.shape[1] == channels:  # DDPM with a learned variance reads it
            prediction = torch.cat([prediction, variance], dim=1)
        x = scheduler.step(prediction, t, x, generator=generator).prev_sample
        bar.update(1)
    return x


def model_output_tensor(output: Any, batch: int, channels: int) -> Tensor:
    """The prediction tensor of a denoiser output: ``.sample``, a tuple's first item, or the tensor itself."""
    if hasattr(output, "sample"):
        output = output.sample
    elif isinstance(output, (tuple, list)):
        output = output[0]
    if not isinstance(output, Tensor):
        raise TypeError(f"the denoiser returned {type(output).__name__}; expected a tensor, a tuple or an "
                        "object with .sample")
    if output.dim() < 2 or output.shape[0] != batch or output.shape[1] not in (channels, 2 * channels):
        raise ValueError(f"the denoiser returned shape {tuple(output.shape)}; expected batch {batch} and "
                         f"{channels} (or {2 * channels}, with a learned variance) channels")
    return output


def _check_labels(class_labels: Tensor) -> Tensor:
    if not isinstance(class_labels, Tensor):
        raise TypeError(f"class_labels must be a tensor, got {type(class_labels).__name__}")
    if class_labels.dim() != 1 or class_labels.dtype.is_floating_point or class_labels.dtype.is_complex \
            or class_labels.dtype == torch.bool:
        raise ValueError(f"class_labels must be a 1-D integer tensor, got shape {tuple(class_labels.shape)} "
                         f"and dtype {class_labels.dtype}")
    if len(class_labels) == 0:
        raise ValueError("class_labels is empty: nothing to sample")
    if bool((class_labels < 0).any()):
        raise ValueError("class_labels must be non-negative")
    return class_labels.long()


def _check_options(method: str, num_inference_steps: int, guidance_scale: float, null_class: int,
                   shape: tuple[int, ...], batch_size: int | None) -> None:
    if method not in METHODS:
        raise ValueError(f"unknown sampling method {method!r}; expected one of {METHODS}")
    if not _is_int(num_inference_steps) or num_inference_steps < 1:
        raise ValueError(f"num_inference_steps must be an integer >= 1, got {num_inference_steps!r}")
    if not torch.isfinite(torch.tensor(float(guidance_scale))):
        raise ValueError(f"guidance_scale must be finite, got {guidance_scale!r}")
    if guidance_scale != 1.0 and (not _is_int(null_class) or null_class < 0):
        raise ValueError(f"classifier-free guidance needs an integer null_class >= 0, got {null_class!r}")
    if not shape or not all(_is_int(d) and d >= 1 for d in shape):
        raise ValueError(f"shape must be a non-empty tuple of positive integers (C, H, W), got {shape!r}")
    if batch_size is not None and (not _is_int(batch_size) or batch_size < 1):
        raise ValueError(f"batch_size must be None or an integer >= 1, got {batch_size!r}")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _device_and_dtype(denoiser: Any) -> tuple[torch.device, torch.dtype]:
    """Where the samples live: the denoiser's first floating-point parameter, else CPU float32."""
    parameters = denoiser.parameters() if isinstance(denoiser, torch.nn.Module) else ()
    first = next((p for p in parameters if p.is_floating_point()), None)
    return (first.device, first.dtype) if first is not None else (torch.device("cpu"), torch.float32)


__all__ = ["METHODS", "make_scheduler", "model_output_tensor", "sample"]
