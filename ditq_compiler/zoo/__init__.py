"""Bundled reference models, trained by this project on scikit-learn's digits (no download).

    dq.zoo.load("dit-digits")      # class-conditional DiTTransformer2DModel, 6 blocks, hidden 128
    dq.zoo.load("unet-digits")     # class-conditional UNet2DModel with attention
    dq.zoo.load("digit-classifier")   # the CNN judge / FD feature network
    dq.zoo.scheduler("dit-digits") # the DDPM scheduler the model was trained with

All take ``(x, timestep, class_labels)`` with images in [-1, 1] and null class 10. They are
trained by ``python -m ditq_compiler.zoo.train NAME``; the weights ship in ``weights/``.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import torch

from ditq_compiler.zoo.specs import MODELS, build_model, build_scheduler

WEIGHTS = "weights"


def weights_dir(name: str) -> Path:
    if name not in MODELS:
        raise KeyError(f"unknown zoo model {name!r} (models: {', '.join(MODELS)})")
    return Path(str(resources.files("ditq_compiler.zoo"))) / WEIGHTS / name


def load(name: str) -> torch.nn.Module:
    """The trained model ``name`` in eval mode, loaded from the package (never from a hub)."""
    path = weights_dir(name)
    if not path.exists():
        raise FileNotFoundError(f"zoo model {name!r} has no weights at {path}; "
                                f"train it with `python -m ditq_compiler.zoo.train {name}`")
    spec = MODELS[name]
    if spec.kind == "classifier":
        from safetensors.torch import load_file

        model = build_model(name)
        model.load_state_dict(load_file(path / "model.safetensors"))
        return model.eval()
    # low_cpu_mem_usage=False: the default wants `accelerate` and warns without it; these models are small
    return spec.diffusers_class().from_pretrained(path, local_files_only=True, low_cpu_mem_usage=False).eval()


def scheduler(name: str):
    """The diffusers DDPM scheduler ``name`` was trained with."""
    if MODELS[name].kind == "classifier":
        raise KeyError(f"{name!r} is a classifier and has no scheduler")
    return build_scheduler()


def pipeline(name: str = "dit-digits"):
    """A ``DigitsDiTPipeline`` around the zoo model ``name`` and its scheduler (built locally)."""
    from ditq_compiler.zoo.dit_pipeline import DigitsDiTPipeline

    if MODELS[name].kind != "dit":
        raise KeyError(f"{name!r} is not a DiT; pipelines are built for: "
                       f"{', '.join(n for n, s in MODELS.items() if s.kind == 'dit')}")
    return DigitsDiTPipeline(transformer=load(name), scheduler=scheduler(name))


__all__ = ["MODELS", "load", "pipeline", "scheduler", "weights_dir"]
