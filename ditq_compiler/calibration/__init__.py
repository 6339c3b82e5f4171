"""Calibration: the data the quantizers are fitted on, and the observers that collect it.

``calibration=`` takes an iterable of ``(args, kwargs)`` batches, each a call of the model.
(Sampler-driven calibration sets, ``from_sampler``, are built on top of this.)
"""

from ditq_compiler.calibration.batches import CalibrationError, as_batches
from ditq_compiler.calibration.observe import observe_activations
from ditq_compiler.calibration.sampler import CalibrationSet, from_sampler

__all__ = ["CalibrationError", "CalibrationSet", "as_batches", "from_sampler", "observe_activations"]
