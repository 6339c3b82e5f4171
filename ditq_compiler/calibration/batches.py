"""Validate calibration batches before any work is done."""

from __future__ import annotations

from typing import Any, Iterable

import torch


class CalibrationError(ValueError):
    """The calibration data is unusable; the message names the batch, input or node."""


Batch = tuple[tuple, dict]


def as_batches(calibration: Iterable[Any] | None) -> list[Batch]:
    """A list of ``(args, kwargs)``; a bare dict is taken as kwargs and a bare tuple as args."""
    if calibration is None:
        return []
    if isinstance(calibration, (dict, torch.Tensor)):
        raise CalibrationError("calibration must be an iterable of (args, kwargs) batches, "
                               f"got a single {type(calibration).__name__}; wrap it in a list")
    batches: list[Batch] = []
    for i, item in enumerate(calibration):
        if isinstance(item, dict):
            item = ((), item)
        if not (isinstance(item, (tuple, list)) and len(item) == 2 and isinstance(item[0], (tuple, list))
                and isinstance(item[1], dict)):
            raise CalibrationError(f"calibration batch {i}: expected a pair (args: tuple, kwargs: dict), "
                                   f"got {type(item).__name__}")
        args, kwargs = tuple(item[0]), dict(item[1])
        for name, value in [*((f"args[{j}]", a) for j, a in enumerate(args)), *kwargs.items()]:
            if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == 0:
                raise CalibrationError(f"calibration batch {i}: input '{name}' has no samples (shape "
                                       f"{tuple(value.shape)}); every batch needs at least one")
            if isinstance(value, torch.Tensor) and value.is_floating_point() and not torch.isfinite(value).all():
                raise CalibrationError(f"calibration batch {i}: input '{name}' contains NaN or Inf")
        batches.append((args, kwargs))
    return batches
