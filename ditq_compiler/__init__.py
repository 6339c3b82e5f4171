"""ditq-compiler: a graph-level quantization compiler for diffusion transformers and U-Nets.

    import ditq_compiler as dq
    compiled = dq.compile(model, dq.Recipe.load("w8a8"), calibration=[(args, kwargs), ...])
    print(compiled.summary())
"""

import importlib

from ditq_compiler import calibration, ops  # noqa: F401  (ops registers the ditq:: custom ops)
from ditq_compiler.artifact import ArtifactError
from ditq_compiler.calibration import CalibrationError
from ditq_compiler.capture import CaptureError
from ditq_compiler.compiled import CompiledModel, load
from ditq_compiler.compiler import compile
from ditq_compiler.distributed import DistributedError
from ditq_compiler.graph import UnsupportedLayerError
from ditq_compiler.pipeline import PassError
from ditq_compiler.recipe import Recipe, RecipeError, RecipeWarning
from ditq_compiler.version import __version__

__all__ = ["ArtifactError", "CalibrationError", "CaptureError", "CompiledModel", "DistributedError", "PassError",
           "Recipe", "RecipeError", "RecipeWarning", "UnsupportedLayerError", "__version__", "calibration", "compile",
           "load"]

_LAZY_SUBMODULES = ("diffusers", "zoo", "inspection", "artifact", "sampling", "quality", "stages", "distributed",
                    "lora", "families")


def __getattr__(name: str):
    """``dq.diffusers``, ``dq.zoo`` ...: imported on first use (``diffusers`` is slow to import)."""
    if name in _LAZY_SUBMODULES:
        return importlib.import_module(f"ditq_compiler.{name}")
    raise AttributeError(f"module 'ditq_compiler' has no attribute {name!r}")
