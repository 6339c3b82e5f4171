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
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

GRANULARITIES = ("tensor", "channel", "token", "group")
OBSERVERS = ("minmax", "percentile", "mse")
MIN_BITS, MAX_BITS = 2, 8


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class QuantSpec:
    """How to quantize one tensor; validated on construction (ValueError naming the field)."""

    bits: int = 8
    symmetric: bool = True
    granularity: str = "tensor"
    axis: int = 0
    group_size: int | None = None
    observer: str = "minmax"
    percentile: float = 99.99

    def __post_init__(self) -> None:
        if not _is_int(self.bits) or not MIN_BITS <= self.bits <= MAX_BITS:
            self._fail("bits", f"must be an int in [{MIN_BITS}, {MAX_BITS}], got {self.bits!r}")
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
    def qmin(self) -> int:
        """Smallest code, -2**(bits-1)."""
        return -(2 ** (self.bits - 1))

    @property
    def qmax(self) -> int:
        """Largest code, 2**(bits-1) - 1."""
        return 2 ** (self.bits - 1) - 1

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

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
        return f"int{self.bits} {mode} {slicing}"
