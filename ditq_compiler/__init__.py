"""ditq-compiler: a graph-level quantization compiler for diffusion transformers and U-Nets.

    import ditq_compiler as dq
    compiled = dq.compile(model, dq.Recipe.load("w8a8"), calibration=[(args, kwargs), ...])
    print(compiled.summary())
"""

from ditq_compiler import calibration, ops  # noqa: F401  (ops registers the ditq:: custom ops)
from ditq_compiler.capture import CaptureError
from ditq_compiler.calibration import CalibrationError
from ditq_compiler.compiler import CompiledModel, compile
from ditq_compiler.graph import UnsupportedLayerError
from ditq_compiler.pipeline import PassError
from ditq_compiler.recipe import Recipe, RecipeError

__version__ = "0.1.0"
__all__ = ["CalibrationError", "CaptureError", "CompiledModel", "PassError", "Recipe", "RecipeError", "UnsupportedLayerError",
           "calibration", "compile"]
