"""Quality measures for digit samples, shared by ``bench/quality.py`` and ``ditq demo``.

* ``fd_digits(samples)``: Frechet distance between the digit classifier's 64-d features of the
  samples and of the held-out real digits (``ditq_compiler.zoo.classifier``).
* ``fd_between(samples, reference)``: the same distance between two sample sets, e.g. a quantized
  model's samples and the FP model's samples from the same seeds ("FD to FP").
* ``real_fd_floor(n)``: the same distance for ``n`` real training digits, the floor that a
  perfect generator would reach with a reference set this small.
* ``class_accuracy(samples, labels)``: how often the classifier recognises the asked class.
* ``noise_sqnr_by_step(...)``: along the FP sampler's trajectory, the SQNR (dB) of a quantized
  model's noise prediction against the FP prediction on the same inputs, per step.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import torch
from torch import Tensor

from ditq_compiler.atomic import replacing
from ditq_compiler.quant import sqnr_db


@lru_cache(maxsize=1)
def _classifier():
    from ditq_compiler import zoo

    return zoo.load("digit-classifier")


@lru_cache(maxsize=1)
def _held_out_features() -> Tensor:
    from ditq_compiler.zoo.data import digits

    return features(digits("held_out")[0])


def features(images: Tensor) -> Tensor:
    with torch.no_grad():
        return torch.cat([_classifier().features(chunk) for chunk in images.split(512)])


def fd_digits(samples: Tensor) -> float:
    from ditq_compiler.zoo.classifier import frechet_distance

    return frechet_distance(features(samples), _held_out_features())


def fd_between(samples: Tensor, reference: Tensor) -> float:
    """Frechet distance between two sample sets in the classifier's feature space (e.g. quantized vs FP)."""
    from ditq_compiler.zoo.classifier import frechet_distance

    return frechet_distance(features(samples), features(reference))


def real_fd_floor(n: int | None = None, seed: int = 0) -> float:
    """FD of ``n`` real training digits (all of them if None or more) against the held-out set."""
    from ditq_compiler.zoo.data import digits

    images = digits("train")[0]
    if n is not None and n < len(images):
        images = images[torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))[:n]]
    return fd_digits(images)


def class_accuracy(samples: Tensor, labels: Tensor) -> float:
    with torch.no_grad():
        predicted = torch.cat([_classifier()(chunk).argmax(1) for chunk in samples.split(512)])
    return float((predicted == labels).float().mean())


def noise_sqnr_by_step(fp_model, quantized, scheduler, class_labels: Tensor, *, num_inference_steps: int = 100,
                       guidance_scale: float = 1.0, seed: int = 0) -> tuple[list[int], list[float]]:
    """(timesteps, SQNR dB) of ``quantized``'s noise prediction vs FP, on the FP trajectory."""
    from ditq_compiler.sampling import model_output_tensor, sample

    timesteps, sqnrs = [], []
    reset = getattr(quantized, "reset_trajectory", None)
    if reset is not None:               # a timestep-connected model: this FP trajectory is a new run
        reset()

    def record(step: int, t: Tensor, x: Tensor, y: Tensor, fp_out: Tensor) -> None:
        with torch.no_grad():
            q_out = model_output_tensor(quantized(x, t, y), len(x), x.shape[1])
        timesteps.append(int(t[0]))
        sqnrs.append(sqnr_db(fp_out[:, : x.shape[1]], q_out[:, : x.shape[1]]))

    sample(fp_model, scheduler, class_labels, num_inference_steps=num_inference_steps,
           guidance_scale=guidance_scale, seed=seed, record=record, progress=False)
    return timesteps, sqnrs


def save_grid(samples: Tensor, path: str | Path, columns: int = 10, scale: int = 4) -> Path:
    """Write samples in [-1, 1] as a grayscale PNG grid (atomically)."""
    from PIL import Image

    images = ((samples.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)[:, 0]
    rows = -(-len(images) // columns)
    h, w = images.shape[1:]
    canvas = torch.zeros(rows * (h + 1), columns * (w + 1), dtype=torch.uint8)
    for i, image in enumerate(images):
        r, c = divmod(i, columns)
        canvas[r * (h + 1): r * (h + 1) + h, c * (w + 1): c * (w + 1) + w] = image
    with replacing(path) as tmp:
        Image.fromarray(canvas.numpy()).resize((canvas.shape[1] * scale, canvas.shape[0] * scale),
                                               Image.NEAREST).save(tmp)
    return Path(path)
