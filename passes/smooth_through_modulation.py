"""Divide a normalized, modulated linear input by a per-channel ``s`` folded into the norm or the modulation,
and multiply the consuming linears' weight columns by ``s`` (SmoothQuant-style smoothing, at no run-time cost).

The input of a DiT block's qkv (and of its fc1) is a normalized ``N = norm(h)`` modulated per sample by adaLN,

    X = N * P + T,      P = 1 + scale,  (scale, shift = T) rows of the modulation linear's output  (DiT, SD3, Flux)

and every linear reading X computes ``y = X W^T + b``. For any ``s > 0`` (one value per channel),

    y = (X / s) (W diag(s))^T + b,       X / s = N * (P / s) + T / s

so the activation quantizer sees ``X / s`` while the function is unchanged, for every timestep and class (the
modulation is per sample, ``s`` per channel). Where ``P`` and ``T`` are rows of a linear ``m = W_m e + b_m`` of
the block's own (their rows read through chunk / split / slice / unsqueeze), the division is folded into it:

    P = 1 + scale:   W_m[r_j] <- W_m[r_j] / s_j,   b_m[r_j] <- (b_m[r_j] + 1 - s_j) / s_j     (1 + scale' = P / s)
    T = shift:       W_m[r_j] <- W_m[r_j] / s_j,   b_m[r_j] <- b_m[r_j] / s_j

(``r_j`` the row giving channel j, found by running the index chain on row numbers). Where they are not
(PixArt's ``scale_shift_table + timestep``, whose ``timestep`` part is one linear shared by every block), the
division runs online on the modulation vectors, ``P / s`` and ``T / s``: B x C multiply-adds per site, not
B x tokens x C. The placement of each site is in its layers' notes.

A norm with its own affine (``N = norm(h) * gamma + beta``, e.g. the group norm in front of a U-Net
attention's q, k, v) folds ``gamma / s`` and ``beta / s``. Anything else between the norm and the linears
(a SiLU in front of a U-Net resnet's conv) would not commute with the division: such inputs are not sites.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Mapping

import torch
from torch import Tensor, fx
from torch.fx.passes.infra.pass_base import PassBase, PassResult

from ditq_compiler import meta
from ditq_compiler.graph import VIEW_OPS, module_path, op_name
from ditq_compiler.pipeline import PreconditionError, fetch_attr, register_constant

aten = torch.ops.aten
NORMS = {"layer_norm", "native_layer_norm", "group_norm", "native_group_norm", "rms_norm"}
LAYERS = ("linear", "conv2d")
GUARDS = "_guards_fn"          # torch.export's input check: reads the inputs, changes nothing
INDEX_OPS = VIEW_OPS | {"chunk", "split", "split_with_sizes", "slice", "select", "getitem", "unsqueeze", "squeeze",
                        "expand", "view", "reshape"}


@dataclass
class Source:
    """Where one modulation factor (``P`` or ``T``) comes from."""

    node: fx.Node                         # P or T itself, as the modulated input reads it
    linear: fx.Node | None = None         # the modulation linear it is rows of, when foldable
    rows: Tensor | None = None            # row of that linear giving each channel
    one_plus: bool = False                # P = S + 1 with S the rows (fold b' = (b + 1 - s) / s)


@dataclass
class SmoothingSite:
    """One smoothed input: the tensor ``X`` and the linears reading it."""

    x: fx.Node
    consumers: list[fx.Node]              # aten.linear / conv2d nodes reading X
    layers: list[str]                     # their layer names
    channels: int
    kind: str                             # "modulation" | "norm affine"
    multiplier: Source | None = None      # P (modulation)
    shift: Source | None = None           # T (modulation)
    gamma: fx.Node | None = None          # norm weight (norm affine)
    beta: fx.Node | None = None           # norm bias (norm affine)

    @property
    def name(self) -> str:
        return self.layers[0] if len(self.layers) == 1 else f"{self.layers[0]} (+{len(self.layers) - 1})"

    @property
    def placement(self) -> str:
        if self.kind == "norm affine":
            return "folded into the norm's affine"
        folded = [s for s in (self.multiplier, self.shift) if s is not None and s.linear is not None]
        if len(folded) == len([s for s in (self.multiplier, self.shift) if s is not None]):
            return f"folded into {module_path(folded[0].linear)}"
        return "online on the modulation (B x C per call)"


@dataclass
class Skipped:
    layer: str
    reason: str


@dataclass
class SiteSearch:
    """What ``find_sites`` returns: the sites, and the linears whose input could not be smoothed, with why."""

    sites: list[SmoothingSite] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)


# ---- finding the sites --------------------------------------------------------------------------------

def _per_sample(node: fx.Node, x: fx.Node) -> bool:
    """A value constant over every dim of ``x`` but the batch and the last (a modulation vector)."""
    val, ref = node.meta.get("val"), x.meta.get("val")
    if not isinstance(val, Tensor) or not isinstance(ref, Tensor) or val.dim() == 0:
        return False
    middle = list(val.shape[1:-1]) if val.dim() == ref.dim() else None
    return middle is not None and all(d == 1 for d in middle) and val.shape[-1] == ref.shape[-1]


def _operands(node: fx.Node, target) -> tuple | None:
    return tuple(node.args[:2]) if node.op == "call_function" and node.target is target else None


def _is_norm(node: fx.Node) -> bool:
    return op_name(node) in NORMS or (op_name(node) == "getitem" and op_name(node.args[0]) in NORMS)


def _source(node: fx.Node, one_plus: bool) -> Source:
    """Trace ``node`` back through index ops to a linear; fold only if the chain evaluates on row numbers."""
    chain, current = [], node
    while op_name(current) in INDEX_OPS and isinstance(current.args[0], fx.Node):
        chain.append(current)
        current = current.args[0]
    if op_name(current) != "linear" or not chain:
        return Source(node)
    rows = _row_map(current, list(reversed(chain)))
    if rows is None:
        return Source(node)
    return Source(node, current, rows, one_plus)


def _row_map(linear: fx.Node, chain: list[fx.Node]) -> Tensor | None:
    """Run ``chain`` (index ops only, constant arguments) on a copy of the linear's output holding row numbers;
    the last dim of the result gives, per channel, its row. None if the chain is not that simple."""
    val = linear.meta.get("val")
    if not isinstance(val, Tensor):
        return None
    shape = [1] * (val.dim() - 1) + [int(val.shape[-1])]
    env = {linear: torch.arange(shape[-1], dtype=torch.float64).reshape(shape)}
    try:
        for node in chain:
            args = [env[a] if isinstance(a, fx.Node) else a for a in node.args]
            if any(isinstance(a, fx.Node) and a not in env for a in node.args):
                return None
            env[node] = node.target(*args, **node.kwargs) if node.target is not operator.getitem \
                else operator.getitem(*args)
        out = env[chain[-1]]
    except Exception:     # a view op with symbolic sizes: not foldable, the online form applies
        return None
    flat = out.reshape(-1, out.shape[-1])
    if not bool((flat == flat[:1]).all()):
        return None
    return flat[0].round().long()


def _modulated(x: fx.Node) -> tuple[fx.Node, Source, Source | None] | None:
    """``X = N * P + T`` (or ``N * P``) with N a norm's output and P, T per-sample vectors: (N, P, T)."""
    shift = None
    product = x
    pair = _operands(x, aten.add.Tensor)
    if pair is not None and all(isinstance(a, fx.Node) for a in pair):
        a, b = pair
        if _per_sample(b, x):
            product, shift = a, b
        elif _per_sample(a, x):
            product, shift = b, a
        else:
            return None
    pair = _operands(product, aten.mul.Tensor)
    if pair is None or not all(isinstance(a, fx.Node) for a in pair):
        return None
    norm, multiplier = pair if _per_sample(pair[1], x) else (pair[1], pair[0])
    if not (_per_sample(multiplier, x) and _is_norm(norm)):
        return None
    one_plus = _operands(multiplier, aten.add.Tensor)
    scale = None
    if one_plus is not None:
        scale = next((a for a, b in (one_plus, one_plus[::-1]) if isinstance(a, fx.Node) and b == 1), None)
    m_source = _source(scale, one_plus=True) if scale is not None else _source(multiplier, one_plus=False)
    m_source.node = multiplier
    return norm, m_source, None if shift is None else _source(shift, one_plus=False)


