"""decompose_attention: exact on diffusers DiT, PixArt and UNet2DCondition attention (self and cross), masks,
structure, the negative cases, re-export and ONNX Runtime."""

import copy
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import fx

from ditq_compiler import zoo
from ditq_compiler.capture import auto_example_inputs, capture
from ditq_compiler.calibration.data import flat_inputs
from ditq_compiler.graph import analyse
from ditq_compiler.passes.decompose_attention import SDPA, DecomposeAttention
from ditq_compiler.pipeline import PassPipeline
from ditq_compiler.toy import small_pixart, small_unet_condition
from ditq_compiler import meta

aten = torch.ops.aten


def _decomposed(model, example=None):
    captured = capture(model, example)
    original = copy.deepcopy(captured.graph_module)
    result = PassPipeline([DecomposeAttention()], debug=True)(captured.graph_module)
    return captured, original, result.graph_module, result.modified


def _count(gm, target):
    return sum(1 for n in gm.graph.nodes if n.op == "call_function" and n.target is target)


def _max_relative_error(a, b):
    return float((a - b).abs().max() / a.abs().max())


def _outputs(gm, captured, inputs):
    with torch.no_grad():
        return torch.utils._pytree.tree_leaves(fx.Interpreter(gm).run(*flat_inputs(captured.bind((), inputs))))[0]


@pytest.mark.parametrize("factory, attentions, cross", [
    (lambda: zoo.load("dit-digits"), 6, 0),
    (small_pixart, 2, 1),
    (small_unet_condition, 8, 4),
])
def test_exact_on_diffusers_attention_including_cross_attention(factory, attentions, cross):
    model = factory()
    captured, original, gm, modified = _decomposed(model)
    sdpa = [n for n in original.graph.nodes if n.op == "call_function" and n.target is SDPA]
    assert modified and len(sdpa) == attentions
    assert sum(n.args[0].meta["val"].shape[-2] != n.args[1].meta["val"].shape[-2] for n in sdpa) == cross
    assert _count(gm, SDPA) == 0
    assert _count(gm, aten.softmax.int) == attentions and _count(gm, aten.matmul.default) == 2 * attentions
    marks = [meta.get(n).matmul for n in gm.graph.nodes if meta.get(n).matmul]
    assert marks == ["attn_scores", "attn_value"] * attentions
    for seed in range(2):
        torch.manual_seed(seed)
        inputs = auto_example_inputs(model, batch_size=3)
        reference = _outputs(original, captured, inputs)
        assert _max_relative_error(reference, _outputs(gm, captured, inputs)) < 1e-5
    # the analysis now sees the post-softmax sites, and the roles do not change
    before = analyse(original, captured.sample_input, captured.timestep_input)
    after = analyse(gm, captured.sample_input, captured.timestep_input)
    assert {i.name: i.role for i in before.layers.values()} == {i.name: i.role for i in after.layers.values()}
    assert list(after.sites.values()).count("post_softmax") == attentions


class MaskedAttention(torch.nn.Module):
    """SDPA with each optional argument: boolean and float masks, causal, an explicit scale."""

    def forward(self, q, k, v, bool_mask, float_mask):
        return (F.scaled_dot_product_attention(q, k, v, attn_mask=bool_mask)
                + F.scaled_dot_product_attention(q, k, v, attn_mask=float_mask, scale=0.3)
                + F.scaled_dot_product_attention(q, q, v[:, :, :5], is_causal=True))


def test_masks_causal_and_scale_are_exact():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 5, 8, generator=g) for _ in range(3))
    bool_mask = torch.rand(5, 5, generator=g) > 0.3
    bool_mask[:, 0] = True                                  # no fully masked row
    inputs = dict(q=q, k=k, v=v, bool_mask=bool_mask, float_mask=torch.randn(5, 5, generator=g))
    captured, original, gm, modified = _decomposed(MaskedAttention(), inputs)
    assert modified and _count(gm, SDPA) == 0 and _count(gm, aten.softmax.int) == 3
    assert _count(gm, aten.masked_fill.Scalar) == 2 and _count(gm, aten.add.Tensor) >= 1
    assert _max_relative_error(MaskedAttention()(**inputs), _outputs(gm, captured, inputs)) < 1e-5


def test_a_graph_without_attention_is_unchanged():
    class MLP(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(8, 8)

        def forward(self, x, timestep):
            return torch.softmax(self.fc(x), -1) + timestep[:, None]

    inputs = dict(x=torch.randn(2, 8), timestep=torch.rand(2))
    captured, original, gm, modified = _decomposed(MLP(), inputs)
    assert not modified and str(gm.graph) == str(original.graph)


def test_dropout_and_grouped_query_attention_are_refused_with_the_node_name():
    class Dropout(torch.nn.Module):
        def forward(self, q, k, v):
            return F.scaled_dot_product_attention(q, k, v, dropout_p=0.1)

    qkv = dict(q=torch.randn(1, 2, 4, 8), k=torch.randn(1, 2, 4, 8), v=torch.randn(1, 2, 4, 8))
    captured = capture(Dropout(), qkv)
    with pytest.raises(ValueError, match="attention node 'scaled_dot_product_attention' has dropout_p=0.1"):
        DecomposeAttention()(captured.graph_module)


def test_decomposed_graph_reexports_and_runs_in_onnx_runtime():
    import onnx
    import onnxruntime as ort

    model = zoo.load("dit-digits")
    captured, _, gm, _ = _decomposed(model)
    inputs = captured.bind((), auto_example_inputs(model, batch_size=2))
    program = torch.export.export(gm, (), inputs)
    assert _count(program.graph_module, SDPA) == 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        onnx_model = torch.onnx.export(program, (), kwargs=inputs, dynamo=True, opset_version=21,
                                       verbose=False).model_proto
    onnx.checker.check_model(onnx_model)
    assert sum(node.op_type == "Softmax" for node in onnx_model.graph.node) == 6
    session = ort.InferenceSession(onnx_model.SerializeToString(), providers=["CPUExecutionProvider"])
    feeds = {i.name: inputs[i.name].numpy() for i in session.get_inputs()}
    out = session.run(None, feeds)[0]
    reference = model(**inputs).sample.detach().numpy()
    assert np.abs(out - reference).max() / np.abs(reference).max() < 1e-5
