"""The explicit state of a model connected across timesteps (BiDM+'s TES, ``passes/connect_timesteps.py``).

Such a model's output at step ``t`` depends on its block outputs at the previous step of the same sampling
run. That state lives in a ``Trajectory``, per batch row:

* a trajectory starts empty: every row's first call uses the rule of a first step (``tes_valid = 0``);
* each call must continue it: the same batch size, and every row's timestep below the row's previous one
  (denoising runs from noise, high t, to the image, t = 0); anything else is a ``TrajectoryError`` that says
  how to start a new one, since silently mixing another run's features in would be wrong and invisible;
* after a call it holds that call's block outputs and timesteps for the next.

``CompiledModel`` and ``OrtModel`` keep one each (``reset_trajectory()`` starts a new one; the sampler does at
the start of every run); ``stateless_inputs`` gives the inputs of a call outside any trajectory (the first-step
rule), as compile's own measurements use.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, fx

from ditq_compiler import meta

VALID_INPUT = "tes_valid"


class TrajectoryError(RuntimeError):
    """A call does not continue the sampling run the model's state belongs to."""


@dataclass(frozen=True)
class StateInput:
    name: str                 # the graph input (placeholder) name
    index: int                # -1: the per-row flag; i >= 0: state i
    shape: tuple[int, ...]    # its shape past the batch dim


def state_inputs(gm: fx.GraphModule) -> list[StateInput]:
    """The inputs a connected graph takes for its state, in placeholder order (empty for other graphs)."""
    found = []
    for node in gm.graph.nodes:
        index = meta.get(node).timestep_state
        if node.op == "placeholder" and index is not None:
            val = node.meta.get("val")
            shape = tuple(int(d) for d in val.shape[1:]) if isinstance(val, Tensor) else ()
            found.append(StateInput(node.name, index, shape))
    return found


def stateless_inputs(inputs: list[StateInput], batch: int, like: Tensor | None = None) -> dict[str, Tensor]:
    """The state inputs of a first step: no row has a previous one."""
    dtype = like.dtype if like is not None and like.is_floating_point() else torch.float32
    device = like.device if like is not None else None
    return {s.name: torch.zeros((batch, *s.shape), dtype=torch.float32 if s.index < 0 else dtype, device=device)
            for s in inputs}


@dataclass
class Trajectory:
    """Per batch row: the block outputs of the previous call and its timestep."""

    states: list[Tensor] | None = None
    timesteps: Tensor | None = None

    def inputs(self, inputs: list[StateInput], timesteps: Tensor, like: Tensor | None = None) -> dict[str, Tensor]:
        """The state inputs of the next call, after checking that it continues this trajectory."""
        timesteps = _per_row(timesteps)
        batch = timesteps.shape[0]
        if self.states is None:
            return stateless_inputs(inputs, batch, like)
        if batch != self.timesteps.shape[0]:
            raise TrajectoryError(f"this call has a batch of {batch} rows, the trajectory in progress has "
                                  f"{self.timesteps.shape[0]}: call reset_trajectory() to start a new sampling run "
                                  "(ditq_compiler.sampling.sample does at the start of each run)")
        later = timesteps >= self.timesteps.to(timesteps.device)
        if bool(later.any()):
            row = int(later.nonzero()[0])
            raise TrajectoryError(f"row {row} is called at timestep {float(timesteps[row]):g} after timestep "
                                  f"{float(self.timesteps[row]):g}: a trajectory runs from high timesteps to low, "
                                  "each call continuing the previous one. Call reset_trajectory() to start a new "
                                  "sampling run (ditq_compiler.sampling.sample does at the start of each run)")
        out = {s.name: self.states[s.index] for s in inputs if s.index >= 0}
        out.update({s.name: torch.ones(batch, device=timesteps.device) for s in inputs if s.index < 0})
        return out

    def continues(self, timesteps: Tensor) -> bool:
        """Whether a call at ``timesteps`` would continue this trajectory (one in progress, the same rows, every
        row's timestep below its previous one)."""
        if self.states is None:
            return False
        timesteps = _per_row(timesteps)
        return timesteps.shape[0] == self.timesteps.shape[0] and \
            bool((timesteps < self.timesteps.to(timesteps.device)).all())

    def advance(self, states: Any, timesteps: Tensor) -> None:
        self.states = [s.detach() if isinstance(s, Tensor) else torch.as_tensor(s) for s in states]
        self.timesteps = _per_row(timesteps).detach().clone()


def _per_row(timesteps: Any) -> Tensor:
    t = torch.as_tensor(timesteps)
    return t.reshape(-1).to(torch.float64)


__all__ = ["StateInput", "Trajectory", "TrajectoryError", "VALID_INPUT", "state_inputs", "stateless_inputs"]
