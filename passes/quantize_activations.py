"""Insert standalone activation quantizers in front of TQ-DiT's sites (attention operands, two-region
and time-grouped linear inputs).

For a site (argument ``arg`` of node ``consumer``, ``ditq_compiler.activation_sites``) with parameter
tables fitted by the scale search, the consumer's input ``x`` is replaced by

    x_hat = ditq::quant_act(x, None, scale, zero_point, bits)            uniform
    x_hat = ditq::quant_softmax_mrq(x, None, s1, bits)                   two-region post-softmax
    x_hat = ditq::quant_gelu_mrq(x, None, s_neg, s_pos, bits)            two-region post-GELU

(``ditq_compiler.activation_ops`` defines them), each table a get_attr constant with one row per
time group. The ``group`` argument stays None here; ``attach_time_groups`` wires the run-time group
index into the time-grouped ones (their ``meta`` record has ``time_grouped``). A linear whose input gets
such a quantizer is marked ``input_site``, so ``quantize_linears`` leaves its own
activation quantizer off. Each site is noted on its consumer (``record_applied``: operand,
quantizer, regions, time groups), which ``ditq inspect --html`` lists with the layer's passes. Not
an identity: it is the quantization the sites ask for, and with the searched tables it reproduces
the scale search's quantizers exactly.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import torch
from torch import Tensor, fx
from torch.fx.passes.infra.pass_base import PassBase, PassResult

import ditq_compiler.activation_ops  # noqa: F401  (registers the ditq:: activation ops)
from ditq_compiler.activation_sites import ActivationSite
from ditq_compiler.pipeline import PreconditionError, register_constant
from ditq_compiler import meta

OPS = {"uniform": torch.ops.ditq.quant_act.default, "softmax_mrq": torch.ops.ditq.quant_softmax_mrq.default,
       "gelu_mrq": torch.ops.ditq.quant_gelu_mrq.default}


class QuantizeActivations(PassBase):
    """The pass; ``tables`` maps site key -> parameter name -> (G,) table (``QuantParams.site_tables``)."""

    name = "quantize_activations"

    def __init__(self, sites: Sequence[ActivationSite], tables: Mapping[str, Mapping[str, Tensor]]):
        self.sites = [s for s in sites if s.standalone]
        self.tables = tables

    def requires(self, gm: fx.GraphModule) -> None:
        nodes = {n.name for n in gm.graph.nodes}
        for site in self.sites:
            if site.consumer not in nodes:
                raise PreconditionError(f"{self.name}: site {site.layer} ({site.operand}): node '{site.consumer}' "
                                        "is not in the graph")
            if site.key not in self.tables or any(p not in self.tables[site.key] for p in site.parameters):
                raise PreconditionError(f"{self.name}: site {site.layer} ({site.operand}) has no calibrated "
                                        f"parameters {list(site.parameters)}")

    def call(self, gm: fx.GraphModule) -> PassResult:
        nodes = {n.name: n for n in gm.graph.nodes}
        for site in self.sites:
            self._rewrite(gm, nodes[site.consumer], site, self.tables[site.key])
        if self.sites:
            gm.graph.lint()
            gm.recompile()
        return PassResult(gm, bool(self.sites))

    @staticmethod
    def _rewrite(gm: fx.GraphModule, consumer: fx.Node, site: ActivationSite, table: Mapping[str, Tensor]) -> None:
        x = consumer.args[site.arg]
        rows = {len(table[name]) for name in site.parameters}
        if len(rows) != 1:
            raise ValueError(f"site {site.layer} ({site.operand}): its tables have different numbers of rows {rows}")
        constants = [register_constant(gm, f"ditq_{consumer.name}_in{site.arg}_{name}", table[name], consumer)
                     for name in site.parameters]
        with gm.graph.inserting_before(consumer):
            quantized = gm.graph.call_function(OPS[site.quantizer], (x, None, *constants, site.spec.bits))
        quantized.meta["val"] = x.meta.get("val")
        meta.update(quantized, activation_site=site)
        if site.time_grouped:
            meta.update(quantized, time_grouped=True)
        meta.copy_location(quantized, consumer)
        args = list(consumer.args)
        args[site.arg] = quantized
        consumer.args = tuple(args)
        if consumer.target in (torch.ops.aten.linear.default, torch.ops.aten.conv2d.default):
            meta.update(consumer, input_site=site.key)
        meta.record_applied(consumer, "quantize_activations", operand=site.operand, site=site.kind,
                       quantizer=site.quantizer, regions=2 if site.quantizer != "uniform" else 1,
                       time_groups=next(iter(rows)) if site.time_grouped else 1)
