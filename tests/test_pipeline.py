import pytest
import torch
from torch import fx
from torch.fx.passes.infra.pass_base import PassResult

from ditq_compiler.pipeline import PassError, PassPipeline, verify_graph


def graph_module():
    class M(torch.nn.Module):
        def forward(self, x):
            return torch.relu(x) + 1

    return torch.export.export(M(), (torch.randn(3),)).module()


def noop(gm):
    return PassResult(gm, False)


def explode(gm):
    raise ValueError("boom")


def drop_meta(gm):
    for node in gm.graph.nodes:
        node.meta.pop("val", None)
    return PassResult(gm, True)


def test_pipeline_names_failing_pass_and_the_ones_before_it():
    with pytest.raises(PassError, match=r"pass 'explode' failed \(after: noop\): ValueError: boom"):
        PassPipeline([noop, explode])(graph_module())


def test_debug_mode_verifies_between_passes():
    gm = graph_module()
    PassPipeline([drop_meta], debug=False)(graph_module())  # not checked without debug
    with pytest.raises(PassError, match="drop_meta.*meta\\['val'\\]"):
        PassPipeline([drop_meta, noop], debug=True)(gm)


def test_verify_graph_finds_dangling_attribute():
    gm = graph_module()
    with gm.graph.inserting_before(next(iter(gm.graph.nodes))), pytest.warns(UserWarning):
        gm.graph.get_attr("missing_weight")
    with pytest.raises(ValueError, match="missing_weight"):
        verify_graph(gm)


def test_verify_graph_accepts_exported_graph():
    verify_graph(graph_module())
    assert isinstance(graph_module(), fx.GraphModule)
