"""Connect block outputs to their own values at the previous sampler step (BiDM+'s TES, Eq. 17).

At each site ``u`` (a block's output: the U-Net's up blocks, the DiT's transformer blocks; our extension),

    u' = (1 - lambda(t)) u + lambda(t) u_prev  =  u + lambda(t) (u_prev - u)     a row that continues a trajectory
    u' = u                                                                         a trajectory's first step

    lambda(t) = lambda_hat[g] + t lambda_hat[g] / T,   g = floor(t / t_share),  t_share = T / G

with ``T`` the training timesteps (``t`` in [0, T)), ``G`` learnable coefficients per site, ``lambda_hat``
initialised to 0.25 (so lambda = 0.5 where denoising starts, t ~ T). ``u_prev`` is the same site's ``u`` at the
trajectory's previous call (the noisier step); what is kept for the next call is ``u``, the block's own output.

The graph becomes explicitly stateful: two kinds of inputs are added after the model's own,

    tes_valid     (B,)   1.0 where the row continues a trajectory, 0.0 at its first step
    tes_state_i   u_prev of site i, shaped like u

and it returns ``(output, (u_0, u_1, ...))``: the model's output and the new states. ``lambda_hat`` of site i is
the parameter ``ditq_tes_lambda_i`` (distillation learns it). With ``lambda_hat = 0`` the graph computes exactly
what the unconnected one does. ``CompiledModel`` threads the states through a trajectory
(``ditq_compiler.trajectory``); the ONNX export has them as inputs and outputs.
"""

from __future__ import annotations

from typing import Mapping

import torch
from torch import Tensor, fx
from torch.fx.passes.infra.pass_base import PassBase, PassResult
from torch.utils import _pytree as pytree

from ditq_compiler import meta
from ditq_compiler.pipeline import PreconditionError

aten = torch.ops.aten
VALID = "tes_valid"
STATE = "tes_state_{}"
LAMBDA = "ditq_tes_lambda_{}"
INITIAL_LAMBDA = 0.25


class ConnectTimesteps(PassBase):
    """The pass; ``sites`` are the nodes whose outputs are connected, ``lambdas`` (site -> (G,)) their learned
    coefficients (absent: ``initial_lambda`` everywhere), ``groups`` G, ``train_timesteps`` T; ``trainable``
    makes the coefficients parameters that require gradients."""

    name = "connect_timesteps"

    def __init__(self, sites: list[str], timestep_input: str, groups: int, train_timesteps: int,
                 lambdas: Mapping[str, Tensor] | None = None, initial_lambda: float = INITIAL_LAMBDA,
                 trainable: bool = False):
        self.sites, self.timestep_input = list(sites), timestep_input
        self.groups, self.train_timesteps = groups, train_timesteps
        self.lambdas, self.initial_lambda, self.trainable = dict(lambdas or {}), initial_lambda, trainable

    def requires(self, gm: fx.GraphModule) -> None:
        names = {n.name for n in gm.graph.nodes}
        missing = [s for s in self.sites if s not in _site_nodes(gm)]
        if missing:
            raise PreconditionError(f"{self.name}: sites {missing} are not in the graph")
        if self.timestep_input not in names:
            raise PreconditionError(f"{self.name}: the timesteps are chosen from the timestep input, and the graph "
                                    f"has no '{self.timestep_input}'")
        if any(meta.get(n).timestep_state is not None for n in gm.graph.nodes):
            raise PreconditionError(f"{self.name}: the graph is connected across timesteps already")
        info = getattr(gm.graph._codegen, "pytree_info", None)
        if info is None or info.in_spec.type is not tuple or info.in_spec.children()[1].type is not dict:
            raise PreconditionError(f"{self.name}: needs a graph captured by torch.export (keyword inputs)")
        for site, table in self.lambdas.items():
            if tuple(table.shape) != (self.groups,):
                raise PreconditionError(f"{self.name}: lambda_hat of site '{site}' has shape {tuple(table.shape)}, "
                                        f"expected ({self.groups},)")

    def call(self, gm: fx.GraphModule) -> PassResult:
        graph, nodes = gm.graph, {**{n.name: n for n in gm.graph.nodes}, **_site_nodes(gm)}
        placeholders = [n for n in graph.nodes if n.op == "placeholder"]
        timestep, fake_mode = nodes[self.timestep_input], _fake_mode(placeholders)
        with graph.inserting_after(placeholders[-1]):
            valid = graph.placeholder(VALID)
        with fake_mode:
            valid.meta["val"] = torch.zeros(timestep.meta["val"].shape, dtype=torch.float32)
        meta.update(valid, timestep_state=-1)
        states, previous = [], valid
        for i, site in enumerate(self.sites):
            with graph.inserting_after(previous):
                state = graph.placeholder(STATE.format(i))
            state.meta["val"] = nodes[site].meta["val"]
            meta.update(state, timestep_state=i)
            states.append(state)
            previous = state
        for i, (site, state) in enumerate(zip(self.sites, states, strict=True)):
            self._connect(gm, nodes[site], state, valid, timestep, i, fake_mode)
        _return_states(gm, [nodes[s] for s in self.sites])
        _add_inputs(gm, [VALID] + [STATE.format(i) for i in range(len(self.sites))])
        graph.lint()
        gm.recompile()
        return PassResult(gm, True)

    def _connect(self, gm: fx.GraphModule, u: fx.Node, prev: fx.Node, valid: fx.Node, timestep: fx.Node, index: int,
                 fake_mode) -> None:
        table = self.lambdas.get(u.name, torch.full((self.groups,), self.initial_lambda))
        gm.register_parameter(LAMBDA.format(index),
                              torch.nn.Parameter(table.detach().float().clone(), requires_grad=self.trainable))
        users = [n for n in u.users if n.op != "call_module"]      # a distillation tap keeps reading u
        graph, last = gm.graph, [u]

        def emit(target, *args, **kwargs):
            with graph.inserting_after(last[0]):
                node = graph.call_function(target, args, kwargs)
            last[0] = node
            values = fx.node.map_arg(args, lambda a: a.meta["val"])
            with fake_mode:
                node.meta["val"] = target(*values, **kwargs)
            meta.copy_location(node, u)
            meta.update(node, transform="connect_timesteps")
            return node

        with graph.inserting_after(u):
            lam_table = graph.get_attr(LAMBDA.format(index))
        last[0] = lam_table
        lam_table.meta["val"] = fake_mode.from_tensor(getattr(gm, LAMBDA.format(index)).detach())
        t = emit(aten._to_copy.default, timestep, dtype=torch.float32)
        group = emit(aten._to_copy.default, emit(aten.clamp.default, emit(aten.floor.default, emit(
            aten.mul.Tensor, t, self.groups / self.train_timesteps)), 0, self.groups - 1), dtype=torch.long)
        lam = emit(aten.mul.Tensor, emit(aten.index.Tensor, lam_table, [group]),
                   emit(aten.add.Tensor, emit(aten.div.Tensor, t, float(self.train_timesteps)), 1.0))
        weight = emit(aten.view.default, emit(aten.mul.Tensor, valid, lam), [-1] + [1] * (u.meta["val"].dim() - 1))
        mixed = emit(aten.add.Tensor, u, emit(aten.mul.Tensor, weight, emit(aten.sub.Tensor, prev, u)))
        for user in users:
            user.replace_input_with(u, mixed)
        meta.record_applied(mixed, self.name, site=u.name, groups=self.groups)


