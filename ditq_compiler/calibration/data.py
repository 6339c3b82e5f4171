"""CalibrationData: the calibration set in every form the compile stages read, built and validated once.

``compile(calibration=...)`` takes an iterable of calls of the model: ``(args, kwargs)`` pairs (a bare
dict is taken as kwargs), for example a ``CalibrationSet`` from ``from_sampler``, which also carries
the noise each input was made with. ``CalibrationData.of(calibration)`` checks every call once
(``as_batches``: shape of each item, no NaN / Inf) and keeps

    calls           the (args, kwargs) calls as given
    noise           the eps of each call (TQ-DiT Eq. 11's diffusion loss), or None
    schedule        the training schedule's abar_t (T,) and the sampler's step between timesteps, when the set
                    records them (``from_sampler``): what rebuilds a row's neighbouring sampler step
    source          the object the user passed (its selection and seed go into the provenance)

and, after capture, ``data.bind(captured)`` adds what the graph stages run on:

    bound           each call bound to the captured graph's input names (shapes checked)
    flat            each bound call flattened in the graph's placeholder order
    timestep_index  the position of the timestep input in ``flat``, or None
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Iterable

import torch
from torch import Tensor
from torch.utils._pytree import tree_leaves

from ditq_compiler.calibration.batches import Batch, CalibrationError, as_batches
from ditq_compiler.capture import split_rows


@dataclass(frozen=True)
class CalibrationData:
    calls: list[Batch] = field(default_factory=list)
    noise: list[Tensor] | None = None
    schedule: tuple[Tensor, int] | None = None
    source: Any = field(default=None, compare=False)
    bound: list[dict[str, Any]] = field(default_factory=list)
    flat: list[list[Any]] = field(default_factory=list)
    timestep_index: int | None = None

    @classmethod
    def of(cls, calibration: Iterable[Any] | CalibrationData | None) -> CalibrationData:
        if isinstance(calibration, CalibrationData):
            return calibration
        calls = as_batches(calibration)
        noise = getattr(calibration, "noise_batches", None)
        noise = noise() if callable(noise) else None
        if noise is not None and len(noise) != len(calls):
            raise CalibrationError(f"{len(noise)} noise batches for {len(calls)} calibration batches")
        abar = getattr(calibration, "alphas_cumprod", None)
        steps = (getattr(calibration, "selection", None) or {}).get("num_inference_steps")
        schedule = (abar, len(abar) // steps) if abar is not None and steps else None
        return cls(calls=calls, noise=noise, schedule=schedule, source=calibration)

    def __len__(self) -> int:
        return len(self.calls)

    @property
    def is_bound(self) -> bool:
        return len(self.flat) == len(self.calls)

    def bind(self, captured: Any) -> CalibrationData:
        """The same calls bound to ``captured`` (a ``CapturedModel``): names, placeholder order, timestep.

        A call of more rows than the graph accepts (``captured.max_batch``) becomes consecutive calls of
        at most that many, its noise split alike, so every stage can run each call as it is."""
        limit = captured.max_batch
        bound = [captured.bind(args, kwargs) for args, kwargs in self.calls]
        chunks = [split_rows(call, limit) for call in bound]
        data = self
        if any(len(parts) > 1 for parts in chunks):
            noise = None if self.noise is None else [part for eps in self.noise for part in torch.split(eps, limit)]
            bound = [part for parts in chunks for part in parts]
            data = replace(self, calls=[((), call) for call in bound], noise=noise)
        return replace(data, bound=bound, flat=[flat_inputs(call) for call in bound],
                       timestep_index=timestep_position(captured))

    def timesteps(self) -> Tensor | None:
        """The timestep of every calibration row, in call order (None without a timestep input)."""
        if self.timestep_index is None:
            return None
        return torch.cat([torch.as_tensor(f[self.timestep_index]).detach().reshape(-1).to(torch.float64)
                          for f in self.flat]) if self.flat else torch.zeros(0, dtype=torch.float64)


def timestep_position(captured: Any) -> int | None:
    """Where the timestep input is among the captured graph's placeholders (None: the model has none)."""
    placeholders = [n.name for n in captured.graph_module.graph.nodes if n.op == "placeholder"]
    return placeholders.index(captured.timestep_input) if captured.timestep_input in placeholders else None


def flat_inputs(inputs: dict[str, Any]) -> list[Any]:
    """A bound call's values in the graph's placeholder order."""
    return tree_leaves(((), inputs))


__all__ = ["CalibrationData", "flat_inputs", "timestep_position"]
