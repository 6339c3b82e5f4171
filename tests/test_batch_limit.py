"""A model whose code bounds its batch (diffusers' Upsample2D branches on ``batch >= 64``) exports for a
bounded range; the compiled model and calibration run larger batches in chunks of at most that many rows."""

import torch

import ditq_compiler as dq
from ditq_compiler.capture import cat_rows, split_rows
from ditq_compiler.toy import small_unet


def test_split_rows_and_cat_rows_are_inverse_and_share_unbatched_values():
    inputs = {"x": torch.randn(10, 3), "t": torch.arange(10), "ids": torch.zeros(4, 2), "flag": True}
    chunks = split_rows(inputs, 4)
    assert [c["x"].shape[0] for c in chunks] == [4, 4, 2] and all(c["ids"].shape == (4, 2) for c in chunks)
    assert torch.equal(cat_rows([c["x"] for c in chunks]), inputs["x"])
    assert split_rows(inputs, None) == [inputs] and split_rows(inputs, 10) == [inputs]


def test_a_unet_takes_batches_beyond_its_exported_bound(tmp_path):
    model = small_unet().eval()
    torch.manual_seed(0)
    calibration = [((torch.randn(4, 1, 8, 8), torch.full((4,), 500), torch.arange(4)), {})]
    compiled = dq.compile(model, "w8a8-minmax", calibration=calibration, progress=False)
    bound = compiled.captured.max_batch
    assert bound == 63                                  # torch.export's range for Upsample2D's guard
    x, t, y = torch.randn(100, 1, 8, 8), torch.randint(0, 1000, (100,)), torch.randint(0, 11, (100,))
    whole = compiled(x, t, y).sample
    pieces = torch.cat([compiled(x[i:i + bound], t[i:i + bound], y[i:i + bound]).sample for i in (0, bound)])
    torch.testing.assert_close(whole, pieces, rtol=0, atol=0)        # the same chunks, called by hand
    loaded = dq.load(compiled.save(tmp_path / "unet"))
    assert loaded.captured.max_batch == bound
    torch.testing.assert_close(loaded(x, t, y).sample, whole, rtol=0, atol=0)


def test_calibration_calls_beyond_the_bound_are_split():
    model = small_unet().eval()
    torch.manual_seed(1)
    x, t, y = torch.randn(70, 1, 8, 8), torch.randint(0, 1000, (70,)), torch.randint(0, 11, (70,))
    compiled = dq.compile(model, "w8a8-minmax", calibration=[((x, t, y), {})], progress=False)
    assert compiled.captured.max_batch == 63
    halves = [((x[:63], t[:63], y[:63]), {}), ((x[63:], t[63:], y[63:]), {})]
    reference = dq.compile(model, "w8a8-minmax", calibration=halves, progress=False)
    torch.testing.assert_close(compiled(x, t, y).sample, reference(x, t, y).sample, rtol=0, atol=0)