def _norm_affine(x: fx.Node) -> tuple[fx.Node, fx.Node] | None:
    """``X = norm(h; gamma, beta)`` with constant gamma and beta used only there: (gamma, beta)."""
    node = x.args[0] if op_name(x) == "getitem" else x
    if op_name(node) not in ("layer_norm", "native_layer_norm", "group_norm", "native_group_norm"):
        return None
    weight_index = {"layer_norm": 2, "native_layer_norm": 2, "group_norm": 2, "native_group_norm": 1}[op_name(node)]
    args = list(node.args) + [None] * 4
    gamma, beta = args[weight_index], args[weight_index + 1]
    if op_name(node) == "native_group_norm":
        gamma, beta = args[1], args[2]
    if not all(isinstance(p, fx.Node) and p.op == "get_attr" and len(p.users) == 1 for p in (gamma, beta)):
        return None
    return gamma, beta


def _readers(x: fx.Node) -> tuple[list[fx.Node], str | None]:
    """The linears / convs reading ``x`` as their input through view ops, or why it has another kind of reader."""
    linears, frontier = [], [(user, x) for user in x.users]
    while frontier:
        user, parent = frontier.pop()
        if op_name(user) in LAYERS and user.args[0] is parent:
            linears.append(user)
        elif op_name(user) in VIEW_OPS and user.args[0] is parent:
            frontier.extend((u, user) for u in user.users)
        elif op_name(user) != "_assert_tensor_metadata" and not (user.op == "call_module" and user.target == GUARDS):
            return [], (f"also read by a {op_name(user) or user.op} ('{module_path(user)}'), which the division "
                        "would change")
    return linears, None


