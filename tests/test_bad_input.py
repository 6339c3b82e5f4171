"""Bad input: each case fails with a message that names what is wrong, before work is wasted,
and the user's model is left as it was."""

import pytest
import torch
from torch.export import Dim

import ditq_compiler as dq
from tests.test_compile import assert_unchanged, snapshot


class TimedMLP(torch.nn.Module):
    """x -> fc2(act(fc1(x))) with a timestep input; ``act`` chooses what reaches fc2."""

    def __init__(self, act=torch.nn.functional.gelu):
        super().__init__()
        torch.manual_seed(0)
        self.fc1, self.fc2, self.act = torch.nn.Linear(8, 16), torch.nn.Linear(16, 8), act

    def forward(self, x, timestep):
        return self.fc2(self.act(self.fc1(x)))


# the toy models here are too small for the structural roles of a DiT: quantize every layer
ALL = dq.Recipe.from_dict({"name": "all-layers", "quantize_roles": list(dq.recipe.ROLES)})


def _batches(count=2):
    g = torch.Generator().manual_seed(0)
    return [((torch.randn(3, 8, generator=g), torch.tensor([900, 500, 10])), {}) for _ in range(count)]


def test_nan_names_node_batch_sample_and_timestep():
    model = TimedMLP(torch.sqrt)   # NaN wherever fc1 is negative
    with pytest.raises(dq.CalibrationError, match=r"batch 0, sample 0 \(timestep 900\): node 'sqrt'.*NaN/Inf"):
        dq.compile(model, ALL, calibration=_batches(), progress=False)


def test_all_zero_activation_names_the_layer_and_timesteps():
    model = TimedMLP(lambda h: h * 0)
    snap = snapshot(model)
    with pytest.raises(dq.CalibrationError, match=r"layer 'fc2'.*exactly zero on every calibration sample.*"
                                                  r"timesteps 10\.\.900.*activations: false"):
        dq.compile(model, ALL, calibration=_batches(), progress=False)
    assert_unchanged(model, snap)
    # the advice works: keeping that input in float compiles
    recipe = dq.Recipe.from_dict({"name": "fc2-float-input", "quantize_roles": list(dq.recipe.ROLES),
                                  "overrides": [{"name": "fc2", "activations": False}]})
    dq.compile(model, recipe, calibration=_batches(), progress=False)


def test_a_call_at_another_latent_size_names_input_dim_and_size(compiled_dit_w8a8, dit_batches):
    kwargs = dict(dit_batches[0][1], hidden_states=torch.randn(4, 4, 9, 9))
    with pytest.raises(ValueError, match=r"input 'hidden_states' has size 9 in dim 2.*\(any, 4, 8, 8\).*fixed at 8"):
        compiled_dit_w8a8(**kwargs)
    kwargs = dict(dit_batches[0][1], hidden_states=torch.randn(4, 4, 8))
    with pytest.raises(ValueError, match=r"'hidden_states' has 3 dims"):
        compiled_dit_w8a8(**kwargs)


def test_a_dynamic_latent_size_the_model_cannot_take_is_refused_with_the_fix(dit, dit_batches):
    snap = snapshot(dit)
    with pytest.raises(dq.CaptureError, match=r"(?s)dynamic_shapes: DiTTransformer2DModel.*'hidden_states' dims \[2\].*"
                                              r"torch suggests: h = 8"):
        dq.compile(dit, "w8a8", calibration=dit_batches[:1], progress=False,
                   dynamic_shapes={"hidden_states": {2: Dim("h", min=7, max=9)}})
    with pytest.raises(dq.CaptureError, match=r"dynamic_shapes\['latents'\].*no tensor input 'latents'"):
        dq.compile(dit, "w8a8", calibration=dit_batches[:1], progress=False, dynamic_shapes={"latents": {2: Dim.AUTO}})
    with pytest.raises(dq.CaptureError, match=r"dynamic_shapes\['hidden_states'\]\[7\]: .*dims 0\.\.3"):
        dq.compile(dit, "w8a8", calibration=dit_batches[:1], progress=False,
                   dynamic_shapes={"hidden_states": {7: Dim.AUTO}})
    assert_unchanged(dit, snap)


def test_data_dependent_control_flow_names_the_line_and_suggests_cond_and_check():
    class Branchy(TimedMLP):
        def forward(self, x, timestep):
            if x.mean() > 0:   # a Python branch on a tensor value
                return self.fc1(x)
            return x

    with pytest.raises(dq.CaptureError, match=r"(?s)Branchy.*test_bad_input\.py:\d+.*torch\.cond.*torch\._check"):
        dq.compile(Branchy(), ALL, calibration=_batches(), progress=False)


