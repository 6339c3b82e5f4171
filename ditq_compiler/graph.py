"""Graph analysis: give every linear and conv a role, mark activation sites and time dependence.

Roles are inferred from the structure of the exported ATen graph (viewed as a networkx
DiGraph), not from module names, so passes select targets the same way on DiT, PixArt,
UNet2D and UNet2DCondition graphs. Rules, applied in this order to each weighted node
(``aten.linear`` / ``aten.conv2d``):

1. ``qkv`` / ``attn_out``: its output reaches a q, k or v operand of attention (SDPA, or
   the decomposed ``matmul -> softmax -> matmul``) through view-like ops, q/k norms, the
   rotary embedding (``x cos + rot(x) sin``, or an ``empty_like(x)`` buffer written in place)
   and the concatenation with another stream (SD3's and Flux's joint attention: every
   operand of the ``cat`` is followed); ``attn_out`` takes the attention output through
   view-like ops or a concatenation (Flux's single blocks: ``proj_out(cat(attn, mlp))``).
2. ``patch_embed``: its input is the sample input, through view-like ops only, and it
   patchifies (a conv with stride == kernel > 1, or a linear on the raw sample tokens).
3. ``embed`` / ``adaln``: its input does not depend on the sample (it sees only timestep,
   class or caption information). If its output feeds another weighted layer it is an
   embedder (``embed``); otherwise, if it reaches an elementwise op on the sample path, it
   modulates that path (``adaln``: adaLN shift/scale/gate, or a U-Net's time-embedding
   projection added to the feature map).
4. ``fc2``: its input comes from a GELU (or a GEGLU product ``h * gelu(g)``) through
   view-like ops; that GELU / product is the ``post_gelu`` activation site, and the linear
   that feeds the GELU is ``fc1`` (also where the GELU's output is concatenated rather than
   read by one fc2, as in Flux's single blocks).
5. ``final``: the graph output is reachable from it without passing another weighted layer.
6. otherwise ``conv`` for convolutions and ``linear`` for linears.

Activation sites: ``post_gelu`` (the node feeding an fc2) and ``post_softmax`` (a softmax
feeding the attention-times-value matmul, where attention is decomposed). A node is
timestep-dependent if it is a descendant of the timestep input.
"""

from __future__ import annotations

import operator
import re
from dataclasses import dataclass, field
from typing import Callable, Iterable

import networkx as nx
import torch
from torch import Tensor, fx
from ditq_compiler import meta
from ditq_compiler.records import UnsupportedLayer

ROLES = ("qkv", "attn_out", "fc1", "fc2", "adaln", "embed", "patch_embed", "final", "conv", "linear")
SITES = ("post_gelu", "post_softmax")

VIEW_OPS = {
    "view", "reshape", "_unsafe_view", "transpose", "permute", "contiguous", "clone", "expand",
    "unsqueeze", "squeeze", "flatten", "getitem", "split", "split_with_sizes", "chunk", "slice",
    "select", "t", "alias", "detach", "_to_copy", "to", "dropout", "type_as", "unflatten",
}
NORM_OPS = {"layer_norm", "native_layer_norm", "rms_norm", "group_norm"}
ELEMENTWISE_OPS = {"mul", "add", "sub", "div", "addcmul"}
MATMUL_OPS = {"matmul", "bmm", "baddbmm", "mm", "einsum"}
CONCAT_OPS = {"cat", "concat", "stack"}
# between a q/k/v projection and attention: views, q/k norms, the rotary embedding (x cos + rot(x) sin,
# or an empty_like(x) buffer written in place), concatenation with the other stream (joint attention)
PROJECTION_PATH_OPS = VIEW_OPS | NORM_OPS | CONCAT_OPS | {"mul", "div", "add", "sub", "neg", "empty_like", "unbind"}


def op_name(node: fx.Node) -> str:
    """'linear' for aten.linear.default, 'getitem' for operator.getitem, '' for non-calls."""
    if node.op != "call_function":
        return ""
    target = node.target
    if target is operator.getitem:
        return "getitem"
    packet = getattr(target, "_overloadpacket", None)
    name = packet.__name__ if packet is not None else getattr(target, "__name__", str(target))
    return name.split(".")[-1]


def is_weighted(node: fx.Node) -> bool:
    return op_name(node) in ("linear", "conv2d")


def module_path(node: fx.Node) -> str:
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return node.name
    return list(stack.values())[-1][0] or node.name


