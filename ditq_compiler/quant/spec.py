"""QuantSpec: what integer grid a tensor is quantized to, and how its range is chosen.

A b-bit grid is always SIGNED, for symmetric and affine quantization alike:

    codes q in [qmin, qmax] = [-2**(b-1), 2**(b-1) - 1]          (int8: [-128, 127])
    x ~ (q - zero_point) * scale

How (scale, zero_point) follow from a range [lo, hi] is in `ditq_compiler.quant.fake`; how the
range is chosen is the `observer` (`ditq_compiler.quant.observers`). One (scale, zero_point) pair
is shared by each slice of the tensor named by `granularity`:

    "tensor"   one pair for the whole tensor
    "channel"  one pair per index along `axis` (weights: axis 0 = output channel; activations: -1)
    "group"    one pair per run of `group_size` consecutive elements of the LAST dim
    "token"    one pair per token (per row of the last dim), computed at run time from that row's
               min / max -- dynamic, so nothing is observed and the observer must be "minmax"

Binary (W1A1, BiDM+): ``bits: 1`` is the grid {-1, +1} of ``sign(x - tau)``; ``binarizer`` says how the
offsets and scales are made (``xnor``, ``react``, ``fpb``: ``ditq_compiler.binary``). A binarized layer has
1-bit weights and 1-bit activations with the same binarizer.

Ternary (W1.58, BitNet b1.58): ``bits: 1.58`` is the grid {-1, 0, 1} (log2 3 = 1.58 bits of
information, stored as int8 codes), symmetric, for weights only, with the "absmean" observer:
the scale of each slice is the mean of its absolute values, gamma = mean |W|, and
``W ~ gamma * clamp(round(W / gamma), -1, 1)``. ``absmean`` is defined for ternary grids only.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

GRANULARITIES = ("tensor", "channel", "token", "group")
OBSERVERS = ("minmax", "percentile", "mse", "absmean")
BINARIZERS = ("xnor", "react", "fpb")
MIN_BITS, MAX_BITS = 2, 8
TERNARY_BITS = 1.58


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class QuantSpec:
    """How to quantize one tensor; validated on construction (ValueError naming the field)."""

    bits: int | float = 8        # an int in [2, 8], 1.58 for the ternary grid {-1, 0, 1}, 1 for binary {-1, +1}
    symmetric: bool = True
    granularity: str = "tensor"
    axis: int = 0
    group_size: int | None = None
    observer: str = "minmax"
    percentile: float = 99.99
    binarizer: str | None = None   # bits 1 only: xnor | react | fpb

    def __post_init__(self) -> None:
        if not (self.ternary or self.binary or (_is_int(self.bits) and MIN_BITS <= self.bits <= MAX_BITS)):
            self._fail("bits", f"must be an int in [{MIN_BITS}, {MAX_BITS}], {TERNARY_BITS} (ternary) or 1 "
                               f"(binary), got {self.bits!r}")
        if self.binary and self.binarizer not in BINARIZERS:
            self._fail("binarizer", f"1-bit quantization needs a binarizer, one of {BINARIZERS}, got "
                                    f"{self.binarizer!r}")
        if not self.binary and self.binarizer is not None:
            self._fail("binarizer", f"applies to bits: 1 only (got bits {self.bits!r})")
        if not isinstance(self.symmetric, bool):
            self._fail("symmetric", f"must be a bool, got {self.symmetric!r}")
        if self.granularity not in GRANULARITIES:
            self._fail("granularity", f"must be one of {GRANULARITIES}, got {self.granularity!r}")
        if not _is_int(self.axis):
            self._fail("axis", f"must be an int, got {self.axis!r}")
        if self.granularity == "group":
            if not _is_int(self.group_size) or self.group_size <= 0:
                self._fail("group_size", f"must be a positive int for granularity='group', got {self.group_size!r}")
        elif self.group_size is not None:
            self._fail("group_size", f"must be None unless granularity='group' (got {self.group_size!r} "
                                     f"with granularity={self.granularity!r})")
        if self.observer not in OBSERVERS:
            self._fail("observer", f"must be one of {OBSERVERS}, got {self.observer!r}")
        if self.ternary and not self.symmetric:
            self._fail("symmetric", "the ternary grid {-1, 0, 1} is symmetric (zero point 0); set symmetric: true")
        if self.ternary and self.granularity == "token":
            self._fail("granularity", "ternary is a weight format; weights are not quantized per token")
        if self.ternary and self.observer not in ("absmean", "mse"):
            self._fail("observer", f"ternary scales come from 'absmean' (BitNet b1.58) or 'mse', "
                                   f"got {self.observer!r}")
        if self.observer == "absmean" and not self.ternary:
            self._fail("observer", f"'absmean' is the ternary (bits {TERNARY_BITS}) scale rule, not defined "
                                   f"for {self.bits}-bit grids")
        if self.granularity == "token" and self.observer != "minmax":
            self._fail("observer", f"per-token quantization is dynamic (min/max of each token at run time), "
                                   f"so the observer must be 'minmax', got {self.observer!r}")
        percentile_ok = (isinstance(self.percentile, (int, float)) and not isinstance(self.percentile, bool)
                         and math.isfinite(self.percentile) and 50 < self.percentile <= 100)
        if not percentile_ok:
            self._fail("percentile", f"must be a number in (50, 100], got {self.percentile!r}")

    @staticmethod
    def _fail(field: str, problem: str) -> None:
        raise ValueError(f"QuantSpec.{field}: {problem}")

    @property
    def binary(self) -> bool:
        """The grid {-1, +1} (``bits == 1``), binarized by ``binarizer``."""
        return _is_int(self.bits) and self.bits == 1

    @property
    def ternary(self) -> bool:
        """The grid {-1, 0, 1} (``bits == 1.58``)."""
        return isinstance(self.bits, float) and self.bits == TERNARY_BITS

    @property
    def qmin(self) -> int:
        """Smallest code, -2**(bits-1) (ternary and binary: -1)."""
        return -1 if self.ternary or self.binary else -(2 ** (self.bits - 1))

    @property
    def qmax(self) -> int:
        """Largest code, 2**(bits-1) - 1 (ternary: 1)."""
        return 1 if self.ternary else 2 ** (self.bits - 1) - 1

    def to_dict(self) -> dict[str, Any]:
        """Every field; ``binarizer`` only for binary specs (so other specs read as they always have)."""
        data = dataclasses.asdict(self)
        if data["binarizer"] is None:
            del data["binarizer"]
        return data

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> QuantSpec:
        """Inverse of to_dict; missing keys take their defaults, unknown keys are an error."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"QuantSpec: unknown key(s) {unknown}; known keys are {sorted(known)}")
        return cls(**d)

    def describe(self) -> str:
        """Short label, e.g. 'int8 sym per-channel' or 'int4 asym per-group(64)'."""
        mode = "sym" if self.symmetric else "asym"
        slicing = f"per-group({self.group_size})" if self.granularity == "group" else f"per-{self.granularity}"
        if self.ternary:
            return f"ternary {self.observer} {slicing}"
        if self.binary:
            return f"binary {self.binarizer}"
        return f"int{self.bits} {mode} {slicing}"
