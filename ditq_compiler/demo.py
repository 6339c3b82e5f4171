"""The demo: compile a small random diffusers DiT at W8A8 and print what was done.

Until the bundled reference model exists (``dq.zoo``), the demo builds a random
``DiTTransformer2DModel`` (2 blocks, 4 heads x 32, 8x8x4 input, 10 classes) and calibrates
it on random inputs at timesteps spread over the schedule.
"""

from __future__ import annotations

import torch

from ditq_compiler.compiler import CompiledModel, compile
from ditq_compiler.recipe import Recipe


def small_dit(seed: int = 0):
    from diffusers import DiTTransformer2DModel

    torch.manual_seed(seed)
    return DiTTransformer2DModel(num_attention_heads=4, attention_head_dim=32, in_channels=4, num_layers=2,
                                 sample_size=8, patch_size=2, num_embeds_ada_norm=10).eval()


def random_dit_batches(count: int = 8, batch_size: int = 4, seed: int = 1) -> list[tuple[tuple, dict]]:
    g = torch.Generator().manual_seed(seed)
    return [((), dict(hidden_states=torch.randn(batch_size, 4, 8, 8, generator=g),
                      timestep=torch.randint(0, 1000, (batch_size,), generator=g),
                      class_labels=torch.randint(0, 10, (batch_size,), generator=g)))
            for _ in range(count)]


def run_demo(recipe: str = "w8a8", backend: str = "torch", progress: bool = True) -> CompiledModel:
    model = small_dit()
    compiled = compile(model, Recipe.load(recipe), calibration=random_dit_batches(), backend=backend,
                       progress=progress)
    return compiled
