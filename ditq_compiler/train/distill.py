"""Quantization-aware distillation of the quantized graph against the FP model (data-free).

The FP (rotated) graph is the teacher. The student is a copy in which every layer the recipe
quantizes is a ``QATLayer`` (trainable latent weight and bias, learnable weight scale and
activation scale / per-token clipping ratio, straight-through estimator), or a ``BinaryLayer`` for a
W1A1 layer (``train/binary_layer.py``: BiDM+'s FPB or the XNOR / ReAct binarizers). Training inputs are
the calibration set: the ``(x_t, t, class)`` the FP sampler produced along its own trajectories,
so no image data is needed. Each iteration draws ``batch_size`` of them and minimises

    L = output_weight * mean (out_q - out_fp)^2
        + dm_weight * mean (eps_q - eps)^2                                       (BiDM+'s L_DM)
        + block_weight / K * sum_{i=1..K} mean (r_i^SBM)^2                      (BiDM+ Eq. 20)

    r_i^SBM = |r_i^fp| * max(|r_i^fp - r_i^q| - q_eps(|r_i^fp - r_i^q|), 0)      (BiDM+ Eq. 19)

where ``r_i`` are the outputs of the K blocks (a DiT block is the module path up to its first
index, ``transformer_blocks.3``; its outputs are the values it hands to the rest of the graph),
``|r^fp|`` weights each element by its salience (Eq. 18) and ``q_eps`` is the ``leniency``-th
percentile of the error over each sample's block output: errors below it are forgiven. L_DM is the
diffusion loss on the calibration set's own ``(x_t, eps)`` pairs (``from_sampler`` records the noise that
makes each ``x_t`` a forward-process sample of its trajectory's final image), so even BiDM+'s loss needs no
image data; without noise, the teacher's output takes its place (``output_weight``).

Optimiser: AdamW, ``lr`` (with ``weight_decay``) on latent weights and biases, ``scale_lr`` (no
decay) on scales, both decayed to 0 by a cosine schedule. Everything else in the model is frozen.

Over several processes (``ditq_compiler.distributed``) every rank draws the same minibatch each step
and computes its rows [r m / N, (r + 1) m / N); its loss is those rows' part of the minibatch's (sums
divided by the minibatch's counts), the gradients are summed over the ranks and every rank takes the
same step. Evaluations split the rows and sum the ranks' parts.
"""

from __future__ import annotations

import copy
import math
import warnings
from dataclasses import dataclass
from typing import Any, Mapping

import torch
from torch import Tensor, fx, nn
from torch.utils._pytree import tree_flatten, tree_leaves, tree_unflatten
from tqdm.auto import tqdm

from ditq_compiler.calibration.params import QuantParams
from ditq_compiler.distributed import SINGLE, Distributed
from ditq_compiler.meta import LayerAnnotation
from ditq_compiler.graph import block_outputs, unit_of
from ditq_compiler.recipe import DistillationSpec
from ditq_compiler.passes.connect_timesteps import LAMBDA, ConnectTimesteps
from ditq_compiler.train.binary_layer import BinaryLayer
from ditq_compiler.train.qat_layer import QATLayer
from ditq_compiler.trajectory import state_inputs, stateless_inputs
from ditq_compiler.trainable import LayerSource, TrainableLayer, learned_params, swap_in_trainable_layers
from ditq_compiler import meta

EVAL_CHUNK = 256


class _Tap(nn.Module):
    """Identity that keeps the last value it saw (the training copies' block outputs)."""

    def __init__(self):
        super().__init__()
        self.value: Tensor | None = None

    def forward(self, x: Tensor) -> Tensor:
        self.value = x
        return x


def _insert_taps(gm: fx.GraphModule, names: list[str]) -> list[_Tap]:
    nodes = {meta.get(n).trainable_of or n.name: n for n in gm.graph.nodes}   # a swapped layer keeps its name
    taps = []
    for i, name in enumerate(names):
        tap = _Tap()
        gm.add_submodule(f"ditq_tap_{i}", tap)
        with gm.graph.inserting_after(nodes[name]):
            gm.graph.call_module(f"ditq_tap_{i}", (nodes[name],))   # result unused: the tap only records
        taps.append(tap)
    gm.recompile()
    return taps


