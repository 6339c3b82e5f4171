"""Hadamard construction: orthonormal +-1/sqrt(n) matrices by Kronecker factors, the online rotation, signs."""

import math

import pytest
import torch

import ditq_compiler.ops  # noqa: F401  (registers ditq::hadamard)
from ditq_compiler.quant.hadamard import describe, hadamard_factors, hadamard_matrix, rotate

ORDERS = [1, 2, 4, 8, 12, 16, 20, 24, 28, 32, 36, 72, 96, 128, 512, 768, 1152, 4608]


@pytest.mark.parametrize("n", ORDERS)
def test_every_built_order_is_an_orthonormal_hadamard_matrix(n):
    h = hadamard_matrix(n)
    torch.testing.assert_close(h @ h.T, torch.eye(n, dtype=torch.float64), atol=1e-12, rtol=0)
    assert torch.allclose(h.abs(), torch.full_like(h, 1 / math.sqrt(n)), atol=1e-12)   # entries +-1/sqrt(n)


@pytest.mark.parametrize("n", ORDERS)
def test_online_rotation_by_two_factors_equals_the_dense_matrix(n):
    left, right = hadamard_factors(n, torch.float64)
    assert left.shape[0] * right.shape[0] == n
    x = torch.randn(3, 5, n, dtype=torch.float64)
    torch.testing.assert_close(rotate(x, left, right), x @ hadamard_matrix(n).T)
    torch.testing.assert_close(torch.ops.ditq.hadamard(x, left, right), x @ hadamard_matrix(n).T)


def test_dit_xl_widths_use_the_paley_36_factor():
    assert describe(1152) == "H1152 = H36 x H32"
    assert describe(4608) == "H4608 = H36 x H128"
    assert describe(72) == "H72 = H36 x H2"          # DiT-XL head dim


@pytest.mark.parametrize("n", [3, 6, 10, 2 * 13, 4 * 13 * 2 ** 0 * 5])
def test_widths_without_a_construction_are_an_error(n):
    with pytest.raises(ValueError, match=f"order {n}"):
        hadamard_matrix(n)


@pytest.mark.parametrize("n", [16, 64, 128, 512, 1024, 1152, 4608])
def test_the_token_mean_is_spread_over_the_channels_not_piled_into_one(n):
    # A normalised Hadamard matrix maps a constant vector onto ONE channel (sqrt(n) times its value);
    # the chosen column signs spread it: no rotated channel gets more than 2.6x the even share, and
    # orders 4^k (two flat factors) spread it exactly evenly.
    rotated = hadamard_matrix(n) @ torch.ones(n, dtype=torch.float64)
    assert float(rotated.abs().max()) <= 2.6
    if n in (16, 64, 1024):
        torch.testing.assert_close(rotated.abs(), torch.ones(n, dtype=torch.float64))


def test_rotation_makes_a_token_with_an_outlier_channel_easier_to_quantize_per_token():
    from ditq_compiler.quant import QuantSpec, fake_quantize_per_token, sqnr_db

    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 128, generator=g)
    x[:, 7] *= 30                                    # one outlier channel, as in DiT activations
    h = hadamard_matrix(128).float()
    spec = QuantSpec(4, False, "token")
    plain = sqnr_db(x, fake_quantize_per_token(x, spec))
    rotated = sqnr_db(x, fake_quantize_per_token(x @ h.T, spec) @ h)
    assert rotated > plain + 6


def test_hadamard_op_backward_is_the_transposed_rotation():
    left, right = hadamard_factors(96, torch.float64)
    x = torch.randn(4, 96, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: torch.ops.ditq.hadamard(t, left, right), (x,))
    assert torch.autograd.gradcheck(lambda t: torch.ops.ditq.hadamard(t, left, None), (x,))


def test_blocks_that_do_not_tile_the_width_are_an_error():
    left, right = hadamard_factors(128)
    with pytest.raises(ValueError, match="do not tile"):
        rotate(torch.randn(2, 96), left, right)