def _site_nodes(gm: fx.GraphModule) -> dict[str, fx.Node]:
    """Sites by the name they had in the analysed float graph: a node keeps its name, or a layer rewritten into
    a quantized op or a trainable module points back to it (``source_node``, ``trainable_of``)."""
    found = {n.name: n for n in gm.graph.nodes}
    for node in gm.graph.nodes:
        for origin in (meta.get(node).source_node, meta.get(node).trainable_of):
            if origin is not None:
                found[origin] = node
    return found


def _fake_mode(placeholders: list[fx.Node]):
    from torch._guards import detect_fake_mode

    return detect_fake_mode([n.meta["val"] for n in placeholders if "val" in n.meta])


def _return_states(gm: fx.GraphModule, states: list[fx.Node]) -> None:
    """The graph returns ``(output, (state_0, ...))``: the output node's flat values gain the states."""
    output = next(n for n in gm.graph.nodes if n.op == "output")
    flat = list(output.args[0]) if isinstance(output.args[0], (list, tuple)) else [output.args[0]]
    output.args = (tuple(flat + states),)
    info = gm.graph._codegen.pytree_info
    state_spec = pytree.tree_structure(tuple(range(len(states))))
    out_spec = pytree.TreeSpec(tuple, None, [info.out_spec, state_spec])
    gm.graph._codegen.pytree_info = info._replace(out_spec=out_spec)


def _add_inputs(gm: fx.GraphModule, names: list[str]) -> None:
    """The graph's keyword inputs gain ``names`` (placeholders appended in that order)."""
    info = gm.graph._codegen.pytree_info
    args_spec, kwargs_spec = info.in_spec.children()
    keys = list(kwargs_spec.context) + names
    leaf = pytree.tree_structure(0)
    kwargs_spec = pytree.TreeSpec(dict, keys, [*kwargs_spec.children(), *[leaf] * len(names)])
    in_spec = pytree.TreeSpec(tuple, None, [args_spec, kwargs_spec])
    gm.graph._codegen.pytree_info = info._replace(orig_args=[*info.orig_args, *names], in_spec=in_spec)


def connected_sites(gm: fx.GraphModule) -> int:
    """How many sites a graph's connection across timesteps has (0: none)."""
    indices = [meta.get(n).timestep_state for n in gm.graph.nodes if n.op == "placeholder"]
    return sum(1 for i in indices if i is not None and i >= 0)


__all__ = ["INITIAL_LAMBDA", "LAMBDA", "STATE", "VALID", "ConnectTimesteps", "connected_sites"]
