"""quantize_linears: structure, numerics, a case where it must not fire, validity after re-export."""

import torch

from ditq_compiler.calibration.params import QuantParams

import ditq_compiler as dq
from ditq_compiler.annotate import annotate
from ditq_compiler.capture import capture
from ditq_compiler.graph import analyse
from ditq_compiler.passes.quantize_linears import QuantizeLinears
from ditq_compiler.quant import sqnr_db
from ditq_compiler import meta


def _targets(gm, op):
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target == op]


def test_structure_all_attention_and_mlp_linears_replaced(compiled_dit_w8a8):
    gm = compiled_dit_w8a8.graph_module
    quantized = _targets(gm, torch.ops.ditq.quant_linear.default)
    assert len(quantized) == 12
    assert {meta.get(n).annotation.role for n in quantized} == {"qkv", "attn_out", "fc1", "fc2"}
    # embedders, adaLN, patch embed and final layer stay float: 22 - 12 linears + 1 conv
    assert len(_targets(gm, torch.ops.aten.linear.default)) == 10
    for node in quantized:
        codes = getattr(gm, node.args[1].target)
        assert codes.dtype == torch.int8
        assert -128 <= int(codes.min()) and int(codes.max()) <= 127


def test_float_weights_of_quantized_layers_are_dropped(compiled_dit_w8a8):
    state = compiled_dit_w8a8.graph_module.state_dict()
    assert not any(k.endswith("attn1.to_q.weight") for k in state)
    assert any(k.endswith("norm1.linear.weight") for k in state)  # adaLN stays float


def test_numerics_w8a8_dit_output_sqnr(compiled_dit_w8a8, dit, dit_batches):
    assert compiled_dit_w8a8.output_sqnr_db >= 30
    kwargs = dit_batches[0][1]
    assert sqnr_db(dit(**kwargs).sample, compiled_dit_w8a8(**kwargs).sample) >= 30
    assert all(layer.sqnr_db >= 25 for layer in compiled_dit_w8a8.layers)


def test_does_not_fire_without_annotations(dit, dit_batches):
    captured = capture(dit, dit_batches[0])
    before = [n.target for n in captured.graph_module.graph.nodes]
    result = QuantizeLinears(QuantParams())(captured.graph_module)
    assert not result.modified
    assert [n.target for n in result.graph_module.graph.nodes] == before


def test_weight_only_override_leaves_activations_float(dit, dit_batches):
    recipe = dq.Recipe.from_dict({"name": "w8-fc2", "activations": False,
                                  "quantize_roles": ["fc2"]})
    captured = capture(dit, dit_batches[0])
    analysis = analyse(captured.graph_module, captured.sample_input, captured.timestep_input)
    annotate(captured.graph_module, analysis, recipe)
    gm = QuantizeLinears(QuantParams())(captured.graph_module).graph_module
    nodes = _targets(gm, torch.ops.ditq.quant_linear.default)
    assert len(nodes) == 2 and all(n.args[5] is None and n.args[7] == 0 for n in nodes)


def test_rewritten_graph_reexports_with_torch_export(compiled_dit_w8a8, dit_batches):
    kwargs = dit_batches[0][1]
    program = torch.export.export(compiled_dit_w8a8.graph_module, (), kwargs)
    ops = {str(n.target) for n in program.graph.nodes if n.op == "call_function"}
    assert "ditq.quant_linear.default" in ops
    torch.testing.assert_close(program.module()(**kwargs).sample, compiled_dit_w8a8(**kwargs).sample)