def _channel_identity(x: fx.Node, layer: fx.Node, channels: int) -> bool:
    """The view chain from ``x`` to the layer keeps channel j of x (its dim 1 after a group norm, else its last)
    as channel j of the layer's input (a linear's last dim, a conv's dim 1)."""
    chain, current = [], layer.args[0]
    while current is not x:
        chain.append(current)
        current = current.args[0]
    val = x.meta.get("val")
    norm = x.args[0] if op_name(x) == "getitem" else x
    axis = 1 if op_name(norm) in ("group_norm", "native_group_norm") else -1
    shape = [1] * val.dim()
    shape[axis] = channels
    probe = torch.arange(channels, dtype=torch.float64).reshape(shape)
    try:
        out = probe
        for node in reversed(chain):
            out = node.target(out, *[a for a in node.args[1:]], **node.kwargs)
        out = out.movedim(1, -1) if op_name(layer) == "conv2d" else out
        return bool((out.reshape(-1, channels) == torch.arange(channels, dtype=torch.float64)).all())
    except Exception:
        return False


def find_sites(gm: fx.GraphModule, layers: Mapping[str, str]) -> SiteSearch:
    """The smoothable inputs of the linears and convs ``layers`` (node name -> layer name), by input tensor."""
    found = SiteSearch()
    nodes = {n.name: n for n in gm.graph.nodes}
    by_input: dict[fx.Node, list[fx.Node]] = {}
    for name in layers:
        node = nodes[name]
        if op_name(node) not in LAYERS:
            found.skipped.append(Skipped(layers[name], f"a {op_name(node)}: smoothing is for linears and convs"))
            continue
        x = node.args[0]
        while op_name(x) in VIEW_OPS:
            x = x.args[0]
        by_input.setdefault(x, []).append(node)
    for x, wanted in by_input.items():
        names = [layers[n.name] for n in wanted]
        readers, reason = _readers(x)
        missing = [module_path(r) for r in readers if r.name not in layers]
        if reason is None and missing:
            reason = f"also read by '{missing[0]}', which is not quantized"
        modulated = _modulated(x) if reason is None else None
        affine = _norm_affine(x) if reason is None and modulated is None else None
        if reason is None and modulated is None and affine is None:
            reason = (f"its input is the output of a {op_name(x) or x.op} ('{module_path(x)}'), not of a norm "
                      "(modulated, or with its own affine) that the division could be folded into")
        channels = int(fetch_attr(gm, wanted[0].args[1].target).shape[1]) if reason is None else 0
        if reason is None and not all(_channel_identity(x, r, channels) for r in readers):
            reason = "the view ops between the norm and the linear move channels"
        if reason is not None:
            found.skipped.extend(Skipped(n, reason) for n in names)
            continue
        readers.sort(key=lambda r: list(gm.graph.nodes).index(r))
        site = SmoothingSite(x, readers, [layers[r.name] for r in readers], channels,
                             "modulation" if modulated else "norm affine")
        if modulated:
            _, site.multiplier, site.shift = modulated
        else:
            site.gamma, site.beta = affine
        found.sites.append(site)
    _unshare(found.sites)
    return found


