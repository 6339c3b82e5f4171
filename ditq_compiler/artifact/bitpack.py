"""Pack integer tensors at the bit width their values need, generic over 1..8 bits.

An integer tensor ``q`` whose values span ``[lo, hi]`` needs ``b = ceil(log2(hi - lo + 1))`` bits
(0 when it is constant). It is stored as the unsigned offsets ``u = q - lo`` in ``[0, 2^b)``, each
written as ``b`` bits, least significant first, into one little-endian bit stream:

    value i occupies stream bits [i b, (i + 1) b);   byte k holds stream bits [8 k, 8 k + 8)

so 4-bit codes go two per byte (the first in the low nibble), 2-bit codes (ternary {-1, 0, 1}
included: lo = -1, u in {0, 1, 2}) four per byte, 8-bit codes one per byte, and 3-, 5-, 6- or
7-bit codes straddle bytes. ``lo`` and ``b`` travel with the packed bytes; unpacking is exact.
Nothing here knows what the codes mean, so any op's integer constants (weight codes, zero
points, group indices) pack the same way.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

MAX_PACKED_BITS = 8
_CHUNK = 1 << 20          # values per chunk: a multiple of 8, so every chunk starts on a byte boundary


@dataclass(frozen=True)
class PackedInfo:
    """What unpacking needs besides the bytes: bit width, offset, original dtype and shape."""

    bits: int
    offset: int
    dtype: str
    shape: tuple[int, ...]

    def to_dict(self) -> dict:
        return {"bits": self.bits, "offset": self.offset, "dtype": self.dtype, "shape": list(self.shape)}

    @classmethod
    def from_dict(cls, d: dict) -> PackedInfo:
        return cls(int(d["bits"]), int(d["offset"]), str(d["dtype"]), tuple(int(s) for s in d["shape"]))


def bits_needed(tensor: Tensor) -> int | None:
    """Bits per value to store ``tensor`` losslessly as offsets from its minimum; None if it is not an
    integer tensor, is empty, or would need more than 8 bits."""
    if tensor.dtype.is_floating_point or tensor.dtype.is_complex or tensor.dtype == torch.bool or tensor.numel() == 0:
        return None
    span = int(tensor.max()) - int(tensor.min())
    bits = math.ceil(math.log2(span + 1)) if span > 0 else 0
    return bits if bits <= MAX_PACKED_BITS else None


def pack(tensor: Tensor, bits: int | None = None) -> tuple[Tensor, PackedInfo]:
    """(uint8 bytes, info); ``bits`` defaults to ``bits_needed`` and may be larger, never smaller."""
    needed = bits_needed(tensor)
    if needed is None:
        raise ValueError(f"cannot pack a {tensor.dtype} tensor of shape {tuple(tensor.shape)} in at most "
                         f"{MAX_PACKED_BITS} bits")
    bits = needed if bits is None else bits
    if not needed <= bits <= MAX_PACKED_BITS:
        raise ValueError(f"values span {needed} bits; cannot pack them in {bits}")
    offset = int(tensor.min())
    info = PackedInfo(bits, offset, str(tensor.dtype).removeprefix("torch."), tuple(tensor.shape))
    unsigned = (tensor.detach().cpu().reshape(-1).to(torch.int64) - offset).numpy().astype(np.uint8)
    if bits == 0:
        return torch.empty(0, dtype=torch.uint8), info
    weights = np.arange(bits, dtype=np.uint8)
    chunks = [np.packbits(((unsigned[i:i + _CHUNK, None] >> weights) & 1).reshape(-1), bitorder="little")
              for i in range(0, len(unsigned), _CHUNK)]
    return torch.from_numpy(np.concatenate(chunks)), info


def packed_size(numel: int, bits: int) -> int:
    return math.ceil(numel * bits / 8)


def unpack(data: Tensor, info: PackedInfo) -> Tensor:
    """The tensor ``pack`` was given, bit for bit."""
    numel = math.prod(info.shape)
    dtype = getattr(torch, info.dtype)
    if data.dtype != torch.uint8 or data.dim() != 1 or data.numel() != packed_size(numel, info.bits):
        raise ValueError(f"packed data has {data.numel()} {data.dtype} values; {numel} values at {info.bits} "
                         f"bits need {packed_size(numel, info.bits)} uint8")
    if info.bits == 0:
        return torch.full(info.shape, info.offset, dtype=dtype)
    raw = data.numpy()
    powers = (1 << np.arange(info.bits)).astype(np.int64)
    out = np.empty(numel, dtype=np.int64)
    chunk_bytes = _CHUNK * info.bits // 8
    for c, start in enumerate(range(0, numel, _CHUNK)):
        count = min(_CHUNK, numel - start)
        bits = np.unpackbits(raw[c * chunk_bytes:(c + 1) * chunk_bytes], bitorder="little", count=count * info.bits)
        out[start:start + count] = bits.reshape(count, info.bits).astype(np.int64) @ powers
    return torch.from_numpy(out + info.offset).to(dtype).reshape(info.shape)


__all__ = ["MAX_PACKED_BITS", "PackedInfo", "bits_needed", "pack", "packed_size", "unpack"]