def stack_inputs(batches: list[dict[str, Any]]) -> tuple[dict[str, Any], int]:
    """One call's keyword inputs holding every calibration row; batch-sized tensors are concatenated."""
    flats, spec = [], None
    for inputs in batches:
        leaves, spec = tree_flatten(inputs)
        flats.append(leaves)
    size = sum(_batch_size(leaves) for leaves in flats)
    stacked = []
    for position, first in enumerate(flats[0]):
        if isinstance(first, Tensor) and first.dim() > 0 and first.shape[0] == _batch_size(flats[0]):
            stacked.append(torch.cat([leaves[position] for leaves in flats]))
        else:
            stacked.append(first)
    return tree_unflatten(stacked, spec), size


def _batch_size(leaves: list[Any]) -> int:
    return next(v.shape[0] for v in leaves if isinstance(v, Tensor) and v.dim() > 0 and v.is_floating_point())


def select_rows(inputs: dict[str, Any], size: int, index: Tensor) -> dict[str, Any]:
    leaves, spec = tree_flatten(inputs)
    return tree_unflatten([v[index] if isinstance(v, Tensor) and v.dim() > 0 and v.shape[0] == size else v
                           for v in leaves], spec)


def _float_outputs(out: Any) -> list[Tensor]:
    return [t for t in tree_leaves(out) if isinstance(t, Tensor) and t.is_floating_point()]


def salience_residual(fp: Tensor, q: Tensor, leniency: float) -> Tensor:
    """BiDM+ Eq. 19: |r_fp| * max(|r_fp - r_q| - q_eps, 0), q_eps the leniency-th percentile per sample."""
    error = (fp - q).abs()
    if leniency > 0:
        flat = error.detach().reshape(error.shape[0], -1)
        k = max(1, math.ceil(leniency / 100 * flat.shape[1]))
        threshold = flat.kthvalue(k, dim=1).values.reshape(-1, *[1] * (error.dim() - 1))
        error = torch.relu(error - threshold)
    return fp.abs() * error


