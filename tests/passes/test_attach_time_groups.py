"""attach_time_groups: one group lookup from the timestep input, wired into every time-grouped quantizer."""

import warnings

import numpy as np
import pytest
import torch
from torch import fx

from ditq_compiler.calibration.time_groups import group_index
from ditq_compiler.passes.attach_time_groups import AttachTimeGroups
from ditq_compiler.passes.quantize_activations import QuantizeActivations
from ditq_compiler.passes.quantize_linears import QuantizeLinears
from ditq_compiler.pipeline import PassPipeline
from ditq_compiler import meta

ops = torch.ops.ditq
SITES = {"post_softmax", "post_gelu", "attention_operands"}


def _quantized(planned_dit, sites):
    captured, gm, annotations, plan, flat, searched = planned_dit(time_groups={"groups": 3, "sites": sorted(sites)})
    passes = [QuantizeActivations(plan.sites, searched.site_tables),
              AttachTimeGroups(searched.boundaries, captured.timestep_input),
              QuantizeLinears(searched)]
    return captured, PassPipeline(passes, debug=True)(gm).graph_module, plan, flat, searched


class _Groups(fx.Interpreter):
    """Records the group argument each time-grouped quantizer receives."""

    def __init__(self, gm):
        super().__init__(gm)
        self.groups = {}

    def run_node(self, node):
        if meta.get(node).time_grouped:
            self.groups[node.name] = self.env[node.args[1]].clone()
        return super().run_node(node)


def test_one_lookup_feeds_every_time_grouped_quantizer(planned_dit):
    captured, gm, plan, flat, searched = _quantized(planned_dit, SITES)
    lookups = [n for n in gm.graph.nodes if meta.get(n).time_group_index]
    assert len(lookups) == 1 and lookups[0].target is torch.ops.aten.sum.dim_IntList
    assert searched.boundaries.shape == (2,)
    grouped = [n for n in gm.graph.nodes if meta.get(n).time_grouped]
    # per block: q, k^T, v, P and the fc2 input
    assert len(grouped) == 10 and all(n.args[1] is lookups[0] for n in grouped)
    site_ops = (ops.quant_act.default, ops.quant_softmax_mrq.default, ops.quant_gelu_mrq.default)
    assert all(n.args[1] is None for n in gm.graph.nodes if n.target in site_ops and n not in grouped)
    timestep_position = [n.name for n in gm.graph.nodes if n.op == "placeholder"].index(captured.timestep_input)
    for batch in flat:
        recorder = _Groups(gm)
        recorder.run(*batch)
        expected = group_index(batch[timestep_position], searched.boundaries)
        assert len(set(expected.tolist())) > 1          # the random batch spans several groups
        for value in recorder.groups.values():
            assert torch.equal(value, expected)


def test_the_grouped_graph_reexports_with_a_dynamic_batch(planned_dit):
    captured, gm, _, flat, _ = _quantized(planned_dit, {"post_softmax"})
    names = [n.name for n in gm.graph.nodes if n.op == "placeholder"]
    inputs = dict(zip(names, flat[0], strict=True))
    program = torch.export.export(gm, (), inputs, dynamic_shapes={k: {0: torch.export.Dim.AUTO} for k in inputs})
    targets = [n.target for n in program.graph.nodes if n.op == "call_function"]
    assert targets.count(ops.quant_softmax_mrq.default) == 2 and torch.ops.aten.gt.Tensor in targets
    other = dict(zip(names, flat[1], strict=True))
    torch.testing.assert_close(program.module()(**other), gm(**other), rtol=0, atol=0)


def test_without_time_grouped_quantizers_the_graph_is_unchanged(planned_dit):
    captured, gm, annotations, plan, flat, searched = planned_dit(time_groups=None)
    gm = QuantizeActivations(plan.sites, searched.site_tables)(gm).graph_module
    before = str(gm.graph)
    assert AttachTimeGroups(torch.tensor([500.0]), captured.timestep_input)(gm).modified is False
    assert str(gm.graph) == before


def test_tables_that_do_not_match_the_groups_are_refused(planned_dit):
    captured, gm, annotations, plan, flat, searched = planned_dit(time_groups={"groups": 3, "sites": ["post_softmax"]})
    gm = QuantizeActivations(plan.sites, searched.site_tables)(gm).graph_module
    with pytest.raises(ValueError, match=r"has tables of \[3\] rows for 5 time groups"):
        AttachTimeGroups(torch.tensor([1.0, 2.0, 3.0, 4.0]), captured.timestep_input)(gm)
    with pytest.raises(ValueError, match="graph has no placeholder 'time'"):
        AttachTimeGroups(searched.boundaries, "time")(gm)


def test_the_group_lookup_lowers_to_onnx_and_runs_in_onnx_runtime(planned_dit):
    """The nodes the pass adds (unsqueeze, gt, sum) as their own graph: ONNX export, checker, ORT."""
    import onnx
    import onnxruntime as ort

    captured, gm, _, flat, searched = _quantized(planned_dit, {"post_softmax"})
    lookup = next(n for n in gm.graph.nodes if meta.get(n).time_group_index)
    graph, env = fx.Graph(), {}
    for node in gm.graph.nodes:
        if node.op == "placeholder" and node.name == captured.timestep_input:
            env[node] = graph.placeholder(node.name)
        elif node.name in {lookup.name, lookup.args[0].name, lookup.args[0].args[0].name,
                           lookup.args[0].args[1].name}:
            env[node] = graph.node_copy(node, lambda a: env[a])
    graph.output(env[lookup])
    lookup_module = fx.GraphModule(gm, graph)
    timesteps = torch.tensor([0, 333, 500, 999])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = torch.onnx.export(lookup_module, (timesteps,), dynamo=True, opset_version=21, verbose=False).model_proto
    onnx.checker.check_model(model)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    out = session.run(None, {session.get_inputs()[0].name: timesteps.numpy()})[0]
    assert np.array_equal(out, group_index(timesteps, searched.boundaries).numpy())
