import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ditq_compiler.artifact.bitpack import PackedInfo, bits_needed, pack, packed_size, unpack


def test_4_bit_codes_go_two_per_byte_low_nibble_first():
    data, info = pack(torch.tensor([-8, 7, 0], dtype=torch.int8))
    assert info == PackedInfo(bits=4, offset=-8, dtype="int8", shape=(3,))
    assert data.tolist() == [0x0 | 0xF << 4, 0x8]          # offsets 0, 15 | 8


def test_ternary_codes_pack_at_2_bits_four_per_byte():
    codes = torch.tensor([[-1, 0, 1, 1], [1, -1, 0, 0]], dtype=torch.int8)
    data, info = pack(codes)
    assert info.bits == 2 and info.offset == -1 and data.numel() == 2
    assert data[0] == 0 | 1 << 2 | 2 << 4 | 2 << 6
    assert torch.equal(unpack(data, info), codes)


@settings(max_examples=60, deadline=None)
@given(bits=st.integers(1, 8), numel=st.integers(1, 300), dtype=st.sampled_from([torch.int8, torch.int32, torch.int64]),
       seed=st.integers(0, 2**31 - 1))
def test_round_trip_is_exact_for_every_bit_width(bits, numel, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    lo = -(2 ** (bits - 1))
    codes = torch.randint(lo, lo + 2**bits, (numel,), generator=g).to(dtype)
    codes[0], codes[-1] = lo, lo + 2**bits - 1                # span exactly `bits` bits (numel 1: 1 value)
    data, info = pack(codes)
    assert info.bits == bits_needed(codes) <= bits
    assert data.numel() == packed_size(numel, info.bits) == math.ceil(numel * info.bits / 8)
    out = unpack(data, info)
    assert out.dtype == dtype and torch.equal(out, codes)


def test_chunk_boundaries_with_a_bit_width_that_straddles_bytes():
    codes = torch.randint(-4, 4, (2**20 + 13, 1), generator=torch.Generator().manual_seed(0)).to(torch.int16)
    data, info = pack(codes)
    assert info.bits == 3 and torch.equal(unpack(data, info), codes)


def test_constant_tensors_take_no_bytes():
    data, info = pack(torch.zeros(5, 7, dtype=torch.int32))
    assert info.bits == 0 and data.numel() == 0
    assert torch.equal(unpack(data, info), torch.zeros(5, 7, dtype=torch.int32))


def test_what_cannot_be_packed():
    assert bits_needed(torch.randn(4)) is None
    assert bits_needed(torch.tensor([0, 256])) is None
    assert bits_needed(torch.tensor([True, False])) is None
    with pytest.raises(ValueError, match="cannot pack a torch.int64 tensor"):
        pack(torch.tensor([0, 1000]))
    with pytest.raises(ValueError, match="values span 4 bits; cannot pack them in 2"):
        pack(torch.tensor([0, 15]), bits=2)
    data, info = pack(torch.tensor([0, 15]))
    with pytest.raises(ValueError, match="need 1 uint8"):
        unpack(torch.cat([data, data]), info)
