"""Block-wise reconstruction of quantization parameters (TaQ-DiT Eq. 4, on BRECQ / QDrop).

The float graph is copied and every layer the recipe quantizes becomes a ``ReconLayer``
(learnable rounding ``V``, activation scale ``s_a``, migration factors ``a``; see
``recon_layer.py``). Layers are grouped into units: a DiT block (the module path up to its
first numeric component, e.g. ``transformer_blocks.3``), or a single layer outside any block.
Units are reconstructed in graph order. For unit ``u``:

    inputs   x_q : the unit's inputs in the model whose earlier units are already quantized
             x_fp: the same inputs in the float model;   target y = unit_fp(x_fp)
    joint    minimise  ||unit_q(x~) - y||^2 + lambda * sum_layers round_loss(V; b)
             over V, s_a and a together (Adam; s_a with lr 4e-5 and cosine decay), with QDrop:
             x~ mixes x_q and x_fp elementwise with probability drop_prob, and inside the unit
             each quantized activation keeps its float value with probability drop_prob
    separate first V with float activations over all units, then s_a (and a) with the weights
             fixed to their learned rounding: the baseline of TaQ-DiT Table I / IV

``||.||^2`` sums over the channel (last) dimension and averages over the rest: BRECQ's
``lp_loss`` sums over dim 1, the channels of its (B, C, H, W) convs; for DiT's (B, N, D)
tokens the channels are D.
The round loss is off for the first ``warmup`` fraction of iterations, then ``b`` falls
linearly from ``b_start`` to ``b_end``. The unit is cut out of the graph as its own
GraphModule (its inputs: every value it reads from outside, shape-only inputs such as the
batch size are recomputed inside), so an iteration runs the unit only.

x_q and x_fp are not recorded by running the model from its input for every unit (k blocks of
forward for block k, O(depth^2) in all) but carried (``_Sweep``): one float and one quantized
forward per calibration batch advance unit by unit, the quantized one through each unit only
once it has been learned, keeping the values live at the unit boundary. y runs the unit's float
layers before they learn, in a fork of the float sweep. This gives bitwise the values of
recording from scratch.

Over several processes (``ditq_compiler.distributed``) every rank records the unit's inputs and
targets on the whole calibration set (a forward of one block: a small part of a unit's time) and draws
the same minibatch every step from the same generator; rank r computes the rows
[r m / N, (r + 1) m / N) of it, with the QDrop masks those rows get in one process. Each rank's loss is
its rows' share of the minibatch loss (sums over its rows divided by the minibatch's count), so the
gradients summed over the ranks are the minibatch gradient. The weight side of each layer (its soft
weight, round loss and Adam on V and the factors) is learned by one rank, which hands its W_hat to the
others every step (``_LayerOwners``). Only the order of float additions differs from one process.
"""

from __future__ import annotations

import copy
import math
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any, Iterable, Mapping

import torch
from torch import Tensor, fx
from tqdm.auto import tqdm

from ditq_compiler.calibration.cache import WorkCache, pack, unpack
from ditq_compiler.calibration.params import QuantParams
from ditq_compiler.calibration.recon_layer import ReconLayer, keep_float_mask
from ditq_compiler.distributed import SINGLE, Distributed
from ditq_compiler.graph import module_path, unit_of
from ditq_compiler.meta import LayerAnnotation
from ditq_compiler.pipeline import copy_graph_sharing_tensors
from ditq_compiler.trainable import PREFIX, learned_params, swap_in_trainable_layers
from ditq_compiler.recipe import ReconstructionSpec

@dataclass
class _Unit:
    name: str
    layers: list[str]
    module: fx.GraphModule
    inputs: list[fx.Node]
    outputs: list[fx.Node]


def _is_tensor_value(node: fx.Node) -> bool:
    return isinstance(node.meta.get("val"), torch.Tensor)


