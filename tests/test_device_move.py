"""A compiled model moves between devices: the captured graph's ``device=`` arguments follow it."""

from __future__ import annotations

import pytest
import torch

import ditq_compiler as dq

# TQ-DiT's sites (quantized attention matmuls, two-region quantizers, time-group tables indexed in the
# graph) with a cheap search, and RobuQ's online Hadamard rotations with per-token scales
TQ_DIT = {"name": "tq-dit-small", "weights": {"bits": 8, "granularity": "channel"},
          "activations": {"bits": 8, "symmetric": False}, "attention": {"matmuls": True},
          "scale_search": {"metric": "mse", "rounds": 1, "eq_n": 4},
          "multi_region": {"post_softmax": True, "post_gelu": True},
          "time_groups": {"groups": 2, "sites": ["post_softmax", "post_gelu", "linear_inputs", "attention_operands"]}}
RECIPES = {"w8a8-minmax": "w8a8-minmax", "tq-dit": TQ_DIT, "robuq-w4a4": "robuq-w4a4"}


def _fresh(dit, dit_batches, recipe):  # never move the session fixture: other tests use it on the CPU
    recipe = dq.Recipe.from_dict(RECIPES[recipe]) if isinstance(RECIPES[recipe], dict) else dq.Recipe.load(recipe)
    return dq.compile(dit, recipe, calibration=dit_batches, progress=False)


def _inputs(dit_batches, device):
    args, kwargs = dit_batches[0]
    move = lambda v: v.to(device) if isinstance(v, torch.Tensor) else v  # noqa: E731
    return [move(a) for a in args], {k: move(v) for k, v in kwargs.items()}


def _graph_devices(compiled):
    return {torch.device(n.kwargs["device"]) for n in compiled.graph_module.graph.nodes if "device" in n.kwargs}


@pytest.mark.parametrize("recipe", RECIPES)
def test_a_moved_model_runs_on_the_new_device_with_no_tensor_left_behind(recipe, dit, dit_batches):
    # the meta device has no data, so any constant or device= argument still on the CPU fails the call
    compiled = _fresh(dit, dit_batches, recipe)
    assert _graph_devices(compiled) == {torch.device("cpu")}   # the export names its device
    assert compiled.to("meta") is compiled
    assert _graph_devices(compiled) == {torch.device("meta")}
    args, kwargs = _inputs(dit_batches, "meta")
    out = compiled(*args, **kwargs)
    assert (out.sample if hasattr(out, "sample") else out[0]).device.type == "meta"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("recipe", RECIPES)
def test_cuda_matches_cpu(recipe, dit, dit_batches):
    compiled = _fresh(dit, dit_batches, recipe)
    args, kwargs = _inputs(dit_batches, "cpu")
    expected = compiled(*args, **kwargs).sample
    args, kwargs = _inputs(dit_batches, "cuda")
    got = compiled.cuda()(*args, **kwargs).sample.cpu()
    # different kernels round differently; a flipped activation code costs one step, so compare by SQNR
    sqnr = 10 * torch.log10(expected.pow(2).mean() / (got - expected).pow(2).mean().clamp_min(1e-30))
    assert float(sqnr) >= 40.0
    args, kwargs = _inputs(dit_batches, "cpu")
    assert torch.equal(compiled.cpu()(*args, **kwargs).sample, expected)
