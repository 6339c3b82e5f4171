"""A compiled model is called like the original: every argument forward takes, and under torch.compile."""

import pytest
import torch

import ditq_compiler as dq


def test_return_dict_and_other_non_tensor_arguments(dit, compiled_dit_w8a8, dit_batches):
    x, t, y = (dit_batches[0][1][k] for k in ("hidden_states", "timestep", "class_labels"))
    (as_tuple,) = compiled_dit_w8a8(x, timestep=t, class_labels=y, return_dict=False)
    torch.testing.assert_close(as_tuple, compiled_dit_w8a8(x, t, y).sample)
    assert type(compiled_dit_w8a8(x, t, y, return_dict=True)) is type(dit(x, t, y))
    compiled_dit_w8a8(x, t, y, cross_attention_kwargs=None)                 # equal to the captured value
    with pytest.raises(TypeError, match="'cross_attention_kwargs' is {'scale': 0.5} in this call but was None"):
        compiled_dit_w8a8(x, t, y, cross_attention_kwargs={"scale": 0.5})
    with pytest.raises(TypeError, match="forward has no argument 'labels'"):
        compiled_dit_w8a8(x, t, labels=y)


def test_a_timestep_batch_other_than_the_latent_batch_names_the_input(compiled_dit_w8a8, dit_batches):
    kwargs = dict(dit_batches[0][1], timestep=torch.tensor([10, 20, 30]))
    with pytest.raises(ValueError, match=r"input 'timestep' has batch 3 .* but the sample 'hidden_states' has batch 4"):
        compiled_dit_w8a8(**kwargs)


@pytest.mark.parametrize("backend", ["torch", "torch-int8"])
def test_torch_compile_fullgraph_traces_the_compiled_model(dit, dit_batches, backend):
    compiled = dq.compile(dit, "w8a8", calibration=dit_batches[:1], backend=backend, progress=False)
    kwargs = dit_batches[3][1]
    expected = compiled(**kwargs).sample
    torch._dynamo.reset()
    traced = torch.compile(compiled, fullgraph=True, backend="aot_eager")     # Inductor: bench/torch_compile.py
    torch.testing.assert_close(traced(**kwargs).sample, expected, rtol=0, atol=1e-5)
    (as_tuple,) = traced(**kwargs, return_dict=False)
    torch.testing.assert_close(as_tuple, expected, rtol=0, atol=1e-5)