def _cut_unit(gm: fx.GraphModule, name: str, layer_nodes: list[str]) -> _Unit:
    calls = {PREFIX + n for n in layer_nodes}
    members = set()
    for node in gm.graph.nodes:
        if node.op == "call_module" and node.target in calls:
            members.add(node)
        elif node.op == "call_function" and len(layer_nodes) > 1:
            path = module_path(node)
            if path == name or path.startswith(name + "."):
                members.add(node)
    # shape-only values (the batch size as a SymInt) are recomputed inside the unit
    changed = True
    while changed:
        changed = False
        for node in list(members):
            for arg in node.all_input_nodes:
                if arg not in members and arg.op == "call_function" and not _is_tensor_value(arg):
                    members.add(arg)
                    changed = True
    ordered = [n for n in gm.graph.nodes if n in members]
    inputs: list[fx.Node] = []
    for node in ordered:
        for arg in node.all_input_nodes:
            if arg not in members and arg.op != "get_attr" and arg not in inputs:
                inputs.append(arg)
    outputs = [n for n in ordered if _is_tensor_value(n) and any(u not in members for u in n.users)]
    graph, env = fx.Graph(), {}
    for node in inputs:
        env[node] = graph.placeholder(node.name)
        env[node].meta = dict(node.meta)
    for node in ordered:
        env[node] = graph.node_copy(node, lambda a: env[a] if a in env else _copy_attr(graph, env, a))
    graph.output(tuple(env[n] for n in outputs))
    return _Unit(name, layer_nodes, fx.GraphModule(gm, graph), inputs, outputs)


def _copy_attr(graph: fx.Graph, env: dict, node: fx.Node) -> fx.Node:
    if node.op != "get_attr":
        raise ValueError(f"reconstruction unit reads node '{node.name}' that is neither an input nor a constant")
    env[node] = graph.get_attr(node.target)
    env[node].meta = dict(node.meta)
    return env[node]


def _batched(node: fx.Node) -> bool:
    val = node.meta.get("val")
    return isinstance(val, torch.Tensor) and val.dim() > 0 and isinstance(val.shape[0], torch.SymInt)


