"""quantize_activations: standalone quantizer ops in front of the TQ-DiT sites, on the small DiT."""

import copy

import pytest
import torch

from ditq_compiler.pipeline import PreconditionError
from torch import fx

from ditq_compiler.calibration.scale_search import SiteQuantizer, collect
from ditq_compiler.passes.quantize_activations import QuantizeActivations
from ditq_compiler.passes.quantize_linears import QuantizeLinears
from ditq_compiler.pipeline import PassPipeline
from ditq_compiler.quant import sqnr_db

ops = torch.ops.ditq
SITE_OPS = (ops.quant_act.default, ops.quant_softmax_mrq.default, ops.quant_gelu_mrq.default)


def _count(gm, target):
    return sum(1 for n in gm.graph.nodes if n.op == "call_function" and n.target is target)


def _run(gm, flat):
    with torch.no_grad():
        return torch.utils._pytree.tree_leaves(fx.Interpreter(gm).run(*flat))[0]


def test_sites_become_quantizer_ops_and_the_linears_behind_them_drop_their_own(planned_dit):
    captured, gm, annotations, plan, flat, searched = planned_dit(time_groups=None)
    original = copy.deepcopy(gm)
    passes = [QuantizeActivations(plan.sites, searched.site_tables),
              QuantizeLinears(searched)]
    quantized = PassPipeline(passes, debug=True)(gm).graph_module
    # 2 blocks: q, k^T and v per attention (uniform), P (two regions), the fc2 input (two regions)
    assert _count(quantized, ops.quant_act.default) == 6
    assert _count(quantized, ops.quant_softmax_mrq.default) == 2 and _count(quantized, ops.quant_gelu_mrq.default) == 2
    matmuls = [n for n in quantized.graph.nodes if n.target is torch.ops.aten.matmul.default]
    assert len(matmuls) == 4 and all(a.target in (ops.quant_act.default, ops.quant_softmax_mrq.default)
                                     for m in matmuls for a in m.args[:2])
    linears = [n for n in quantized.graph.nodes if n.target is ops.quant_linear.default]
    behind_gelu = [n for n in linears if n.args[0].target is ops.quant_gelu_mrq.default]
    assert len(linears) == 12 and len(behind_gelu) == 2
    assert all(n.args[7] == 0 for n in behind_gelu) and all(n.args[7] == 8 for n in linears if n not in behind_gelu)
    assert all(n.args[1] is None for n in quantized.graph.nodes if n.target in SITE_OPS)   # no time groups
    for batch in flat:
        assert sqnr_db(_run(original, batch), _run(quantized, batch)) > 25   # W8A8 with every activation quantized


def test_the_quantizers_reproduce_the_searched_ones(planned_dit):
    """The graph's site ops, fed the float graph's values, give the SiteQuantizer's own quantized values."""
    captured, gm, annotations, plan, flat, searched = planned_dit(time_groups=None)
    quantized = QuantizeActivations(plan.sites, searched.site_tables)(copy.deepcopy(gm)).graph_module
    nodes = {n.name: n for n in quantized.graph.nodes}
    standalone = [s for s in plan.sites if s.standalone]
    wanted = {c: [s.arg for s in standalone if s.consumer == c] for c in {s.consumer for s in standalone}}
    inputs, _, _ = collect(gm, wanted, flat, None)
    for site in (s for s in plan.sites if s.standalone):
        op = nodes[site.consumer].args[site.arg]
        tables = [getattr(quantized, a.target) for a in op.args[2:-1]]
        x = inputs[(site.consumer, site.arg)]
        reference = SiteQuantizer(site, x, None, 1, torch.ones(1))
        reference.tables = {k: v.float() for k, v in searched.site_tables[site.key].items()}
        assert torch.equal(op.target(x, None, *tables, site.spec.bits), reference.quantize_rows(x, slice(None)))


def test_no_standalone_site_leaves_the_graph_unchanged(planned_dit):
    _, gm, _, plan, _, searched = planned_dit(attention=None, multi_region=None, time_groups=None)
    assert plan.sites and not any(s.standalone for s in plan.sites)    # every site is a plain linear input
    before = str(gm.graph)
    assert QuantizeActivations(plan.sites, searched.site_tables)(gm).modified is False
    assert str(gm.graph) == before


def test_a_site_without_parameters_is_named(planned_dit):
    _, gm, _, plan, _, searched = planned_dit(time_groups=None)
    tables = {k: v for k, v in searched.site_tables.items() if "matmul" not in k}
    with pytest.raises(PreconditionError, match=r"site transformer_blocks\.0\.attn1\.matmul_qk \(q\) has no"):
        QuantizeActivations(plan.sites, tables)(gm)
