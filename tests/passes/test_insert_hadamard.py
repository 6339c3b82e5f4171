"""insert_hadamard: exact on real models (hadamard-only >= 80 dB), where rotations go, must-not-fire cases,
and the rotated graph re-exports with the rotation as an explicit op."""

import copy

import pytest
import torch
from torch import nn

import ditq_compiler as dq
from ditq_compiler import zoo
from ditq_compiler.capture import auto_example_inputs, capture
from ditq_compiler.graph import analyse
from ditq_compiler.passes.insert_hadamard import InsertHadamard
from ditq_compiler.quant import sqnr_db
from ditq_compiler.toy import small_pixart, small_unet_condition

HADAMARD = torch.ops.ditq.hadamard.default


def _output(result):
    return result.sample if hasattr(result, "sample") else result[0]


@pytest.fixture(scope="module")
def dit_digits():
    return zoo.load("dit-digits")


@pytest.mark.parametrize("factory", ["dit-digits", "pixart", "unet-condition"])
def test_hadamard_only_equals_fp_to_80_db(factory, dit_digits):
    factories = {"dit-digits": lambda: dit_digits, "pixart": small_pixart, "unet-condition": small_unet_condition}
    model = factories[factory]()
    inputs = auto_example_inputs(model, batch_size=4)
    compiled = dq.compile(model, "hadamard-only", calibration=[((), inputs)], progress=False)
    assert compiled.rotations and not compiled.layers            # rotated, nothing quantized
    with torch.no_grad():
        reference, rotated = _output(model(**inputs)), _output(compiled(**inputs))
    assert sqnr_db(reference, rotated) >= 80
    assert compiled.output_sqnr_db >= 80                         # the summary's figure is against FP too
    assert "Hadamard rotations" in compiled.summary()


_CAPTURED = {}


def _rotated(model, roles=("qkv", "attn_out", "fc1", "fc2"), fuse=True):
    if id(model) not in _CAPTURED:     # capture each model once; every variant rotates a copy
        inputs = auto_example_inputs(model, batch_size=2)
        captured = capture(model, ((), inputs))
        analysis = analyse(captured.graph_module, captured.sample_input, captured.timestep_input)
        _CAPTURED[id(model)] = (model, captured, analysis, captured.bind((), inputs))
    _, captured, analysis, bound = _CAPTURED[id(model)]
    gm = copy.deepcopy(captured.graph_module)
    names = {n: info.name for n, info in analysis.layers.items()}
    rotate = InsertHadamard({n: i for n, i in analysis.layers.items() if i.role in roles}, names, fuse=fuse)
    rotate(gm)
    with torch.no_grad():
        return rotate, gm, captured.graph_module(**bound)[0], gm(**bound)[0]


def test_dit_structure_online_where_adaln_or_gelu_intervene_per_head_into_to_v(dit_digits):
    rotate, gm, before, after = _rotated(dit_digits)
    placement = {r.layer: r.placement for r in rotate.rotations}
    assert len(placement) == 36
    assert sqnr_db(before, after) >= 100
    # per block: one node shared by q, k, v (adaLN in front), fc1 (adaLN), fc2 (GELU), attn_out's cross-head part
    assert sum(1 for n in gm.graph.nodes if n.target is HADAMARD) == 6 * 4
    block = "transformer_blocks.3."
    for layer in ("attn1.to_q", "attn1.to_k", "attn1.to_v", "ff.net.0.proj", "ff.net.2"):
        assert placement[block + layer] == "online"
    assert placement[block + "attn1.to_out.0"] == (f"per-head H32 fused into {block}attn1.to_v + online H4 "
                                                   "across heads")
    shared = [n for n in gm.graph.nodes if n.target is HADAMARD and len(n.users) == 3]
    assert len(shared) == 6                                      # q, k and v read one rotation


def test_all_online_computes_the_same_function(dit_digits):
    rotate, gm, before, after = _rotated(dit_digits, fuse=False)
    assert {r.placement for r in rotate.rotations} == {"online"}
    assert sum(1 for n in gm.graph.nodes if n.target is HADAMARD) == 6 * 4
    assert sqnr_db(before, after) >= 100


@pytest.fixture(scope="module")
def pixart():
    return small_pixart()


def test_pixart_cross_attention_k_v_rotation_fuses_into_the_caption_projection(pixart):
    rotate, gm, before, after = _rotated(pixart)
    placement = {r.layer: r.placement for r in rotate.rotations}
    for layer in ("attn2.to_k", "attn2.to_v"):
        assert placement[f"transformer_blocks.0.{layer}"] == "fused into caption_projection.linear_2"
    assert placement["transformer_blocks.0.attn2.to_q"] == "online"   # its input also feeds the residual
    assert sqnr_db(before, after) >= 100
    online = sum(1 for n in gm.graph.nodes if n.target is HADAMARD)
    _, gm_online, _, _ = _rotated(pixart, fuse=False)
    assert sum(1 for n in gm_online.graph.nodes if n.target is HADAMARD) == online + 1