def _mean(values: Tensor, rows: int | None) -> Tensor:
    """The mean of ``values`` (batch-first), or with ``rows`` (the minibatch's row count, of which ``values``
    holds some) these rows' part of the minibatch's mean."""
    if rows is None:
        return values.mean()
    return values.sum() / (values.numel() // values.shape[0] * rows)


@dataclass(frozen=True)
class Connection:
    """BiDM+'s TES in the student: where, how, and what rebuilds a row's neighbouring (noisier) sampler step."""

    spec: Any                          # recipe.TimestepConnectionSpec
    sites: list[str]                   # block outputs (graph.block_sites)
    sample_input: str
    timestep_input: str
    schedule: tuple[Tensor, int]       # (abar_t, sampler step in timesteps), from the calibration set


class Distiller:
    """Teacher and student graphs over the calibration inputs; train, evaluate, read the results."""

    def __init__(self, gm: fx.GraphModule, annotations: Mapping[str, LayerAnnotation],
                 act_qparams: Mapping[str, tuple[Tensor, Tensor]], inputs: list[dict[str, Any]],
                 sample_dependent: set[str], with_blocks: bool, noise: list[Tensor] | None = None,
                 connection: Connection | None = None, max_batch: int | None = None,
                 dist: Distributed = SINGLE):
        if not inputs:
            raise ValueError("distillation needs calibration inputs; the calibration set is empty")
        self.dist = dist
        self.inputs, self.size = stack_inputs(inputs)
        self.noise = None if noise is None else torch.cat(noise)     # the eps of each row, for L_DM
        self.connection = connection
        self.max_batch = max_batch                      # the most rows the graph takes per call (capture)
        self.chunk = min(EVAL_CHUNK, max_batch or EVAL_CHUNK)
        self._outputs: list[Tensor] | None = None
        self.teacher, self.student = _copy(gm), _copy(gm)
        self.teacher.requires_grad_(False)
        self.student.requires_grad_(False)
        self.layers = swap_in_trainable_layers(self.student, annotations, act_qparams, trainable_layer)
        blocks = list(dict.fromkeys(unit_of(a.name) for a in annotations.values())) if with_blocks else []
        names = block_outputs(gm, blocks, sample_dependent)
        self.teacher_taps, self.student_taps = _insert_taps(self.teacher, names), _insert_taps(self.student, names)
        self.state_inputs = []
        if connection is not None:
            spec = connection.spec
            ConnectTimesteps(connection.sites, connection.timestep_input, spec.groups, spec.train_timesteps,
                             initial_lambda=spec.initial, trainable=True)(self.student)
            self.state_inputs = state_inputs(self.student)

    def parameters(self, kind: str) -> list[nn.Parameter]:
        found = [p for layer in self.layers.values()
                 for p in (layer.weight_parameters() if kind == "weights" else layer.scale_parameters())]
        if kind != "weights" and self.connection is not None:
            found += [p for name, p in self.student.named_parameters() if name.startswith("ditq_tes_lambda_")]
        return found

    def _student(self, rows: dict[str, Any], index: Tensor) -> Any:
        """The student's output on ``rows``; with TES, after its forward at each row's neighbouring step."""
        if self.connection is None:
            return self.student(**rows)
        previous, valid = neighbouring_step(rows, self.noise[index], self.connection)
        with torch.no_grad():
            _, states = self.student(**previous, **stateless_inputs(self.state_inputs, len(index)))
        state = {s.name: (valid if s.index < 0 else states[s.index]) for s in self.state_inputs}
        return self.student(**rows, **state)[0]

    def _targets(self) -> list[Tensor]:
        """The teacher's outputs on every calibration input, computed once (block targets are not kept:
        with block mimicking the teacher runs with the student)."""
        if self._outputs is None:
            with torch.no_grad():
                chunks = [_float_outputs(self.teacher(**select_rows(self.inputs, self.size, torch.arange(
                    start, min(self.size, start + self.chunk))))) for start in range(0, self.size, self.chunk)]
            self._outputs = [torch.cat(parts) for parts in zip(*chunks, strict=True)]
        return self._outputs

    def loss(self, index: Tensor, spec: DistillationSpec,
             minibatch: int | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """(total, output term, block term) on the calibration inputs ``index``; the output term is the MSE to the
        teacher's output and, with ``dm_weight``, the diffusion loss ``mean (eps - eps_q)^2`` (BiDM+'s L_DM).
        With ``minibatch``, ``index`` is part of a minibatch of that many rows and the loss is its part of the
        minibatch's."""
        rows = select_rows(self.inputs, self.size, index)
        mimic = spec.block_weight > 0 and self.student_taps
        if mimic:
            with torch.no_grad():
                target = _float_outputs(self.teacher(**rows))
                target_blocks = [tap.value for tap in self.teacher_taps]
        else:
            target = [t[index] for t in self._targets()]
        out = _float_outputs(self._student(rows, index))
        mse = sum(_mean((o - t).square(), minibatch) for o, t in zip(out, target, strict=True)) / len(out)
        if spec.dm_weight > 0:
            eps = self.noise[index]
            mse = spec.output_weight * mse + spec.dm_weight * _mean((out[0][:, :eps.shape[1]] - eps).square(),
                                                                    minibatch)
        else:
            mse = spec.output_weight * mse
        block = torch.zeros(())
        if mimic:
            block = sum(_mean(salience_residual(t, tap.value, spec.leniency).square(), minibatch)
                        for t, tap in zip(target_blocks, self.student_taps, strict=True)) / len(self.student_taps)
        return mse + spec.block_weight * block, mse, block

    def evaluate(self, spec: DistillationSpec, rows: int | None = None) -> float:
        """Mean loss over the first ``rows`` calibration inputs (all by default), no gradients (each rank
        its share of the rows)."""
        count = self.size if rows is None else min(rows, self.size)
        mine = self.dist.shard(count)
        total = 0.0
        with torch.no_grad():
            for start in range(mine.start, mine.stop, self.chunk):
                index = torch.arange(start, min(mine.stop, start + self.chunk))
                total += float(self.loss(index, spec)[0]) * len(index)
        return float(self.dist.total(torch.tensor(total, dtype=torch.float64))) / count

    def train(self, spec: DistillationSpec, iterations: int, progress: bool = True, desc: str = "distill") -> None:
        if iterations == 0:
            return
        if self.max_batch is not None and min(spec.batch_size, self.size) > self.max_batch:
            raise ValueError(f"distillation.batch_size {spec.batch_size}: the model takes at most {self.max_batch} "
                             f"rows per call (its code bounds the batch); set batch_size <= {self.max_batch}")
        groups = [{"params": self.parameters("weights"), "lr": spec.lr, "weight_decay": spec.weight_decay},
                  {"params": self.parameters("scales"), "lr": spec.scale_lr, "weight_decay": 0.0}]
        for group in groups:
            for p in group["params"]:
                p.requires_grad_(True)
        optimizer = torch.optim.AdamW(groups)
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=iterations, eta_min=0.0)
        generator = torch.Generator().manual_seed(spec.seed)
        learned = [p for group in groups for p in group["params"]]
        m = min(spec.batch_size, self.size)
        mine, minibatch = slice(None), None        # this rank's rows of each minibatch (module doc)
        if self.dist.active:
            if m < self.dist.world_size:
                raise ValueError(f"distillation minibatches of {m} rows cannot be split over "
                                 f"{self.dist.world_size} processes: raise batch_size, or use fewer processes")
            mine, minibatch = self.dist.split(m), m
        bar = tqdm(range(iterations), desc=desc, unit="it", disable=not progress)
        average = None
        for step in bar:
            index = torch.randint(0, self.size, (m,), generator=generator)[mine]
            loss, mse, block = self.loss(index, spec, minibatch)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.dist.sum_gradients(learned)
            optimizer.step()
            schedule.step()
            value = float(loss.detach())
            average = value if average is None else 0.98 * average + 0.02 * value
            if step % 25 == 0 or step == iterations - 1:
                bar.set_postfix(loss=f"{average:.4g}", mse=f"{float(mse.detach()):.3g}",
                                block=f"{float(block.detach()):.3g}")
        for group in groups:
            for p in group["params"]:
                p.requires_grad_(False)
        self.dist.broadcast_tensors(learned)   # equal already (the same steps from the same sums): to be sure

    def result(self) -> QuantParams:
        """Every layer's trained codes, biases and activation parameters, and TES's coefficients per site."""
        params = learned_params(self.layers)
        if self.connection is not None:
            params.timestep_lambdas = {site: getattr(self.student, LAMBDA.format(i)).detach().clone()
                                       for i, site in enumerate(self.connection.sites)}
        return params


def neighbouring_step(rows: dict[str, Any], eps: Tensor, connection: Connection) -> tuple[dict[str, Any], Tensor]:
    """Each row's input at the sampler's previous (noisier) step, and 1 where it has one (0 at the first step):

        x_0 = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t),     x_t' = sqrt(abar_t') x_0 + sqrt(1 - abar_t') eps

    with t' = t + step: the forward-process sample of the same image and noise one step earlier, as BiDM+'s
    training runs the neighbouring timestep before the one it learns on."""
    abar, step = connection.schedule
    x, t = rows[connection.sample_input], rows[connection.timestep_input]
    t_long = torch.as_tensor(t).reshape(-1).expand(x.shape[0]).long()
    earlier = t_long + step
    valid = (earlier < len(abar)).to(torch.float32)
    earlier = earlier.clamp_max(len(abar) - 1)
    shape = (-1, *[1] * (x.dim() - 1))
    a_t, a_e = abar[t_long].reshape(shape).to(x.dtype), abar[earlier].reshape(shape).to(x.dtype)
    eps = eps[:, :x.shape[1]].to(x.dtype)
    x0 = (x - (1 - a_t).sqrt() * eps) / a_t.sqrt()
    previous = dict(rows)
    previous[connection.sample_input] = a_e.sqrt() * x0 + (1 - a_e).sqrt() * eps
    previous[connection.timestep_input] = earlier.to(torch.as_tensor(t).dtype)
    return previous, valid


def trainable_layer(source: LayerSource) -> TrainableLayer:
    """The trainable form of a layer: binarized (BiDM+ and baselines) or fake-quantized with STE."""
    return BinaryLayer.from_source(source) if source.annotation.weights.binary else QATLayer.from_source(source)


def _copy(gm: fx.GraphModule) -> fx.GraphModule:
    with warnings.catch_warnings():   # torch's own pytree deprecation notice on deepcopy
        warnings.filterwarnings("ignore", message=".*treespec, LeafSpec.*", category=FutureWarning)
        return copy.deepcopy(gm)


def distill(gm: fx.GraphModule, annotations: Mapping[str, LayerAnnotation],
            act_qparams: Mapping[str, tuple[Tensor, Tensor]], inputs: list[dict[str, Any]],
            spec: DistillationSpec, sample_dependent: set[str], progress: bool = True,
            noise: list[Tensor] | None = None, connection: Connection | None = None,
            max_batch: int | None = None, dist: Distributed = SINGLE) -> QuantParams:
    """Distil the quantized version of ``gm`` (not modified) into trained codes, scales and biases; the loss
    before and after is in ``trace["distill"]``. ``noise``: the eps of each calibration call (for ``dm_weight``);
    ``dist``: the ranks split each minibatch (module doc)."""
    distiller = Distiller(gm, annotations, act_qparams, inputs, sample_dependent, with_blocks=spec.block_weight > 0,
                          noise=noise, connection=connection, max_batch=max_batch, dist=dist)
    before = distiller.evaluate(spec)
    distiller.train(spec, spec.iterations, progress)
    result = distiller.result()
    result.trace["distill"] = {"loss_before": before, "loss_after": distiller.evaluate(spec)}
    return result
