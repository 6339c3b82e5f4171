"""The demo: quantize the bundled ``dit-digits`` model, sample digits with FP and quantized weights.

Calibration comes from the FP sampler (``from_sampler``); both models then sample the same
classes from the same noise (DDPM, classifier-free guidance), and the demo reports FD-digits
and class accuracy for each, and writes one image grid: FP rows on top, quantized below.
With few samples FD is noisy; ``bench/quality.py`` is the measurement.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ditq_compiler import quality, zoo
from ditq_compiler.calibration import from_sampler
from ditq_compiler.backends.registry import get_backend
from ditq_compiler.compiled import CompiledModel
from ditq_compiler.compiler import compile
from ditq_compiler.recipe import Recipe
from ditq_compiler.report import format_table
from ditq_compiler.sampling import sample


@dataclass
class DemoResult:
    compiled: CompiledModel
    quality_table: str
    grid: Path


def run_demo(recipe: str = "w8a8", backend: str = "torch", samples: int = 50, steps: int = 50,
             guidance: float = 2.0, grid: str | Path = "ditq-demo.png", progress: bool = True) -> DemoResult:
    get_backend(backend)   # bad input fails before minutes of calibration
    recipe = Recipe.load(recipe)
    model, scheduler = zoo.load("dit-digits"), zoo.scheduler("dit-digits")
    calibration = from_sampler(model, scheduler, num_inference_steps=steps, guidance_scale=guidance,
                               num_trajectories=16, steps=min(25, steps), progress=progress)
    compiled = compile(model, recipe, calibration=calibration, backend=backend, progress=progress)
    labels = torch.arange(samples) % 10
    rows, images = [], []
    for name, denoiser in (("fp", model), (recipe.name, compiled)):
        x = sample(denoiser, scheduler, labels, num_inference_steps=steps, guidance_scale=guidance, seed=0,
                   progress=progress, desc=f"{name} samples: {samples} digits")
        images.append(x[:20])
        rows.append([name, f"{quality.fd_digits(x):.2f}", f"{100 * quality.class_accuracy(x, labels):.1f}%"])
    table = format_table(rows, ["model", f"FD-digits ({samples} samples)", "class accuracy"])
    return DemoResult(compiled, table, quality.save_grid(torch.cat(images), grid))
