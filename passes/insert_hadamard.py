"""Rotate the inputs of selected linears by a Hadamard matrix, fusing the inverse into the weight (RobuQ).

For ``y = x W^T + b`` and an orthonormal Hadamard matrix ``H`` (``H^T H = I``,
``ditq_compiler.quant.hadamard``),

    y = (x H^T) (W H^T)^T + b

so the layer's weight becomes ``W H^T`` (offline) and its input ``x H^T`` is what the activation
quantizer sees: every channel a +-1/sqrt(n) mix of all channels, outliers spread over the token
(RobuQ's RobustQuantizer). Exact in real arithmetic. Where ``x H^T`` is computed:

* online: a ``ditq::hadamard`` node (``ditq_compiler.ops``) in front of the layer, shared by all
  selected layers that read the same value (q, k and v). Needed whenever a nonlinearity, a norm
  or adaLN modulation (a per-sample, per-channel scale) lies between the previous linear and this
  one (DiT's qkv and fc1 follow adaLN, fc2 follows GELU): the rotation does not commute with them.
* fused into the producer: when the input is another linear's output ``x = u P^T + c`` through
  ops that keep the last dim (views, copies), and every consumer of that output is a rotated
  linear, ``P <- H P`` and ``c <- H c`` offline and nothing runs online (PixArt's caption
  projection feeding every cross-attention's k and v).
* attention output (``attn_out``): the attention output is ``softmax(...) V`` per head, which
  mixes tokens, not channels, so a per-head rotation ``I_heads (x) H_dh`` of V's channels passes
  through it and is fused into the value projection (``W_v <- (I (x) H_dh) W_v``, and its bias).
  The rest of the full rotation ``H_heads (x) H_dh = (H_heads (x) I)(I (x) H_dh)`` mixes heads,
  which attention does not commute with, and stays online as ``ditq::hadamard(x, H_heads, None)``
  (``n * heads`` multiply-adds per token). The layer's weight takes the full ``H_heads (x) H_dh``.
  Where ``heads`` or ``dh`` has no Hadamard matrix, the full ``H_n`` runs online instead.

With ``fuse=False`` every rotation is online (the full ``H_n``); the two graphs compute the same
function. Each rotated layer gets a ``Rotation`` record (``pass.rotations``) that says which of
these it got; ``compiled.summary()`` prints them, and ``ditq inspect --html`` lists them among the
layer's passes (``meta.record_applied``, as does a producer that took a fused rotation).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import torch
from torch import Tensor, fx
from torch.fx.passes.infra.pass_base import PassBase, PassResult

import ditq_compiler.ops  # noqa: F401  (registers ditq::hadamard)
from ditq_compiler.graph import LayerInfo, op_name
from ditq_compiler.pipeline import PreconditionError, delete_unused_attrs, fetch_attr, register_constant
from ditq_compiler.quant.hadamard import describe, hadamard_factors, hadamard_matrix
from ditq_compiler import meta
from ditq_compiler.records import Rotation

# ops that keep the last dim element for element (checked against the shapes as well)
SAME_LAST_DIM = {"view", "reshape", "_unsafe_view", "clone", "contiguous", "_to_copy", "to", "dropout", "alias",
                 "detach", "unsqueeze", "expand", "type_as"}
# ops allowed between a value projection and attention, and between attention and attn_out
HEAD_LAYOUT = SAME_LAST_DIM | {"transpose", "permute"}
ATTENTION = {"scaled_dot_product_attention", "_scaled_dot_product_flash_attention_for_cpu"}
SIDE_EFFECT_ONLY = {"_assert_tensor_metadata"}


@dataclass
class _Plan:
    input_rotation: Tensor | None = None      # H applied to the layer's input: W <- W H^T
    output_rotation: Tensor | None = None     # H applied to the layer's output: W <- H W, b <- H b


def _users(node: fx.Node) -> list[fx.Node]:
    return [u for u in node.users if op_name(u) not in SIDE_EFFECT_ONLY]


def _last_dim(node: fx.Node) -> int | None:
    val = node.meta.get("val")
    return int(val.shape[-1]) if isinstance(val, Tensor) and val.dim() > 0 else None


def _linear_weight(gm: fx.GraphModule, node: fx.Node) -> Tensor:
    return fetch_attr(gm, node.args[1].target)


class InsertHadamard(PassBase):
    """The pass; ``layers`` are the selected linears (node name -> LayerInfo), ``names`` every layer's name."""

    name = "insert_hadamard"

    def __init__(self, layers: Mapping[str, LayerInfo], names: Mapping[str, str], fuse: bool = True):
        self.layers = dict(layers)
        self.names = dict(names)
        self.fuse = fuse
        self.rotations: list[Rotation] = []

    def requires(self, gm: fx.GraphModule) -> None:
        """Every selected layer is a linear of the graph whose width has a Hadamard matrix."""
        nodes = {n.name: n for n in gm.graph.nodes}
        for name, info in self.layers.items():
            if name not in nodes:
                raise PreconditionError(f"{self.name}: layer '{info.name}' (node {name}) is not in the graph")
            if op_name(nodes[name]) != "linear":
                raise PreconditionError(f"layer '{info.name}' ({info.role}) is a {info.op}: Hadamard rotation is "
                                        "defined for linears; leave its role out of rotation.roles")
            width = int(_linear_weight(gm, nodes[name]).shape[1])
            try:
                hadamard_factors(width)
            except ValueError as e:
                raise PreconditionError(f"layer '{info.name}': {e}") from None

    def call(self, gm: fx.GraphModule) -> PassResult:
        nodes = {n.name: n for n in gm.graph.nodes}
        plans: dict[fx.Node, _Plan] = {}
        online: dict[fx.Node, list[tuple[fx.Node, Tensor | None, Tensor | None]]] = {}
        placements: dict[str, str] = {}
        for name in self.layers:
            if name in placements:
                continue
            node = nodes[name]
            width = int(_linear_weight(gm, node).shape[1])
            plans.setdefault(node, _Plan()).input_rotation = hadamard_matrix(width)
            fused = self._fuse_attention(gm, node, plans, online) if self.fuse else None
            fused = fused or (self._fuse_producer(gm, node, width, plans) if self.fuse else None)
            if fused is None:
                left, right = hadamard_factors(width)
                online.setdefault(node.args[0], []).append((node, left, right))
                placements[name] = "online"
            else:
                placements.update(fused)
        for x, consumers in online.items():
            self._insert_online(gm, x, consumers)
        for node, plan in plans.items():
            self._rotate_weights(gm, node, plan)
        delete_unused_attrs(gm)
        gm.graph.lint()
        gm.recompile()
        self.rotations = [Rotation(info.name, info.role, int(_linear_weight(gm, nodes[name]).shape[1]),
                                   describe(int(_linear_weight(gm, nodes[name]).shape[1])), placements[name])
                          for name, info in self.layers.items()]
        for name, rotation in zip(self.layers, self.rotations, strict=True):
            meta.record_applied(nodes[name], "insert_hadamard", rotation=rotation.construction,
                           placement=rotation.placement)
        for node, plan in plans.items():
            if plan.output_rotation is not None:
                meta.record_applied(node, "insert_hadamard", output_rotated="for the rotated layers it feeds")
        return PassResult(gm, bool(self.layers))

    # ---- where the rotation goes -----------------------------------------------------------
    def _fuse_attention(self, gm: fx.GraphModule, node: fx.Node, plans: dict[fx.Node, _Plan],
                        online: dict) -> dict[str, str] | None:
        """Per-head part into the value projection, cross-head part online (see module doc)."""
        chain_out = self._trace(node.args[0], HEAD_LAYOUT)
        attention = chain_out[-1]
        if op_name(attention) == "getitem":                  # flash attention returns a tuple
            attention = attention.args[0]
        if op_name(attention) not in ATTENTION or len(attention.args) < 3:
            return None
        chain_v = self._trace(attention.args[2], HEAD_LAYOUT)
        producer = chain_v[-1]
        head_dim = _last_dim(attention.args[2])
        width = _last_dim(node.args[0])
        if (op_name(producer) != "linear" or head_dim is None or width is None or width % head_dim
                or _last_dim(producer) != width or any(len(_users(n)) != 1 for n in chain_v[1:] + chain_out[:-1])
                or plans.get(producer, _Plan()).output_rotation is not None):
            return None
        heads = width // head_dim
        try:   # both factors must exist; otherwise the full rotation runs online (never a block-diagonal one)
            per_head = hadamard_matrix(head_dim)
            across = hadamard_matrix(heads) if heads > 1 else None
        except ValueError:
            return None
        plans.setdefault(producer, _Plan()).output_rotation = torch.kron(torch.eye(heads, dtype=torch.float64),
                                                                          per_head)
        where = self.names.get(producer.name, producer.name)
        if across is None:
            plans[node].input_rotation = per_head
            return {node.name: f"fused into {where}"}
        plans[node].input_rotation = torch.kron(across, per_head)
        online.setdefault(node.args[0], []).append((node, across.float(), None))
        return {node.name: f"per-head H{head_dim} fused into {where} + online H{heads} across heads"}

    def _fuse_producer(self, gm: fx.GraphModule, node: fx.Node, width: int,
                       plans: dict[fx.Node, _Plan]) -> dict[str, str] | None:
        """The whole rotation into the linear that produces the input, if all its consumers are rotated."""
        chain = self._trace(node.args[0], SAME_LAST_DIM)
        producer = chain[-1]
        if op_name(producer) != "linear" or any(_last_dim(n) != width for n in chain) \
                or plans.get(producer, _Plan()).output_rotation is not None:
            return None
        consumers, frontier = [], [producer]
        while frontier:
            value = frontier.pop()
            for user in _users(value):
                if op_name(user) in SAME_LAST_DIM and _last_dim(user) == width and user.args[0] is value:
                    frontier.append(user)
                elif user.name in self.layers and user.args[0] is value and op_name(user) == "linear":
                    consumers.append(user)
                else:
                    return None
        where = self.names.get(producer.name, producer.name)
        plans.setdefault(producer, _Plan()).output_rotation = hadamard_matrix(width)
        for consumer in consumers:
            plans.setdefault(consumer, _Plan()).input_rotation = hadamard_matrix(width)
        return {c.name: f"fused into {where}" for c in consumers}

    @staticmethod
    def _trace(node: fx.Node, through: set[str]) -> list[fx.Node]:
        """[node, its producer, ...] back through ops in ``through`` (first tensor argument)."""
        chain = [node]
        while op_name(chain[-1]) in through and isinstance(chain[-1].args[0], fx.Node):
            chain.append(chain[-1].args[0])
        return chain

    # ---- rewriting -----------------------------------------------------------------------
    @staticmethod
    def _insert_online(gm: fx.GraphModule, x: fx.Node, consumers: list) -> None:
        by_blocks: dict[tuple, list[fx.Node]] = {}
        factors: dict[tuple, tuple[Tensor | None, Tensor | None]] = {}
        for node, left, right in consumers:
            key = (None if left is None else left.shape[0], None if right is None else right.shape[0])
            by_blocks.setdefault(key, []).append(node)
            factors[key] = (left, right)
        order = {n: i for i, n in enumerate(gm.graph.nodes)}
        for key, nodes in by_blocks.items():
            first = min(nodes, key=order.__getitem__)
            args = [None if f is None else _shared_constant(gm, f"ditq_hadamard_{f.shape[0]}", f, first)
                    for f in factors[key]]
            with gm.graph.inserting_before(first):
                rotated = gm.graph.call_function(torch.ops.ditq.hadamard.default, (x, *args))
            rotated.meta["val"] = x.meta.get("val")
            meta.update(rotated, rotation=True)
            meta.copy_location(rotated, first)
            for node in nodes:
                node.args = (rotated, *node.args[1:])

    @staticmethod
    def _rotate_weights(gm: fx.GraphModule, node: fx.Node, plan: _Plan) -> None:
        weight = _linear_weight(gm, node).detach()
        bias_node = node.args[2] if len(node.args) > 2 else None
        w = weight.double()
        if plan.output_rotation is not None:
            w = plan.output_rotation @ w
        if plan.input_rotation is not None:
            w = w @ plan.input_rotation.T
        new_args = list(node.args)
        new_args[1] = register_constant(gm, f"ditq_{node.name}_rotated_weight", w.to(weight.dtype), node)
        if plan.output_rotation is not None and bias_node is not None:
            bias = fetch_attr(gm, bias_node.target).detach()
            new_args[2] = register_constant(gm, f"ditq_{node.name}_rotated_bias",
                                            (plan.output_rotation @ bias.double()).to(bias.dtype), node)
        node.args = tuple(new_args)


def _shared_constant(gm: fx.GraphModule, name: str, value: Tensor, anchor: fx.Node) -> fx.Node:
    """A get_attr of buffer ``name`` holding ``value``, registered once and shared by equal values."""
    base, index = name, 1
    while hasattr(gm, name) and not torch.equal(getattr(gm, name), value):
        name, index = f"{base}_{index}", index + 1
    if not hasattr(gm, name):
        gm.register_buffer(name, value.contiguous())
    with gm.graph.inserting_before(anchor):
        node = gm.graph.get_attr(name)
    node.meta["val"] = fetch_attr(gm, name)
    return node
