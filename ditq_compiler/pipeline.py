"""Pass infrastructure: run graph passes in order, verify the graph between them in debug mode.

A pass subclasses ``torch.fx.passes.infra.pass_base.PassBase``: ``requires(gm)`` checks what it
needs of the graph (another pass having run, the nodes it was given existing and being what it
rewrites) and raises ``PreconditionError`` naming the node when it is not so; ``call(gm)`` rewrites
and returns a ``PassResult``; a class attribute ``name`` names it (the module's file name: one pass
per file in ``passes/``). ``PassPipeline`` runs passes in order; when one raises, the error names it
and the passes that ran before it. Helpers every pass uses to add and read constants live here too.
"""

from __future__ import annotations

import copy
import warnings
from typing import Callable, Sequence

import torch
from torch import Tensor, fx
from torch.fx.passes.infra.pass_base import PassResult

Pass = Callable[[fx.GraphModule], PassResult]


class PassError(RuntimeError):
    """A pass raised, or left an invalid graph behind."""


class PreconditionError(ValueError):
    """A pass's ``requires`` found the graph unfit for it; the message names the pass and the node."""


def pass_name(p: Pass) -> str:
    return getattr(p, "name", None) or getattr(p, "__name__", type(p).__name__)


def verify_graph(gm: fx.GraphModule) -> None:
    """Lint the graph; every computing node has ``meta['val']``; every get_attr target exists."""
    try:
        gm.graph.lint()
    except RuntimeError as e:
        raise ValueError(f"graph lint failed: {e}") from None
    for node in gm.graph.nodes:
        if node.op == "call_function" and "val" not in node.meta:
            raise ValueError(f"node '{node.name}' ({node.target}) has no meta['val']")
        if node.op == "get_attr":
            try:
                fetch_attr(gm, node.target)
            except AttributeError:
                raise ValueError(f"get_attr node '{node.name}' points to missing attribute '{node.target}'") from None


def fetch_attr(gm: fx.GraphModule, target: str):
    obj = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def register_constant(gm: fx.GraphModule, name: str, value: Tensor, anchor: fx.Node) -> fx.Node:
    """Add ``value`` as buffer ``name`` of ``gm`` and a get_attr node for it just before ``anchor``."""
    gm.register_buffer(name, value)
    with gm.graph.inserting_before(anchor):
        node = gm.graph.get_attr(name)
    node.meta["val"] = value
    return node


def delete_unused_attrs(gm: fx.GraphModule) -> None:
    """Erase get_attr nodes nobody uses, and their attributes once no get_attr points to them."""
    for node in list(gm.graph.nodes):
        if node.op == "get_attr" and not node.users:
            target = node.target
            gm.graph.erase_node(node)
            if not any(n.op == "get_attr" and n.target == target for n in gm.graph.nodes):
                owner_path, _, attr = target.rpartition(".")
                owner = gm.get_submodule(owner_path) if owner_path else gm
                delattr(owner, attr)


def layer_parameters(gm: fx.GraphModule, node: fx.Node) -> tuple[Tensor, Tensor | None, tuple | None]:
    """(weight, bias, conv args (stride, padding, dilation, groups) or None for a linear) of a layer node."""
    weight = fetch_attr(gm, node.args[1].target)
    bias = fetch_attr(gm, node.args[2].target) if len(node.args) > 2 and node.args[2] is not None else None
    conv = None
    if node.target is torch.ops.aten.conv2d.default:
        stride, padding, dilation, groups = (list(node.args) + [None] * 7)[3:7]
        conv = (stride or [1, 1], padding or [0, 0], dilation or [1, 1], groups or 1)
    return weight, bias, conv


def swap_for_module(gm: fx.GraphModule, node: fx.Node, name: str, module: torch.nn.Module, x: fx.Node) -> fx.Node:
    """Replace ``node`` by a call of ``module`` (registered as ``name``) on ``x``, keeping its meta."""
    gm.add_submodule(name, module)
    with gm.graph.inserting_before(node):
        call = gm.graph.call_module(name, (x,))
    call.meta.update(node.meta)
    node.replace_all_uses_with(call)
    gm.graph.erase_node(node)
    return call


def linear_node(gm: fx.GraphModule, name: str, what: str) -> fx.Node:
    """The ``aten.linear`` node called ``name``; a pass given constants for anything else is an error."""
    node = next((n for n in gm.graph.nodes if n.name == name), None)
    if node is None or node.target is not torch.ops.aten.linear.default:
        raise ValueError(f"{what} given for node '{name}', which is not an aten.linear in the graph")
    return node


def copy_graph(gm: fx.GraphModule) -> fx.GraphModule:
    """A deep copy of ``gm``, tensors included."""
    with warnings.catch_warnings():  # torch's own pytree deprecation notice on deepcopy
        warnings.filterwarnings("ignore", message=".*treespec, LeafSpec.*", category=FutureWarning)
        return copy.deepcopy(gm)


def copy_graph_sharing_tensors(gm: fx.GraphModule) -> fx.GraphModule:
    """A copy of ``gm`` whose graph and modules are new but whose parameters and buffers are the same
    tensors: for a pass that rewrites one copy while the other is kept as the float reference.

    Safe because passes never write into a tensor in place (they register new constants and drop
    old attributes); it saves one copy of the weights (2.7 GB at DiT-XL size).
    """
    memo = {id(t): t for t in (*gm.parameters(), *gm.buffers())}
    with warnings.catch_warnings():  # torch's own pytree deprecation notice on deepcopy
        warnings.filterwarnings("ignore", message=".*treespec, LeafSpec.*", category=FutureWarning)
        return copy.deepcopy(gm, memo)


class PassPipeline:
    def __init__(self, passes: Sequence[Pass], debug: bool = False):
        self.passes = list(passes)
        self.debug = debug

    def __call__(self, gm: fx.GraphModule) -> PassResult:
        modified = False
        done: list[str] = []
        for p in self.passes:
            name = pass_name(p)
            try:
                result = p(gm)
                gm, modified = result.graph_module, modified or result.modified
                if self.debug:
                    verify_graph(gm)
            except Exception as e:
                after = f" (after: {', '.join(done)})" if done else " (the first pass)"
                raise PassError(f"pass '{name}' failed{after}: {type(e).__name__}: {e}") from e
            done.append(name)
        gm.recompile()
        return PassResult(gm, modified)
