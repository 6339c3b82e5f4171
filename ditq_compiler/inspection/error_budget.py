"""Which activation quantizers limit a compiled model: its output SQNR with one class of them at a time.

Every activation quantizer of a compiled graph belongs to a class: the input of a role (``qkv``,
``attn_out``, ``fc1``, ``fc2``, ``conv`` ...; the quantizer inside ``ditq::quant_linear`` /
``quant_conv2d``, or a standalone ``ditq::quant_act`` / ``quant_gelu_mrq`` in front of it) or an
attention operand (``q``, ``k^T``, ``P`` after the softmax, ``v``). *Bypassing* a quantizer
replaces ``q(x)`` by ``x``: a standalone op is removed from a copy of the graph, a linear's own
input quantizer gets ``a_bits = 0``. With ``y`` the FP model's output on the calibration inputs:

    all          SQNR(y, graph)
    weights      SQNR(y, graph with every activation quantizer bypassed)        the weights alone
    only c       SQNR(y, graph with every activation quantizer bypassed but c's)
    without c    SQNR(y, graph with c's quantizers bypassed)

Independent rounding errors add as noise powers, so with ``N(x) = signal / 10^(x / 10)``

    share(c) = (N(only c) - N(weights)) / N(all)

estimates the part of the output error that class ``c`` causes; the shares need not sum to 1
(errors of different classes correlate, and a later layer can amplify or damp an earlier one's).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterable

import torch
from torch import fx
from torch.utils._pytree import tree_leaves
from tqdm.auto import tqdm

import ditq_compiler.activation_ops  # noqa: F401  (registers the ditq:: quantizer ops named below)
import ditq_compiler.ops  # noqa: F401
from ditq_compiler.calibration import as_batches
from ditq_compiler.pipeline import copy_graph_sharing_tensors
from ditq_compiler import meta

STANDALONE = {torch.ops.ditq.quant_act.default, torch.ops.ditq.quant_softmax_mrq.default,
              torch.ops.ditq.quant_gelu_mrq.default}
WEIGHTED = {torch.ops.ditq.quant_linear.default, torch.ops.ditq.quant_conv2d.default}
A_BITS = 7   # position of a_bits in ditq::quant_linear / quant_conv2d's arguments (ops.py)


@dataclass(frozen=True)
class BudgetRow:
    quantizers: str          # the class: "input of fc1", "attention P", ...
    count: int               # quantizers in the class
    only_db: float           # weights + this class's activation quantizers
    without_db: float        # everything but this class's activation quantizers
    share: float             # estimated share of the output error (module doc)


@dataclass(frozen=True)
class ErrorBudget:
    all_db: float
    weights_db: float
    rows: tuple[BudgetRow, ...]   # largest share first

    def markdown(self) -> str:
        lines = [f"Output SQNR with every quantizer: {self.all_db:.2f} dB; weights alone (every activation "
                 f"quantizer bypassed): {self.weights_db:.2f} dB.", "",
                 "| activation quantizers | count | SQNR, weights + only these (dB) | SQNR, all but these (dB) | "
                 "share of the output error |", "|---|---|---|---|---|"]
        lines += [f"| {r.quantizers} | {r.count} | {r.only_db:.2f} | {r.without_db:.2f} | {100 * r.share:.0f}% |"
                  for r in self.rows]
        return "\n".join(lines) + "\n"


def quantizer_classes(gm: fx.GraphModule) -> dict[str, list[str]]:
    """Class name -> the nodes whose activation quantizer belongs to it (see the module doc)."""
    classes: dict[str, list[str]] = {}
    for node in gm.graph.nodes:
        if node.op != "call_function":
            continue
        if node.target in STANDALONE:
            site = meta.get(node).activation_site
            if site is None:
                raise ValueError(f"quantizer node {node.name} carries no activation site (meta "
                                 "an activation_site record): not a graph that compile() wrote")
            consumer = next(iter(node.users))
            role = meta.get(consumer).role
            name = f"input of {role}" if site.operand == "input" and role else f"attention {site.operand}"
        elif node.target in WEIGHTED and node.args[A_BITS]:   # 0 when a standalone op quantizes its input
            name = f"input of {meta.get(node).role or 'linear'}"
        else:
            continue
        classes.setdefault(name, []).append(node.name)
    return classes


def bypass(gm: fx.GraphModule, names: Iterable[str]) -> fx.GraphModule:
    """A copy of ``gm`` (sharing its tensors) with the activation quantizers of nodes ``names`` bypassed."""
    names = set(names)
    out = copy_graph_sharing_tensors(gm)
    for node in list(out.graph.nodes):
        if node.name not in names:
            continue
        if node.target in STANDALONE:
            node.replace_all_uses_with(node.args[0])
            out.graph.erase_node(node)
        else:
            args = list(node.args)
            args[A_BITS] = 0
            node.args = tuple(args)
    out.recompile()
    return out


def error_budget(compiled: Any, model: torch.nn.Module, calibration: Iterable[Any],
                 progress: bool = True) -> ErrorBudget:
    """The budget of ``compiled`` (a ``CompiledModel`` of ``model``) on the calibration batches: 2 + 2 x (number
    of classes) runs of the quantized graph over them (a progress bar counts the runs)."""
    batches = as_batches(calibration)
    if not batches:
        raise ValueError("error_budget needs calibration batches; got none")
    gm = compiled.graph_module
    classes = quantizer_classes(gm)
    if not classes:
        raise ValueError(f"compiled model '{compiled.recipe.name}' quantizes no activations: nothing to budget")
    inputs = [compiled.captured.bind(args, kwargs) for args, kwargs in batches]
    with torch.no_grad():
        reference = [_float_leaves(model(*args, **kwargs)) for args, kwargs in batches]

    bar = tqdm(total=2 + 2 * len(classes), desc="error budget", unit="run", disable=not progress)

    def sqnr(graph: fx.GraphModule) -> float:
        bar.update(1)
        signal = noise = 0.0
        with torch.no_grad():
            for call, ref in zip(inputs, reference, strict=True):
                for r, q in zip(ref, _float_leaves(graph(**call)), strict=True):
                    signal += float(r.double().square().sum())
                    noise += float((r.double() - q.double()).square().sum())
        return math.inf if noise == 0 else 10 * math.log10(signal / noise)

    everything = [n for members in classes.values() for n in members]
    all_db, weights_db = sqnr(gm), sqnr(bypass(gm, everything))
    power = lambda db: 10 ** (-db / 10)  # noqa: E731  (noise power relative to the signal)
    rows = []
    for name, members in classes.items():
        only = sqnr(bypass(gm, set(everything) - set(members)))
        without = sqnr(bypass(gm, members))
        rows.append(BudgetRow(name, len(members), only, without,
                              (power(only) - power(weights_db)) / power(all_db)))
    bar.close()
    return ErrorBudget(all_db, weights_db, tuple(sorted(rows, key=lambda r: -r.share)))


def _float_leaves(output: Any) -> list[torch.Tensor]:
    return [t for t in tree_leaves(output) if isinstance(t, torch.Tensor) and t.is_floating_point()]


__all__ = ["BudgetRow", "ErrorBudget", "bypass", "error_budget", "quantizer_classes"]