class WithConv1d(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.mix = torch.nn.Conv1d(8, 8, 3, padding=1)
        self.weight = torch.nn.Parameter(torch.randn(8, 8))
        self.fc = torch.nn.Linear(8, 8)

    def forward(self, x, timestep):
        h = self.mix(x.transpose(1, 2)).transpose(1, 2)
        return self.fc(h @ self.weight)


def test_strict_mode_lists_every_unsupported_layer_with_its_closest_role():
    batches = [((torch.randn(2, 5, 8), torch.tensor([3, 4])), {})]
    with pytest.raises(dq.UnsupportedLayerError) as info:
        dq.compile(WithConv1d(), ALL, calibration=batches, progress=False, strict=True)
    message = str(info.value)
    assert "2 layer(s)" in message
    assert "'mix' (node conv1d, aten.conv1d): closest supported role 'conv'" in message
    assert "aten.matmul): closest supported role 'linear', which needs aten.linear" in message
    # without strict they stay in float and the summary says so
    compiled = dq.compile(WithConv1d(), ALL, calibration=batches, progress=False)
    assert [u.op for u in compiled.unsupported] == ["conv1d", "matmul"]
    assert "left in float, no quantized lowering (2): mix (aten.conv1d)" in compiled.summary()


def test_attention_matmuls_are_not_unsupported_layers(compiled_dit_w8a8):
    assert compiled_dit_w8a8.unsupported == []


@pytest.mark.parametrize("cast", [lambda m: m.half(), lambda m: m.bfloat16(), lambda m: m.double(),
                                  lambda m: m.to(torch.float16), lambda m: m.to("cpu", torch.bfloat16),
                                  lambda m: m.to(dtype=torch.float16), lambda m: m.type(torch.float16)],
                         ids=["half", "bfloat16", "double", "to-dtype", "to-device-dtype", "to-kw", "type"])
def test_casting_a_compiled_model_is_refused_with_an_explanation(cast, compiled_dit_w8a8):
    compiled = compiled_dit_w8a8
    before = {k: v.clone() for k, v in compiled.state_dict().items()}
    with pytest.raises(TypeError, match="integer weight codes.*silently dequantize"):
        cast(compiled)
    after = compiled.state_dict()
    assert all(torch.equal(before[k], after[k]) and before[k].dtype == after[k].dtype for k in before)
    assert compiled.to("cpu") is compiled          # moving it is fine


def test_an_override_that_matches_no_layer_warns_with_the_model_s_roles_and_names():
    for override, selector in (({"name": "fc3", "activations": False}, r"name 'fc3'"),
                               ({"role": "qkv", "quantize": False}, r"role 'qkv'")):
        recipe = dq.Recipe.from_dict({**ALL.to_dict(), "overrides": [override]})
        with pytest.warns(dq.RecipeWarning, match=rf"overrides\[0\] \({selector}\) matches no layer of the model, "
                                                  r"so it changes nothing. The model's roles: "
                                                  r"\['fc2', 'patch_embed'\]; its layers: fc1, fc2"):
            dq.compile(TimedMLP(), recipe, calibration=_batches(), progress=False, cache_dir=False)
        with pytest.raises(dq.RecipeError, match=rf"overrides\[0\] \({selector}\) matches no layer"):
            dq.compile(TimedMLP(), recipe, calibration=_batches(), progress=False, cache_dir=False, strict=True)


def test_layer_names_are_summarised_by_pattern():
    from ditq_compiler.annotate import layer_names_summary
    from ditq_compiler.graph import LayerInfo

    def layer(name):
        return LayerInfo(node=name, name=name, op="linear", role="qkv", timestep_dependent=False)

    layers = [layer(f"transformer_blocks.{i}.attn1.to_{p}") for i in range(28) for p in "qkv"] + [layer("proj_out_2")]
    assert layer_names_summary(layers) == ("transformer_blocks.*.attn1.to_q (x28), transformer_blocks.*.attn1.to_k "
                                           "(x28), transformer_blocks.*.attn1.to_v (x28), proj_out_2")


def test_a_calibration_batch_with_no_samples_is_named():
    x, t = _batches(1)[0][0]
    with pytest.raises(dq.CalibrationError, match=r"calibration batch 1: input 'args\[0\]' has no samples \(shape "
                                                  r"\(0, 8\)\); every batch needs at least one"):
        dq.compile(TimedMLP(), ALL, calibration=[((x, t), {}), ((x[:0], t[:0]), {})], progress=False)


@pytest.mark.parametrize("change, match", [
    (lambda x: x | {"hidden_states": x["hidden_states"].double()},
     r"input 'hidden_states' is torch.float64; the model was compiled for torch.float32 \(pass "
     r"hidden_states.to\(torch.float32\)\)"),
    (lambda x: x | {"hidden_states": x["hidden_states"].long()}, r"input 'hidden_states' is torch.int64; the model "
                                                                 r"was compiled for torch.float32"),
    (lambda x: x | {"class_labels": x["class_labels"] * 0 + 5000},
     r"input 'class_labels' holds 5000 \(element 0\); the model's embedding table \(node 'embedding\w*'\) has 11 "
     r"rows, so it takes 0..10"),
    (lambda x: {k: v[:0] for k, v in x.items()}, r"input 'hidden_states' has batch size 0 \(shape \(0, 4, 8, 8\)\); "
                                                 r"call the model with at least one sample"),
], ids=["float64-latent", "integer-latent", "label-out-of-range", "batch-0"])
def test_a_call_the_model_cannot_take_names_the_input_value_and_range(compiled_dit_w8a8, dit_batches, change, match):
    with pytest.raises(ValueError, match=rf"DiTTransformer2DModel: {match}"):
        compiled_dit_w8a8(**change(dit_batches[0][1]))


def test_integer_inputs_of_another_width_are_converted(compiled_dit_w8a8, dit_batches):
    x = dit_batches[0][1]
    narrow = x | {"class_labels": x["class_labels"].int(), "timestep": x["timestep"].int()}
    assert torch.equal(compiled_dit_w8a8(**narrow).sample, compiled_dit_w8a8(**x).sample)