class _Chain(nn.Module):
    """x -> a -> b, optionally with a's output also added to b's (then a rotation cannot move into a)."""

    def __init__(self, residual: bool):
        super().__init__()
        self.a, self.b, self.residual = nn.Linear(16, 32), nn.Linear(32, 32), residual

    def forward(self, x):
        h = self.a(x)
        return self.b(h) + h if self.residual else self.b(h)


@pytest.mark.parametrize("residual, placement", [(False, "fused into a"), (True, "online")])
def test_fuses_into_the_producer_only_if_nothing_else_reads_its_output(residual, placement):
    model = _Chain(residual).eval()
    x = torch.randn(3, 5, 16)
    captured = capture(model, ((x,), {}))
    gm = captured.graph_module
    layers = analyse(gm, captured.sample_input).layers
    b = {n: i for n, i in layers.items() if i.name == "b"}
    rotate = InsertHadamard(b, {n: i.name for n, i in layers.items()})
    rotate(gm)
    assert [r.placement for r in rotate.rotations] == [placement]
    assert sum(1 for n in gm.graph.nodes if n.target is HADAMARD) == (1 if residual else 0)
    torch.testing.assert_close(gm(x=x), model(x), atol=1e-5, rtol=1e-5)


def test_rotation_of_a_conv_or_an_unbuildable_width_names_the_layer(unet):
    inputs = auto_example_inputs(unet)
    captured = capture(unet, ((), inputs))
    layers = analyse(captured.graph_module, captured.sample_input, captured.timestep_input).layers
    convs = {n: i for n, i in layers.items() if i.role == "conv"}
    with pytest.raises(ValueError, match="is a conv2d: Hadamard rotation is defined for linears"):
        InsertHadamard(convs, {})(captured.graph_module)

    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(6, 4)

        def forward(self, x):
            return self.proj(x)

    captured = capture(Odd().eval(), ((torch.randn(2, 6),), {}))
    layers = analyse(captured.graph_module, captured.sample_input).layers
    with pytest.raises(ValueError, match="layer 'proj': no Hadamard matrix of order 6"):
        InsertHadamard(layers, {})(captured.graph_module)


def test_roles_the_model_does_not_have_leave_the_graph_alone(dit_digits):
    rotate, gm, before, after = _rotated(dit_digits, roles=("conv",))    # DiT has no 'conv' layers
    assert rotate.rotations == [] and sum(1 for n in gm.graph.nodes if n.target is HADAMARD) == 0
    torch.testing.assert_close(before, after, rtol=0, atol=0)


def test_rotated_quantized_graph_reexports_with_the_rotation_as_an_op(dit, dit_batches):
    compiled = dq.compile(dit, "robuq-w4a4", calibration=dit_batches[:2], progress=False)
    args, kwargs = dit_batches[0]
    inputs = compiled.captured.bind(args, kwargs)
    program = torch.export.export(compiled.graph_module, (), inputs)
    ops = [str(n.target) for n in program.graph.nodes if n.op == "call_function"]
    assert ops.count("ditq.hadamard.default") == 2 * 4 and ops.count("ditq.quant_linear.default") == 12
    blocks = [n for n in program.graph.nodes if n.op == "call_function" and str(n.target) == "ditq.hadamard.default"]
    assert all(a is None or a.op == "get_attr" or a.op == "placeholder" for n in blocks for a in n.args[1:])
    torch.testing.assert_close(program.module()(**inputs)[0], compiled(*args, **kwargs).sample)


def test_heads_without_a_hadamard_order_keep_the_full_rotation_online():
    from diffusers import DiTTransformer2DModel

    torch.manual_seed(0)   # 6 heads x 32: width 192 = H12 x H16 exists, but no Hadamard matrix of order 6
    model = DiTTransformer2DModel(num_attention_heads=6, attention_head_dim=32, in_channels=4, num_layers=1,
                                  sample_size=8, patch_size=2, num_embeds_ada_norm=10).eval()
    rotate, gm, before, after = _rotated(model)
    placement = {r.layer: r.placement for r in rotate.rotations}
    assert placement["transformer_blocks.0.attn1.to_out.0"] == "online"
    assert {r.construction for r in rotate.rotations if r.width == 192} == {"H192 = H12 x H16"}
    assert sqnr_db(before, after) >= 100