_BLOCK = re.compile(r"^(.*?\.\d+)(\.|#|$)")


def unit_of(layer_name: str) -> str:
    """A layer's block (the module path up to its first numeric component, ``transformer_blocks.3``), or the
    layer itself outside any block: the unit reconstruction learns at once and distillation mimics."""
    match = _BLOCK.match(layer_name)
    return match.group(1) if match else layer_name


@dataclass(frozen=True)
class LayerInfo:
    node: str            # fx node name in the captured graph
    name: str            # module path, '#2' appended when a module is called twice
    op: str              # 'linear' | 'conv2d'
    role: str
    timestep_dependent: bool


@dataclass
class GraphAnalysis:
    graph: nx.DiGraph
    layers: dict[str, LayerInfo]                     # by node name, graph order
    sites: dict[str, str] = field(default_factory=dict)  # node name -> 'post_gelu' | 'post_softmax'
    timestep_dependent: set[str] = field(default_factory=set)
    sample_dependent: set[str] = field(default_factory=set)

    def by_role(self, role: str) -> list[LayerInfo]:
        return [info for info in self.layers.values() if info.role == role]


# ops that carry a weight but have no quantized lowering here, with the closest supported role
UNSUPPORTED_WEIGHTED = {"conv1d": "conv", "conv3d": "conv", "conv_transpose1d": "conv", "conv_transpose2d": "conv",
                        "conv_transpose3d": "conv", "convolution": "conv", "mm": "linear", "addmm": "linear",
                        "matmul": "linear", "bmm": "linear", "baddbmm": "linear", "einsum": "linear"}


class UnsupportedLayerError(ValueError):
    """strict compile: the model has weight-carrying ops the compiler cannot quantize."""


def unsupported_layers(gm: fx.GraphModule) -> list[UnsupportedLayer]:
    """Weight-carrying ops the compiler cannot quantize: other convolutions, and matmuls with a weight.

    A matmul counts when one operand is a parameter or buffer of the model (through view-like ops);
    attention's matmuls of two activations do not.
    """
    found = []
    for node in gm.graph.nodes:
        op = op_name(node)
        if op not in UNSUPPORTED_WEIGHTED:
            continue
        operands = [_trace_back(a, VIEW_OPS) for a in node.args if isinstance(a, fx.Node)]
        if UNSUPPORTED_WEIGHTED[op] == "conv" or any(a.op == "get_attr" for a in operands):
            found.append(UnsupportedLayer(node.name, module_path(node), op, UNSUPPORTED_WEIGHTED[op]))
    return found


def to_networkx(graph: fx.Graph) -> nx.DiGraph:
    g = nx.DiGraph()
    for node in graph.nodes:
        g.add_node(node.name, node=node)
        for inp in node.all_input_nodes:
            g.add_edge(inp.name, node.name)
    return g


def data_descendants(graph: fx.Graph, source: str) -> set[str]:
    """Nodes whose tensor values depend on ``source``; reading a shape (``sym_size``) is no dependence."""
    found = {source}
    for node in graph.nodes:
        if node.name in found or _is_shape_value(node):
            continue
        if any(inp.name in found and not _is_shape_value(inp) for inp in node.all_input_nodes):
            found.add(node.name)
    return found


def _is_shape_value(node: fx.Node) -> bool:
    val = node.meta.get("val")
    return isinstance(val, (int, torch.SymInt)) or op_name(node) in ("sym_size", "size")


def _first_tensor_arg(node: fx.Node) -> fx.Node | None:
    return next((a for a in node.args if isinstance(a, fx.Node)), None)


def _trace_back(node: fx.Node, passthrough: set[str]) -> fx.Node:
    """Walk producers through ops in ``passthrough`` (following the first tensor argument)."""
    while op_name(node) in passthrough:
        prev = _first_tensor_arg(node)
        if prev is None:
            break
        node = prev
    return node


def _tensor_sources(node: fx.Node) -> list[fx.Node]:
    """The producers a role follows back from ``node``: every operand of a concatenation, else the first."""
    if op_name(node) in CONCAT_OPS and isinstance(node.args[0], (list, tuple)):
        return [a for a in node.args[0] if isinstance(a, fx.Node)]
    first = _first_tensor_arg(node)
    return [first] if first is not None else []


def _projections(operand: fx.Node) -> list[fx.Node]:
    """The weighted layers that produce an attention operand through ``PROJECTION_PATH_OPS``."""
    reached = _walk([operand], _tensor_sources, lambda n: op_name(n) not in PROJECTION_PATH_OPS)
    return [n for n in reached if is_weighted(n)]