def _unshare(sites: list[SmoothingSite]) -> None:
    """A modulation row that two sites would fold into (a linear shared between blocks) is divided online."""
    claimed: dict[tuple[fx.Node, int], int] = {}
    for i, site in enumerate(sites):
        for source in (site.multiplier, site.shift):
            if source is not None and source.linear is not None:
                for row in source.rows.tolist():
                    claimed.setdefault((source.linear, row), i)
    for i, site in enumerate(sites):
        for source in (site.multiplier, site.shift):
            if source is not None and source.linear is not None and any(
                    claimed[(source.linear, row)] != i for row in source.rows.tolist()):
                source.linear, source.rows = None, None
    for site in sites:   # a linear read by anything but modulation chains cannot be folded into either
        for source in (site.multiplier, site.shift):
            if source is not None and source.linear is not None and len(source.linear.users) != 1:
                source.linear, source.rows = None, None


# ---- the rewrite ----------------------------------------------------------------------------------------

class SmoothThroughModulation(PassBase):
    """The pass; ``factors`` maps each site's first consumer node name -> ``s`` (positive, one per channel),
    ``alphas`` (optional) the migration strength each was chosen with, for the notes."""

    name = "smooth_through_modulation"

    def __init__(self, sites: list[SmoothingSite], factors: Mapping[str, Tensor],
                 alphas: Mapping[str, float] | None = None):
        self.sites = sites
        self.factors = factors
        self.alphas = alphas or {}

    def requires(self, gm: fx.GraphModule) -> None:
        nodes = set(gm.graph.nodes)
        for site in self.sites:
            key = site.consumers[0].name
            s = self.factors.get(key)
            if s is None:
                continue
            if not all(c in nodes for c in site.consumers):
                raise PreconditionError(f"{self.name}: site '{site.name}' is not in this graph (find its sites on "
                                        "the graph being rewritten)")
            if tuple(s.shape) != (site.channels,) or not bool((s > 0).all()) or not bool(torch.isfinite(s).all()):
                raise PreconditionError(f"{self.name}: s for '{site.name}' must be {site.channels} positive finite "
                                        f"values, got shape {tuple(s.shape)}")

    def call(self, gm: fx.GraphModule) -> PassResult:
        done = 0
        for site in self.sites:
            s = self.factors.get(site.consumers[0].name)
            if s is None:
                continue
            s = s.to(torch.float64)
            if site.kind == "norm affine":
                _fold_affine(gm, site, s)
            else:
                for source, one_plus in ((site.multiplier, site.multiplier.one_plus), (site.shift, False)):
                    if source is None:
                        continue
                    if source.linear is not None:
                        _fold_rows(gm, source, s, one_plus)
                    else:
                        _divide_online(gm, source.node, s, site)
            for consumer in site.consumers:
                weight = fetch_attr(gm, consumer.args[1].target).detach()
                column = s.reshape(1, -1, *[1] * (weight.dim() - 2))     # input channel: dim 1 of (out, in, ...)
                scaled = register_constant(gm, f"ditq_{consumer.name}_smoothed_weight",
                                           (weight.double() * column).to(weight.dtype), consumer)
                consumer.args = (consumer.args[0], scaled, *consumer.args[2:])
                meta.record_applied(consumer, self.name, placement=site.placement, channels=site.channels,
                                    alpha=self.alphas.get(site.consumers[0].name),
                                    s_min=float(s.min()), s_max=float(s.max()))
            done += 1
        if done:
            gm.graph.eliminate_dead_code()
            gm.recompile()
        return PassResult(gm, bool(done))


