"""W1A1: the binarizers' definitions, the trainable layer against the exported op, and the recipe rules."""

import pytest
import torch

import ditq_compiler as dq
from ditq_compiler.binary import (SCALE_MODES, activation_scale, binary_conv2d_reference, binary_linear_reference,
                                  signs)
from ditq_compiler.quant.spec import QuantSpec
from ditq_compiler.train.binary_layer import BinaryLayer, sign_ste

W1A1 = {"weights": {"bits": 1, "binarizer": "fpb"}, "activations": {"bits": 1, "binarizer": "fpb"}}


def test_sign_is_plus_one_at_zero_and_its_gradient_is_clipped():
    u = torch.tensor([-2.0, -0.5, 0.0, 0.5, 2.0], requires_grad=True)
    y = sign_ste(u)
    assert y.tolist() == [-1.0, -1.0, 1.0, 1.0, 1.0]
    y.sum().backward()
    assert u.grad.tolist() == [0.0, 1.0, 1.0, 1.0, 0.0]
    assert signs(torch.tensor([0.0, 1.0]), torch.tensor([0.0, 2.0])).tolist() == [1.0, -1.0]


def test_the_clipped_activation_scale_is_fpb_eq_14_with_the_absolute_value():
    x = torch.tensor([[[1.0, -4.0], [3.0, 2.0]]])              # (sample, 2 tokens, 2 channels)
    mu_min, mu_max = torch.tensor([1.0, 0.5]), torch.tensor([0.5, 1.0])
    # channel 0 spans [1, 3]: clipped to [1, 1.5]; channel 1 spans [-4, 2]: clipped to [-2, 2]
    expected = torch.tensor([[[(1.0 + 2.0) / 2], [(1.5 + 2.0) / 2]]])
    torch.testing.assert_close(activation_scale(x, SCALE_MODES["clipped"], mu_min, mu_max), expected)
    torch.testing.assert_close(activation_scale(x, SCALE_MODES["mean_abs"]), x.abs().mean(-1, keepdim=True))


@pytest.mark.parametrize("binarizer", ["xnor", "react", "fpb"])
def test_a_trained_linear_layer_equals_the_op_it_is_exported_as(binarizer):
    torch.manual_seed(0)
    layer = BinaryLayer(torch.randn(6, 5), torch.randn(6), binarizer)
    with torch.no_grad():       # trained-looking parameters where the binarizer learns them
        for p in layer.scale_parameters():
            p.add_(0.1 * torch.randn_like(p))
    x = torch.randn(3, 4, 5)
    record = layer.learned("node").binary["node"]
    exported = binary_linear_reference(x, record["w_bits"], record["w_scale"], record["tau"], record["mu_min"],
                                       record["mu_max"], int(record["mode"]), layer.bias.detach())
    with torch.no_grad():
        torch.testing.assert_close(layer(x), exported, rtol=1e-6, atol=1e-6)
    assert set(record["w_bits"].unique().tolist()) <= {0, 1} and record["w_bits"].dtype == torch.uint8


def test_a_trained_conv_layer_equals_the_op_it_is_exported_as_with_zero_padding_counting_zero():
    torch.manual_seed(1)
    layer = BinaryLayer(torch.randn(4, 3, 3, 3), None, "fpb", ([1, 1], [1, 1], [1, 1], 1))
    with torch.no_grad():
        for p in layer.scale_parameters():
            p.add_(0.1 * torch.randn_like(p))
    x = torch.randn(2, 3, 5, 5)
    record = layer.learned("conv").binary["conv"]
    exported = binary_conv2d_reference(x, record["w_bits"], record["w_scale"], record["k"], record["tau"],
                                       record["mu_min"], record["mu_max"], int(record["mode"]), None, [1, 1],
                                       [1, 1], [1, 1], 1)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), exported, rtol=1e-6, atol=1e-6)
    # a corner pixel sees 4 of 9 kernel positions: its accumulator is bounded by 4 * channels, not 9 * channels
    acc = torch.nn.functional.conv2d(signs(x, record["tau"]), 1 - 2 * record["w_bits"].float(), None, 1, 1)
    assert acc[:, :, 0, 0].abs().max() <= 4 * 3


def test_only_the_fpb_binarizer_learns_offsets_bounds_and_k():
    names = {b: {n for n, p in BinaryLayer(torch.randn(4, 4), None, b).named_parameters() if p.requires_grad}
             for b in ("xnor", "react", "fpb")}
    assert names["xnor"] == {"weight"} and names["react"] == {"weight", "tau_x"}
    assert names["fpb"] == {"weight", "tau_w", "k", "tau_x", "mu_min", "mu_max"}


def test_quant_spec_and_recipe_rules_for_binary_layers():
    assert QuantSpec(1, binarizer="react").describe() == "binary react"
    with pytest.raises(ValueError, match="QuantSpec.binarizer: 1-bit quantization needs a binarizer"):
        QuantSpec(1)
    with pytest.raises(ValueError, match="QuantSpec.binarizer: applies to bits: 1 only"):
        QuantSpec(4, binarizer="fpb")
    with pytest.raises(dq.RecipeError, match=r"recipe\.activations\.bits: binary layers are W1A1"):
        dq.Recipe.from_dict({"weights": {"bits": 1, "binarizer": "xnor"}})
    with pytest.raises(dq.RecipeError, match=r"recipe\.activations\.binarizer: must be the weights' binarizer"):
        dq.Recipe.from_dict({**W1A1, "activations": {"bits": 1, "binarizer": "xnor"}})
    with pytest.raises(dq.RecipeError, match=r"recipe\.scale_search is not defined for binarized"):
        dq.Recipe.from_dict({**W1A1, "scale_search": {"metric": "mse"}})
    recipe = dq.Recipe.from_dict(W1A1)
    assert dq.Recipe.from_dict(recipe.to_dict()) == recipe