def _walk(start: Iterable[fx.Node], neighbours: Callable[[fx.Node], Iterable[fx.Node]],
          stop: Callable[[fx.Node], bool]) -> list[fx.Node]:
    """Every node reached depth-first from ``start``; nodes where ``stop`` holds are not expanded."""
    reached, stack, seen = [], list(start), set()
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        reached.append(node)
        if not stop(node):
            stack.extend(neighbours(node))
    return reached


def _reach_forward(node: fx.Node, passthrough: set[str]) -> list[fx.Node]:
    """Consumers reached from ``node`` through ops in ``passthrough``."""
    return [n for n in _walk(node.users, lambda n: n.users, lambda n: op_name(n) not in passthrough)
            if op_name(n) not in passthrough]


def _attention_operands(graph: fx.Graph) -> tuple[list[fx.Node], list[fx.Node], dict[str, str]]:
    """(q/k/v operand nodes, attention output nodes, post-softmax sites) of all attentions."""
    operands, outputs, sites = [], [], {}
    for node in graph.nodes:
        name = op_name(node)
        if name in ("scaled_dot_product_attention", "_scaled_dot_product_flash_attention_for_cpu"):
            operands.extend(a for a in node.args[:3] if isinstance(a, fx.Node))
            outputs.append(node)
        elif name in ("softmax", "_softmax"):
            scores = _trace_back(_first_tensor_arg(node), VIEW_OPS | {"mul", "div", "add"})
            consumers = [u for u in _reach_forward(node, VIEW_OPS) if op_name(u) in MATMUL_OPS]
            if op_name(scores) not in MATMUL_OPS or not consumers:
                continue
            sites[node.name] = "post_softmax"
            operands.extend(a for a in scores.args[:2] if isinstance(a, fx.Node))
            for av in consumers:
                operands.extend(a for a in av.args[:2] if isinstance(a, fx.Node) and a is not node
                                and _trace_back(a, VIEW_OPS) is not node)
                outputs.append(av)
    return operands, outputs, sites


def _gelu_site(node: fx.Node) -> fx.Node | None:
    """The GELU (or GEGLU product) feeding ``node`` through view-like ops, if any."""
    src = _trace_back(node, VIEW_OPS)
    if op_name(src) == "gelu":
        return src
    if op_name(src) == "mul":
        factors = [_trace_back(a, VIEW_OPS) for a in src.args if isinstance(a, fx.Node)]
        if any(op_name(f) == "gelu" for f in factors):
            return src
    return None


def _fc1_of(site: fx.Node) -> list[fx.Node]:
    gelus = [site] if op_name(site) == "gelu" else [
        _trace_back(a, VIEW_OPS) for a in site.args if isinstance(a, fx.Node)]
    found = []
    for g in gelus:
        inp = g if op_name(g) != "gelu" else _first_tensor_arg(g)
        src = _trace_back(inp, VIEW_OPS)
        if is_weighted(src) and src not in found:
            found.append(src)
    return found


def _conditioning_role(node: fx.Node, sample_dep: set[str]) -> str:
    """'embed' if the output feeds another weighted layer, 'adaln' if it modulates the sample path."""
    reached = _walk(node.users, lambda n: n.users, lambda n: is_weighted(n) or n.name in sample_dep)
    feeds_layer = any(is_weighted(n) for n in reached)
    modulates = any(n.name in sample_dep and op_name(n) in ELEMENTWISE_OPS for n in reached)
    return "adaln" if modulates and not feeds_layer else "embed"


def _is_patchify(node: fx.Node) -> bool:
    if op_name(node) == "linear":
        return True
    weight = node.args[1]
    kernel = tuple(weight.meta["val"].shape[2:]) if "val" in weight.meta else None
    stride = tuple(node.args[3]) if len(node.args) > 3 else (1, 1)
    return kernel is not None and kernel == stride and max(kernel) > 1


def block_outputs(gm: fx.GraphModule, blocks: list[str], sample_dependent: set[str]) -> list[str]:
    """Names of the values each block hands to the rest of the graph (sample-dependent float tensors)."""
    found = []
    for block in blocks:
        inside = {n for n in gm.graph.nodes
                  if n.op == "call_function" and (module_path(n) == block or module_path(n).startswith(block + "."))}
        for node in gm.graph.nodes:
            val = node.meta.get("val")
            if (node in inside and node.name in sample_dependent and isinstance(val, Tensor)
                    and val.is_floating_point()
                    and any(u not in inside and op_name(u) != "_assert_tensor_metadata" for u in node.users)):
                found.append(node.name)
    return found


