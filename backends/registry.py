"""Backends by name: the lowering that turns the fake-quant reference graph into what runs.

``compile(model, recipe, backend=NAME)`` and ``dq.load`` call ``lower(NAME, reference)``: the
backend's function gets a copy of the reference graph (the ``ditq::`` quantized ops) and returns
the graph to run plus, per quantized layer (its node in the captured graph), the kernel it got
(``"reference (why)"`` for a layer the backend leaves to the reference op). The reference graph
itself is what artifacts store; a loaded artifact is lowered again on the machine that loads it.

A backend registers itself where it is defined:

    @register_backend("my-backend", "what it runs, where")
    def lower_mine(gm: fx.GraphModule) -> tuple[fx.GraphModule, dict[str, str]]: ...

Built-in backends live in their own modules and are imported the first time their name is asked
for (``BUILT_IN``), so a backend whose kernels need Triton or a C compiler costs nothing until used.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Callable

import torch
from torch import fx

Lowering = Callable[[fx.GraphModule], "tuple[fx.GraphModule, dict[str, str]]"]

# name -> module that registers it
BUILT_IN = {"torch": "ditq_compiler.backends.torch", "torch-int8": "ditq_compiler.backends.torch",
            "cpu-binary": "ditq_compiler.backends.cpu_binary",
            "cuda": "ditq_compiler.backends.cuda", "cuda-fp8": "ditq_compiler.backends.cuda"}


class UnknownBackendError(ValueError):
    """No backend of that name is registered."""


@dataclass(frozen=True)
class Backend:
    name: str
    description: str
    lower: Lowering
    device: str = "cpu"       # where the lowered graph runs ("cuda": a GPU; compile measures the reference elsewhere)

    def runs_here(self) -> bool:
        return self.device != "cuda" or torch.cuda.is_available()


_REGISTERED: dict[str, Backend] = {}


def register_backend(name: str, description: str, device: str = "cpu") -> Callable[[Lowering], Lowering]:
    """Register the decorated lowering under ``name`` (a second registration of a name is an error); ``device``
    is where its graph runs ("cpu" also covers backends that run wherever the reference does)."""
    def add(lower: Lowering) -> Lowering:
        if name in _REGISTERED and _REGISTERED[name].lower is not lower:
            raise ValueError(f"backend {name!r} is registered twice ({_REGISTERED[name].lower.__module__} and "
                             f"{lower.__module__})")
        _REGISTERED[name] = Backend(name, description, lower, device)
        return lower
    return add


def get_backend(name: str) -> Backend:
    if name not in _REGISTERED and name in BUILT_IN:
        importlib.import_module(BUILT_IN[name])
    if name not in _REGISTERED:
        raise UnknownBackendError(f"backend must be one of {backend_names()}, got {name!r}")
    return _REGISTERED[name]


def backend_names() -> list[str]:
    return sorted(set(BUILT_IN) | set(_REGISTERED))


def lower(name: str, reference: fx.GraphModule) -> tuple[fx.GraphModule, dict[str, str]]:
    """(graph to run, kernel per quantized layer) of ``reference`` on backend ``name``."""
    return get_backend(name).lower(reference)


__all__ = ["BUILT_IN", "Backend", "UnknownBackendError", "backend_names", "get_backend", "lower", "register_backend"]
