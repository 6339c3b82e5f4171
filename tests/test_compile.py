"""compile() end to end, and the errors a user must get before work is wasted."""

import copy

import pytest
import torch

import ditq_compiler as dq
from ditq_compiler.quant import sqnr_db


def snapshot(model):
    return ({k: v.clone() for k, v in model.state_dict().items()},
            [m.training for m in model.modules()])


def assert_unchanged(model, snap):
    state, modes = snap
    now = model.state_dict()
    assert now.keys() == state.keys()
    assert all(torch.equal(now[k], state[k]) for k in state)
    assert [m.training for m in model.modules()] == modes


def test_user_model_is_bitwise_unchanged_including_mode(dit_batches):
    from ditq_compiler.toy import small_dit

    model = small_dit().train()  # a model left in training mode must stay there
    snap = snapshot(model)
    dq.compile(model, "w8a8-minmax", calibration=dit_batches[:2], progress=False)
    assert_unchanged(model, snap)


def test_unet_with_attention_all_convs_and_attention_linears_quantized(unet, unet_batches):
    compiled = dq.compile(unet, "w8a8", calibration=unet_batches, progress=False)
    roles = [layer.role for layer in compiled.layers]
    assert roles.count("conv") == 24  # all 25 convs but conv_out (final)
    assert roles.count("qkv") == 12 and roles.count("attn_out") == 4
    assert compiled.output_sqnr_db >= 30
    kwargs = unet_batches[0][1]
    assert sqnr_db(unet(**kwargs).sample, compiled(**kwargs).sample) >= 30


def test_compiled_model_keeps_the_call_signature(compiled_dit_w8a8, dit_batches):
    kwargs = dit_batches[0][1]
    by_keyword = compiled_dit_w8a8(**kwargs).sample
    positional = compiled_dit_w8a8(kwargs["hidden_states"], kwargs["timestep"], kwargs["class_labels"]).sample
    torch.testing.assert_close(by_keyword, positional)
    assert compiled_dit_w8a8(kwargs["hidden_states"][:1], kwargs["timestep"][:1],
                             kwargs["class_labels"][:1]).sample.shape == (1, 4, 8, 8)


def test_summary_lists_every_quantized_layer(compiled_dit_w8a8):
    text = compiled_dit_w8a8.summary()
    assert "12 of 23" in text
    for layer in compiled_dit_w8a8.layers:
        assert layer.name in text
    assert "SQNR" in text and "int8 sym per-channel" in text
    assert "ditq.quant_linear" in compiled_dit_w8a8.print_readable(print_output=False)


def test_empty_calibration_set_is_an_error(dit):
    with pytest.raises(dq.CalibrationError, match="calibration set is empty"):
        dq.compile(dit, "w8a8", calibration=[], progress=False)


def test_weight_only_recipe_needs_no_calibration(dit):
    recipe = dq.Recipe.from_dict({"name": "w8", "activations": False})
    compiled = dq.compile(dit, recipe, progress=False)
    assert len(compiled.layers) == 12 and compiled.output_sqnr_db is None


def test_non_finite_calibration_input_names_the_input(dit, dit_batches):
    kwargs = dict(dit_batches[0][1])
    kwargs["hidden_states"] = kwargs["hidden_states"].clone()
    kwargs["hidden_states"][0, 0, 0, 0] = float("nan")
    with pytest.raises(dq.CalibrationError, match="batch 1: input 'hidden_states'"):
        dq.compile(dit, "w8a8", calibration=[dit_batches[0], ((), kwargs)], progress=False)


class SqrtMLP(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = torch.nn.Linear(8, 8), torch.nn.Linear(8, 8)

    def forward(self, x, timestep):
        return self.fc2(torch.sqrt(self.fc1(x)))  # NaN wherever fc1 is negative


def test_calibration_producing_nan_names_the_node():
    batches = [((torch.randn(4, 8), torch.tensor([1, 2, 3, 4])), {})]
    recipe = dq.Recipe.from_dict({"name": "all", "quantize_roles": ["patch_embed", "final"]})
    with pytest.raises(dq.CalibrationError, match=r"batch 0, sample 0 \(timestep 1\): node 'sqrt'.*NaN/Inf"):
        dq.compile(SqrtMLP(), recipe, calibration=batches, progress=False)


def test_recipe_selecting_no_layer_is_an_error(dit, dit_batches):
    recipe = dq.Recipe.from_dict({"name": "convs-only", "quantize_roles": ["conv"]})
    with pytest.raises(dq.RecipeError, match="selects no layer.*roles.*qkv"):
        dq.compile(dit, recipe, calibration=dit_batches[:1], progress=False)


def test_model_that_does_not_export_is_an_error():
    class Branchy(SqrtMLP):
        def forward(self, x, timestep):
            return self.fc1(x) if x.mean() > 0 else x

    with pytest.raises(dq.CaptureError, match="Branchy"):
        dq.compile(Branchy(), "w8a8", calibration=[((torch.randn(2, 8), torch.tensor([1, 2])), {})],
                   progress=False)


def test_unknown_backend_is_an_error(dit):
    with pytest.raises(ValueError, match="backend"):
        dq.compile(dit, "w8a8", backend="tpu")


def test_compile_twice_gives_identical_results(dit, dit_batches):
    a = dq.compile(copy.deepcopy(dit), "w8a8-minmax", calibration=dit_batches[:2], progress=False)
    b = dq.compile(dit, "w8a8-minmax", calibration=dit_batches[:2], progress=False)
    kwargs = dit_batches[3][1]
    assert torch.equal(a(**kwargs).sample, b(**kwargs).sample)