class _Sweep:
    """The graph run on one calibration batch node by node, on demand, keeping only live values.

    ``advance(nodes)`` runs just the nodes the wanted values need that have not run yet, so after
    unit k has been recorded, recording unit k+1 runs the graph between them (block k), not the k+1
    blocks from the model input: reconstruction costs O(depth) forwards, not O(depth^2). A value is
    dropped once every node reading it has run and no later unit asks for it (``asks``: how often
    each node will be asked for, by ``advance``, or ``release`` for a unit taken from the cache), so
    what is carried is what is live at the unit boundary (block k's outputs, the timestep/class
    inputs, a U-Net's skip connections, the input a unit's batch size is read from).

    Carried values are exact only while every layer that produced them is in the state it ran in
    (``ReconLayer.forward_state``: mode, and the versions of its learned tensors). If one has
    changed since (it ran before it was learned, as a graph order that reads a unit's layers before
    the unit's inputs would make it), the sweep starts over from the model input, which is what
    recording from scratch does: the carried result is the from-scratch result in every case.
    """

    def __init__(self, gm: fx.GraphModule, flat: list[Any], asks: Mapping[fx.Node, int]):
        self.interpreter = fx.Interpreter(gm, garbage_collect_values=False)
        self.flat, self.asks = flat, dict(asks)
        self.position = {node: i for i, node in enumerate(gm.graph.nodes)}
        self.restart()

    def restart(self) -> None:
        self.env: dict[fx.Node, Any] = {}          # values still to be read
        self.ran: set[fx.Node] = set()
        self.readers: dict[fx.Node, int] = {}      # node -> users yet to run + asks yet to come
        self.layer_states: dict[fx.Node, tuple] = {}
        self.interpreter.args_iter = iter(self.interpreter.graph.process_inputs(*self.flat))
        self._run([n for n in self.interpreter.graph.nodes if n.op == "placeholder"], set())

    def fork(self) -> "_Sweep":
        """A throw-away copy that can run ahead (through a unit) without moving this sweep."""
        other = copy.copy(self)
        other.env, other.ran, other.readers = dict(self.env), set(self.ran), dict(self.readers)
        other.layer_states, other.asks = dict(self.layer_states), {}
        return other

    def _stale(self) -> bool:
        return any(self.interpreter.fetch_attr(node.target).forward_state() != state
                   for node, state in self.layer_states.items())

    def advance(self, nodes: list[fx.Node]) -> dict[str, Any]:
        """The values of ``nodes`` on this batch, running what they need and has not run yet."""
        if self._stale() or any(n in self.ran and n not in self.env for n in nodes):
            self.restart()
        values = {n.name: self.env[n] for n in nodes if n in self.env}
        needed, stack = set(), [n for n in nodes if n not in self.ran]
        while stack:
            node = stack.pop()
            if node not in needed and node not in self.ran:
                needed.add(node)
                stack.extend(node.all_input_nodes)
        values.update(self._run(sorted(needed, key=self.position.__getitem__), set(nodes)))
        self.release(nodes)
        return values

    def release(self, nodes: list[fx.Node]) -> None:
        """One ask of each of ``nodes`` is answered (or no longer needed)."""
        for node in nodes:
            if self.asks.get(node, 0) > 0:
                self.asks[node] -= 1
                if node in self.readers:
                    self._read(node)

    def _read(self, node: fx.Node) -> None:
        self.readers[node] -= 1
        if self.readers[node] == 0:
            self.env.pop(node, None)

    def _run(self, nodes: list[fx.Node], wanted: set[fx.Node]) -> dict[str, Any]:
        # nodes nothing reads (torch.export's metadata assertions and guards) are never wanted: they
        # run with the nodes they check, as in a full forward, or what they read would never be freed
        ready = self.ran.union(nodes)
        checks = {user for node in nodes for user in node.users if not user.users and user.op != "output"
                  and user not in ready and all(arg in ready for arg in user.all_input_nodes)}
        values = {}
        self.interpreter.env = self.env
        for node in sorted((*nodes, *checks), key=self.position.__getitem__):
            value = self.interpreter.run_node(node)
            self.ran.add(node)
            if node in wanted:
                values[node.name] = value
            if node.op == "call_module" and isinstance(layer := self.interpreter.fetch_attr(node.target), ReconLayer):
                self.layer_states[node] = layer.forward_state()
            self.readers[node] = len(node.users) + self.asks.get(node, 0)
            if self.readers[node]:
                self.env[node] = value
            for arg in node.all_input_nodes:
                self._read(arg)
        return values


def _sweeps(gm: fx.GraphModule, batches: list[list[Any]], asks: Mapping[fx.Node, int] | None = None) -> list[_Sweep]:
    return [_Sweep(gm, flat, asks or {}) for flat in batches]


def _record(sweeps: Iterable[_Sweep], nodes: list[fx.Node]) -> dict[str, Any]:
    """Values of ``nodes`` over all batches: batch-dependent tensors concatenated, others from batch 0."""
    with torch.no_grad():
        per_batch = [sweep.advance(nodes) for sweep in sweeps]
    return {n.name: (torch.cat([v[n.name] for v in per_batch]) if _batched(n) else per_batch[0][n.name])
            for n in nodes}


def _set_modes(layers: Mapping[str, ReconLayer], done: set[str], weight_mode: str, act_quant: bool) -> None:
    """Layers in ``done`` run hard-quantized with ``act_quant``; the rest in float."""
    for name, layer in layers.items():
        quantized = name in done
        layer.weight_mode = weight_mode if quantized else "fp"
        layer.act_quant = act_quant and quantized
        layer.drop_prob = 0.0


