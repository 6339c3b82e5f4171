"""TensorRT backend: optimisation-profile shapes and flavour checks run anywhere; engines need TensorRT + CUDA."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from ditq_compiler.backends.tensorrt import TensorRTError, TensorRTUnavailable, build_engine, profile_shapes

HAS_TENSORRT = importlib.util.find_spec("tensorrt") is not None
needs_engine = pytest.mark.skipif(not (HAS_TENSORRT and torch.cuda.is_available()),
                                  reason="needs the tensorrt package and a CUDA device")


def test_profile_covers_the_dynamic_batch_of_every_input():
    shapes = profile_shapes({"hidden_states": (-1, 4, 32, 32), "timestep": (-1,), "class_labels": (-1,)},
                            "hidden_states", (1, 2, 8))
    assert shapes["hidden_states"] == ((1, 4, 32, 32), (2, 4, 32, 32), (8, 4, 32, 32))
    assert shapes["timestep"] == shapes["class_labels"] == ((1,), (2,), (8,))


def test_profile_covers_a_dynamic_resolution_and_refuses_a_fixed_one():
    resolution = ((16, 16), (32, 32), (64, 48))
    shapes = profile_shapes({"sample": (-1, 4, -1, -1)}, "sample", (1, 2, 4), resolution)
    assert shapes["sample"] == ((1, 4, 16, 16), (2, 4, 32, 32), (4, 4, 64, 48))
    with pytest.raises(ValueError, match="fixed height 32"):
        profile_shapes({"sample": (-1, 4, 32, 32)}, "sample", (1, 2, 4), resolution)
    with pytest.raises(ValueError, match="axis 2 is dynamic and has no range"):
        profile_shapes({"sample": (-1, 4, -1, -1)}, "sample", (1, 2, 4))
    with pytest.raises(ValueError, match="min <= opt <= max"):
        profile_shapes({"sample": (-1, 4, 8, 8)}, "sample", (4, 2, 1))


def test_engines_are_built_from_the_tensorrt_flavour_only(compiled_dit_w8a8, tmp_path):
    path = compiled_dit_w8a8.export_onnx(tmp_path / "ort.onnx", target="ort")
    with pytest.raises(TensorRTError, match="'ort' flavour"):
        build_engine(path, tmp_path / "dit.plan")
    assert not (tmp_path / "dit.plan").exists()


@pytest.mark.skipif(HAS_TENSORRT and torch.cuda.is_available(), reason="TensorRT and CUDA are present")
def test_without_tensorrt_or_cuda_building_says_why(compiled_dit_w8a8, tmp_path):
    path = compiled_dit_w8a8.export_onnx(tmp_path / "trt.onnx", target="tensorrt")
    with pytest.raises(TensorRTUnavailable, match="tensorrt' package|CUDA device"):
        build_engine(path, tmp_path / "dit.plan")


@pytest.mark.gpu
@needs_engine
def test_int8_engine_matches_onnx_runtime_and_round_trips(compiled_dit_w8a8, dit_batches, tmp_path):
    from ditq_compiler.backends.ort import OrtModel
    from ditq_compiler.backends.tensorrt import TensorRTModel
    from ditq_compiler.quant import sqnr_db

    onnx_path = compiled_dit_w8a8.export_onnx(tmp_path / "trt.onnx", target="tensorrt")
    engine = build_engine(onnx_path, tmp_path / "dit.plan", batch=(1, 4, 8))
    kwargs = dit_batches[6][1]
    reference = OrtModel(onnx_path)(**kwargs).sample
    out = TensorRTModel(engine)(**kwargs)
    assert type(out).__name__ == "Transformer2DModelOutput" and out.sample.is_cuda
    assert sqnr_db(reference, out.sample.cpu()) >= 30
    for batch in (1, 8):                                       # the ends of the optimisation profile
        small = {k: v[:1].repeat(batch, *[1] * (v.dim() - 1)) for k, v in kwargs.items()}
        assert TensorRTModel(engine)(**small).sample.shape[0] == batch