def _replace_constant(gm: fx.GraphModule, node: fx.Node, name: str, value: Tensor) -> None:
    """Point ``node``'s use of a get_attr constant at a new constant ``value``."""
    old = node
    new = register_constant(gm, name, value, old)
    old.replace_all_uses_with(new)
    new.meta.update({k: v for k, v in old.meta.items() if k != "val"})


def _fold_rows(gm: fx.GraphModule, source: Source, s: Tensor, one_plus: bool) -> None:
    linear, rows = source.linear, source.rows
    weight_node, bias_node = linear.args[1], linear.args[2] if len(linear.args) > 2 else None
    weight = fetch_attr(gm, weight_node.target).detach().double().clone()
    weight[rows] = weight[rows] / s.reshape(-1, 1)
    _replace_constant(gm, weight_node, f"ditq_{linear.name}_smoothed_weight", weight.float())
    if bias_node is None and not one_plus:
        return
    bias = fetch_attr(gm, bias_node.target).detach().double().clone() if bias_node is not None \
        else torch.zeros(weight.shape[0], dtype=torch.float64)
    bias[rows] = (bias[rows] + 1 - s) / s if one_plus else bias[rows] / s
    if bias_node is None:
        new = register_constant(gm, f"ditq_{linear.name}_smoothed_bias", bias.float(), linear)
        linear.args = (*linear.args[:2], new, *linear.args[3:])
    else:
        _replace_constant(gm, bias_node, f"ditq_{linear.name}_smoothed_bias", bias.float())


def _divide_online(gm: fx.GraphModule, value: fx.Node, s: Tensor, site: SmoothingSite) -> None:
    inverse = register_constant(gm, f"ditq_{value.name}_smooth_inverse", (1 / s).float(), value.next)
    with gm.graph.inserting_after(inverse):
        divided = gm.graph.call_function(aten.mul.Tensor, (value, inverse))
    divided.meta["val"] = value.meta.get("val")
    meta.copy_location(divided, site.consumers[0])
    meta.update(divided, transform="smooth (online)")
    for user in list(value.users):
        if user is not divided and user in _consumers_of_value(site):
            user.replace_input_with(value, divided)


def _consumers_of_value(site: SmoothingSite) -> set[fx.Node]:
    """The nodes of the modulated input that read P or T (the mul and the add forming X)."""
    product = site.x.args[0] if op_name(site.x.args[0]) == "mul" else site.x.args[1]
    return {site.x, product} if op_name(site.x) == "add" else {site.x}


def _fold_affine(gm: fx.GraphModule, site: SmoothingSite, s: Tensor) -> None:
    for param, suffix in ((site.gamma, "weight"), (site.beta, "bias")):
        value = fetch_attr(gm, param.target).detach().double()
        _replace_constant(gm, param, f"ditq_{site.consumers[0].name}_smoothed_norm_{suffix}", (value / s).float())


__all__ = ["SiteSearch", "Skipped", "SmoothThroughModulation", "SmoothingSite", "find_sites"]