def _lp_loss(outputs: tuple, targets: tuple, share: tuple[int, int, int] | None = None,
             batched: tuple[bool, ...] = (), first: bool = True) -> Tensor:
    """sum over the outputs of ||out - target||^2 (summed over the last dimension, averaged over the rest).

    ``share = (m, a, b)``: the outputs hold rows [a, b) of a minibatch of m rows (those ``batched``); the loss
    is their part of the minibatch's, so the parts of all ranks add up to it. An output without a batch
    dimension counts on the ``first`` rank only."""
    loss = 0.0
    for i, (out, target) in enumerate(zip(outputs, targets, strict=True)):
        if isinstance(out, Tensor) and out.is_floating_point():
            square = (out - target).float().square()
            term = square.sum(-1).mean() if square.dim() else square
            if share is not None:
                if not batched[i]:
                    term = term if first else 0.0
                elif square.dim() > 1:        # a 1-D output's term is the sum over its rows already
                    m, a, b = share
                    rows = square.sum(-1)
                    term = rows.sum() / (rows.numel() * m // (b - a))
            loss = loss + term
    return loss


def _temperature(spec: ReconstructionSpec, step: int) -> float | None:
    """b for the round loss at ``step``, or None during warm-up (no round loss)."""
    warm = int(spec.warmup * spec.iterations)
    if step < warm:
        return None
    progress = (step - warm) / max(1, spec.iterations - warm)
    return spec.b_end + (spec.b_start - spec.b_end) * max(0.0, 1.0 - progress)


def _train_unit(unit: _Unit, layers: list[ReconLayer], x_q: dict, x_fp: dict, target: tuple,
                spec: ReconstructionSpec, learn_rounding: bool, learn_acts: bool, qdrop: bool,
                generator: torch.Generator, progress: bool, dist: Distributed = SINGLE) -> tuple[float, float]:
    owners = _LayerOwners(layers, dist)        # over several processes, who learns each layer's weight side
    params_w = [layer.rounding for layer in owners.mine] if learn_rounding else []
    params_a = [layer.act_scale for layer in layers if layer.act_scale is not None] if learn_acts else []
    params_f = [layer.log_factors for layer in owners.mine if layer.log_factors is not None] if learn_acts else []
    groups = [g for g in ({"params": params_w, "lr": spec.weight_lr}, {"params": params_f, "lr": spec.factor_lr})
              if g["params"]]
    optimizers = [torch.optim.Adam(groups)] if groups else []
    schedulers = []
    if params_a:
        act_optimizer = torch.optim.Adam(params_a, lr=spec.act_lr)
        optimizers.append(act_optimizer)
        schedulers.append(torch.optim.lr_scheduler.CosineAnnealingLR(act_optimizer, T_max=spec.iterations,
                                                                     eta_min=0.0))
    learns_factors = learn_acts and any(layer.log_factors is not None for layer in layers)
    if not (learn_rounding or params_a or learns_factors) or spec.iterations == 0:   # the same on every rank
        return math.nan, math.nan
    before = _evaluate(unit, layers, x_q, target, spec, learn_acts, dist)
    for layer in layers:
        layer.weight_mode = "soft" if learn_rounding else "hard"
        layer.act_quant = learn_acts
        layer.drop_prob = spec.drop_prob if qdrop else 0.0
    names = [n.name for n in unit.inputs]
    size = next(x_q[n.name].shape[0] for n in unit.inputs if _batched(n))
    m = min(spec.batch_size, size)
    mine, share = slice(None), None                        # this rank's rows of each minibatch (module doc)
    if dist.active:
        if m < dist.world_size:
            raise ValueError(f"reconstruction minibatches of {m} rows cannot be split over {dist.world_size} "
                             "processes: raise reconstruction.batch_size, or use fewer processes")
        mine = dist.split(m)
        share = (m, mine.start, mine.stop)
    for layer in layers:
        layer.share = share
    batched = tuple(_batched(node) for node in unit.outputs)
    bar = tqdm(range(spec.iterations), desc=f"reconstruct {unit.name}", unit="it", disable=not progress,
               leave=False)
    unit.module.train()
    for step in bar:
        index = torch.randint(0, size, (m,), generator=generator)[mine]
        owners.share_weights()
        args = []
        for node, name in zip(unit.inputs, names, strict=True):
            value = x_q[name]
            if _batched(node):
                value = value[index]
                if qdrop and value.is_floating_point() and spec.drop_prob > 0:
                    mask = keep_float_mask(value.shape, spec.drop_prob, generator, share)
                    value = torch.where(mask, x_fp[name][index], value)
            args.append(value)
        wanted = tuple(t[index] if _batched(node) else t for node, t in zip(unit.outputs, target, strict=True))
        rec = _lp_loss(unit.module(*args), wanted, share, batched, dist.is_main)
        b = _temperature(spec, step) if learn_rounding else None
        for optimizer in optimizers:
            optimizer.zero_grad()
        if dist.active:
            rec.backward()
            owners.finish_gradients(None if b is None else (spec.round_loss_weight, b))
        else:
            loss = rec if b is None else rec + spec.round_loss_weight * sum(layer.round_loss(b) for layer in layers)
            loss.backward()
        for optimizer in optimizers:
            optimizer.step()
        for scheduler in schedulers:
            scheduler.step()
        if step % 50 == 0:
            bar.set_postfix(rec=f"{float(rec.detach()):.3g}", round="-" if b is None else f"{b:.1f}")
    unit.module.eval()
    owners.close()
    for layer in layers:
        layer.share = None
    for optimizer in optimizers:   # the last step's gradients would otherwise stay, one weight-sized
        optimizer.zero_grad(set_to_none=True)   # tensor per layer for the rest of the compile,
        optimizer.state.clear()   # and Adam's two moments until the cyclic GC frees the optimizer
    return before, _evaluate(unit, layers, x_q, target, spec, learn_acts, dist)


class _LayerOwners:
    """Over several processes, each layer's weight side is learned by one rank, its owner: the soft weight
    W_hat(V, a) and its backward, the round loss and Adam on V and the migration factors a. So the work of
    a step that does not grow with the minibatch is split too, not repeated on every rank.

    A step: every owner computes W_hat of its layers and the ranks exchange them (with the owners' current
    factors, which the input side x / a reads); every rank runs its rows through the unit with those
    W_hat as leaves; the gradients of the W_hat, the activation scales and the factors' input side are
    summed over the ranks; each owner then carries dL/dW_hat back to V and a (W_hat = W0 diag(a), rounded
    with h(V)) and adds its layers' round loss. The sums are the one-process gradient; the activation
    scales are stepped on every rank, V and a by their owner, and ``close`` hands the owners' V and a to
    every rank. Layers are assigned largest first to the rank with the fewest weights so far.
    """

    def __init__(self, layers: list[ReconLayer], dist: Distributed):
        self.layers, self.dist = layers, dist
        load = [0] * dist.world_size
        self.owner: dict[int, int] = {}
        for i in sorted(range(len(layers)), key=lambda i: -layers[i].base_weight.numel()):
            self.owner[i] = min(range(dist.world_size), key=lambda r: (load[r], r))
            load[self.owner[i]] += layers[i].base_weight.numel()
        self.mine = [layer for i, layer in enumerate(layers) if self.owner[i] == dist.rank]
        self.soft: dict[int, Tensor] = {}

    @staticmethod
    def _factors(layer: ReconLayer) -> list[Tensor]:
        return [] if layer.log_factors is None else [layer.log_factors]

    def _from_owners(self, tensors: list[list[Tensor]]) -> list[list[Tensor]]:
        """``tensors[i]``: tensors of layer i, whose values count on its owner only; their owners' values, on
        every rank (each element is written by one rank: ``Distributed.place``)."""
        flat = torch.cat([t.detach().reshape(-1).float() if self.owner[i] == self.dist.rank else
                          torch.zeros(t.numel()) for i, layer_tensors in enumerate(tensors) for t in layer_tensors])
        shared, offset, found = self.dist.place(flat), 0, []
        for layer_tensors in tensors:
            found.append([])
            for t in layer_tensors:
                found[-1].append(shared[offset:offset + t.numel()].view(t.shape))
                offset += t.numel()
        return found

    def share_weights(self) -> None:
        """Owners compute their layers' W_hat; every rank gets every W_hat (as a leaf) and the owners' factors."""
        if not self.dist.active:
            return
        for layer in self.layers:
            for t in (layer.act_scale, layer.log_factors):   # a layer another rank owns keeps last step's sums
                if t is not None:
                    t.grad = None
        for layer in self.mine:
            layer.weight_override = None          # last step's W_hat: the owner computes this step's
        self.soft = {i: layer.quantized_weight() for i, layer in enumerate(self.layers)
                     if self.owner[i] == self.dist.rank}
        shared = self._from_owners([[self.soft.get(i, layer.base_weight), *self._factors(layer)]
                                    for i, layer in enumerate(self.layers)])
        for i, (layer, (weight, *factors)) in enumerate(zip(self.layers, shared, strict=True)):
            layer.weight_override = weight.requires_grad_()
            if factors and self.owner[i] != self.dist.rank:
                with torch.no_grad():
                    layer.log_factors.copy_(factors[0])

    def finish_gradients(self, round_loss: tuple[float, float] | None) -> None:
        """Sum the data side's gradients over the ranks; owners carry them on to V and a, plus the round loss
        ``(weight, b)`` of their layers."""
        grads = [(t, t.grad) for layer in self.layers for t in
                 (layer.weight_override, layer.act_scale, layer.log_factors) if t is not None]
        summed = self.dist.total(torch.cat([(g if g is not None else torch.zeros_like(t)).reshape(-1)
                                            for t, g in grads]))
        offset = 0
        for t, _ in grads:
            t.grad = summed[offset:offset + t.numel()].view_as(t)
            offset += t.numel()
        for i, soft in self.soft.items():
            if soft.requires_grad:
                soft.backward(self.layers[i].weight_override.grad)
        if round_loss is not None and self.mine:
            weight, b = round_loss
            (weight * sum(layer.round_loss(b) for layer in self.mine)).backward()

    def close(self) -> None:
        """Every rank gets the owners' V and factors; the layers make their own W_hat again."""
        if not self.dist.active:
            return
        mine = [[layer.rounding, *self._factors(layer)] for layer in self.layers]
        with torch.no_grad():
            for layer, tensors, values in zip(self.layers, mine, self._from_owners(mine), strict=True):
                layer.weight_override = None
                for t, value in zip(tensors, values, strict=True):
                    t.copy_(value)
        self.soft = {}


def _evaluate(unit: _Unit, layers: list[ReconLayer], x_q: dict, target: tuple, spec: ReconstructionSpec,
              act_quant: bool, dist: Distributed = SINGLE) -> float:
    """The unit's loss on all calibration samples with hard rounding and no QDrop (each rank its share of
    them).

    Before learning, hard rounding is round-to-nearest (V starts at h(V) = frac(W/s)).
    """
    for layer in layers:
        layer.weight_mode, layer.act_quant, layer.drop_prob = "hard", act_quant, 0.0
    size = next(x_q[n.name].shape[0] for n in unit.inputs if _batched(n))
    mine = dist.shard(size)
    total = 0.0
    with torch.no_grad():
        for start in range(mine.start, mine.stop, 256):
            index = torch.arange(start, min(mine.stop, start + 256))
            args = [x_q[n.name][index] if _batched(n) else x_q[n.name] for n in unit.inputs]
            wanted = tuple(t[index] if _batched(n) else t for n, t in zip(unit.outputs, target, strict=True))
            total += float(_lp_loss(unit.module(*args), wanted)) * len(index)
    return float(dist.total(torch.tensor(total, dtype=torch.float64))) / size


def reconstruct(gm: fx.GraphModule, annotations: Mapping[str, LayerAnnotation],
                act_qparams: Mapping[str, tuple[Tensor, Tensor]], batches: list[list[Any]],
                spec: ReconstructionSpec, progress: bool = True,
                cache: WorkCache | None = None, dist: Distributed = SINGLE) -> QuantParams:
    """Learn rounding, activation scales and migration factors unit by unit (see module doc).

    Returns the learned ``weights`` (codes), ``activations`` (scales) and ``factors`` of every layer, and a
    ``trace`` entry per ``phase:unit`` (loss before and after, seconds, of which learning; 0 s when cached).
    ``gm`` is the float graph after shift and migration; it is not modified. With a ``cache``,
    each finished unit (its layers' learned state and the random generator's state after it)
    is stored, and a unit found there is loaded instead of learned again (``cache.py``). ``dist``: the
    ranks split each step's minibatch (module doc).
    """
    if not batches:
        raise ValueError("reconstruction needs calibration batches; the calibration set is empty")
    train = copy_graph_sharing_tensors(gm)   # the weights are only read
    train.requires_grad_(False)   # only the reconstruction parameters learn
    layers = swap_in_trainable_layers(train, annotations, act_qparams, ReconLayer.from_source,
                                      take_affine=True)
    units: dict[str, list[str]] = {}
    for node_name, annotation in annotations.items():
        units.setdefault(unit_of(annotation.name), []).append(node_name)
    cut = [_cut_unit(train, name, members) for name, members in units.items()]
    generator = torch.Generator().manual_seed(spec.seed)
    for layer in layers.values():
        layer.generator = generator
    result = QuantParams()
    phases = ([("joint", True, True, True)] if spec.mode == "joint"
              else [("weights", True, False, False), ("activations", False, True, False)])
    done: set[str] = set()
    for phase, learn_rounding, learn_acts, qdrop in phases:
        done = set()
        asks = Counter(node for unit in cut for node in unit.inputs)
        fp_sweeps, q_sweeps = _sweeps(train, batches, asks), _sweeps(train, batches, asks)
        weight_mode = "hard"
        for unit in tqdm(cut, desc=f"reconstruct ({phase})", unit="block", disable=not progress):
            unit_layers = [layers[n] for n in unit.layers]
            act_on = learn_acts or phase == "joint"
            entry = f"reconstruct-{phase}-{unit.name}"
            finished = cache.load(entry) if cache is not None else None
            started = time.perf_counter()
            if finished is not None:
                tensors, metadata = finished
                for n in unit.layers:   # base_weight is the graph's own weight, never stored
                    missing, unexpected = layers[n].load_state_dict(unpack(n, tensors), strict=False)
                    if set(missing) != {"base_weight"} or unexpected:
                        raise ValueError(f"cached state of layer node '{n}' does not fit it: missing {missing}, "
                                         f"unexpected {unexpected}")
                generator.set_state(tensors["generator"])
                result.trace[f"{phase}:{unit.name}"] = {"loss_before": float(metadata["before"]),
                                                        "loss_after": float(metadata["after"]),
                                                        "seconds": 0.0, "learning_seconds": 0.0}
                done.update(unit.layers)
                for sweep in (*fp_sweeps, *q_sweeps):
                    sweep.release(unit.inputs)
                continue
            _set_modes(layers, set(), weight_mode, act_on)
            x_fp = _record(fp_sweeps, unit.inputs)
            # the target runs the unit's float layers as they are now, in a throw-away fork: the
            # carried sweep runs them again once learned, as the float model of later units does
            # (a learned migration factor changes their float output by rounding)
            fp_outputs = _record((sweep.fork() for sweep in fp_sweeps), unit.outputs)
            target = tuple(fp_outputs[n.name] for n in unit.outputs)
            _set_modes(layers, done, weight_mode, act_on)
            x_q = _record(q_sweeps, unit.inputs)
            if phase == "activations":   # weights stay at their learned rounding
                for layer in unit_layers:
                    layer.weight_mode = "hard"
            learning = time.perf_counter()
            before, after = _train_unit(unit, unit_layers, x_q, x_fp, target, spec, learn_rounding, learn_acts,
                                      qdrop, generator, progress, dist)
            learned = time.perf_counter()
            result.trace[f"{phase}:{unit.name}"] = {"loss_before": before, "loss_after": after, "seconds":
                                                    learned - started, "learning_seconds": learned - learning}
            done.update(unit.layers)
            if cache is not None:
                state = {k: v for n in unit.layers for k, v in pack(n, layers[n].state_dict()).items()
                         if not k.endswith("/base_weight")}
                cache.save(entry, {**state, "generator": generator.get_state()},
                           {"before": repr(before), "after": repr(after)})
        if phase == "weights":  # the activation phase starts from the learned weights everywhere
            _set_modes(layers, done, "hard", False)
    learned = learned_params(layers)
    learned.trace = result.trace
    return learned
