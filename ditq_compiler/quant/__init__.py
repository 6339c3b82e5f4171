"""Quantization primitives: the spec of a grid, (fake) quantization on it, and calibration observers."""

from __future__ import annotations

from ditq_compiler.quant.fake import (
    SCALE_EPS,
    broadcast_qparams,
    dequantize,
    fake_quantize,
    fake_quantize_per_token,
    qparams_from_range,
    quantize,
    round_ste,
    split_groups,
    sqnr_db,
)
from ditq_compiler.quant.observers import (
    AbsMeanObserver,
    MinMaxObserver,
    MSEObserver,
    NonFiniteError,
    Observer,
    PercentileObserver,
    make_observer,
    weight_qparams,
)
from ditq_compiler.quant.spec import QuantSpec

__all__ = [
    "AbsMeanObserver",
    "SCALE_EPS",
    "MSEObserver",
    "MinMaxObserver",
    "NonFiniteError",
    "Observer",
    "PercentileObserver",
    "QuantSpec",
    "broadcast_qparams",
    "dequantize",
    "fake_quantize",
    "fake_quantize_per_token",
    "make_observer",
    "qparams_from_range",
    "quantize",
    "round_ste",
    "split_groups",
    "sqnr_db",
    "weight_qparams",
]
