"""The demo: compile a small random diffusers DiT and return it (``ditq demo`` prints its summary).

Until the bundled reference model exists (``dq.zoo``), the demo builds a random
``DiTTransformer2DModel`` (2 blocks, 4 heads x 32, 8x8x4 input, 10 classes) and calibrates it
on random inputs at timesteps spread over the schedule.
"""

from __future__ import annotations

from ditq_compiler.compiler import CompiledModel, compile
from ditq_compiler.recipe import Recipe
from ditq_compiler.toy import random_dit_batches, small_dit


def run_demo(recipe: str = "w8a8", backend: str = "torch", progress: bool = True) -> CompiledModel:
    return compile(small_dit(), Recipe.load(recipe), calibration=random_dit_batches(), backend=backend,
                   progress=progress)