BLOCK_LISTS = ("up_blocks", "transformer_blocks")   # where BiDM+'s TES connects: a U-Net's up blocks, a DiT's blocks


def block_sites(gm: fx.GraphModule, sample_dependent: set[str]) -> list[str]:
    """The outputs of a U-Net's up blocks and of a transformer's blocks (``up_blocks.N``, ``transformer_blocks.N``),
    in graph order: where BiDM+'s TES (``passes/connect_timesteps.py``) connects timesteps."""
    blocks = []
    for node in gm.graph.nodes:
        parts = module_path(node).split(".")
        if len(parts) > 1 and parts[0] in BLOCK_LISTS and parts[1].isdigit():
            block = ".".join(parts[:2])
            if block not in blocks:
                blocks.append(block)
    return block_outputs(gm, blocks, sample_dependent)


def analyse(gm: fx.GraphModule, sample_input: str, timestep_input: str | None = None) -> GraphAnalysis:
    """Assign roles to every linear/conv of ``gm`` and mark activation sites (see module doc)."""
    graph = gm.graph
    g = to_networkx(graph)
    nodes = {n.name: n for n in graph.nodes}
    if sample_input not in nodes:
        raise ValueError(f"sample input '{sample_input}' is not a placeholder of the graph")
    sample_dep = data_descendants(graph, sample_input)
    time_dep = data_descendants(graph, timestep_input) if timestep_input in nodes else set()

    weighted = [n for n in graph.nodes if is_weighted(n)]
    roles: dict[str, str] = {}
    sites: dict[str, str] = {}

    # 1. attention projections
    operands, attn_outputs, softmax_sites = _attention_operands(graph)
    sites.update(softmax_sites)
    for operand in operands:
        for src in _projections(operand):
            roles.setdefault(src.name, "qkv")
    for out in attn_outputs:
        for user in _reach_forward(out, VIEW_OPS | CONCAT_OPS):
            if is_weighted(user) and user.args[0] is not None:
                roles.setdefault(user.name, "attn_out")

    # 2. patch embedding (attention structure is the stronger evidence)
    for n in weighted:
        if _trace_back(n.args[0], VIEW_OPS).name == sample_input and _is_patchify(n):
            roles.setdefault(n.name, "patch_embed")

    # 3. conditioning layers: input independent of the sample
    for n in weighted:
        if n.name in roles or n.args[0].name in sample_dep:
            continue
        roles[n.name] = _conditioning_role(n, sample_dep)

    # 4. MLPs
    for n in weighted:
        if n.name in roles:
            continue
        site = _gelu_site(n.args[0])
        if site is not None:
            roles[n.name] = "fc2"
            sites[site.name] = "post_gelu"
            for fc1 in _fc1_of(site):
                roles.setdefault(fc1.name, "fc1")
    for n in weighted:
        if n.name not in roles and n.name in sample_dep and any(
                op_name(u) == "gelu" for u in _reach_forward(n, VIEW_OPS)):
            roles[n.name] = "fc1"

    # 5. final layer: the output is reachable without crossing another weighted layer
    output = next(n for n in graph.nodes if n.op == "output")
    for n in _walk(output.all_input_nodes, lambda n: n.all_input_nodes, is_weighted):
        if is_weighted(n) and n.name in sample_dep:
            roles.setdefault(n.name, "final")

    # 6. the rest
    layers: dict[str, LayerInfo] = {}
    calls: dict[str, int] = {}
    for n in weighted:
        role = roles.get(n.name) or ("conv" if op_name(n) == "conv2d" else "linear")
        path = module_path(n)
        calls[path] = calls.get(path, 0) + 1
        name = path if calls[path] == 1 else f"{path}#{calls[path]}"
        layers[n.name] = LayerInfo(node=n.name, name=name, op=op_name(n), role=role,
                                   timestep_dependent=n.name in time_dep)
        meta.update(n, role=role)
    for name, site in sites.items():
        meta.update(nodes[name], site=site)
    for name in time_dep:
        meta.update(nodes[name], timestep_dependent=True)
    return GraphAnalysis(graph=g, layers=layers, sites=sites, timestep_dependent=time_dep,
                         sample_dependent=sample_dep)
