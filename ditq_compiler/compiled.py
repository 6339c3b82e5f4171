"""``CompiledModel``: a quantized denoiser, called like the original; built from a ``CompileRecord``.

``compile()`` and ``load()`` both end here: a ``CompileRecord`` (``ditq_compiler.records``) holds the
graph that runs, the fake-quant reference it was lowered from, how to call it, the recipe, the
reports and the provenance; ``CompiledModel(record)`` wraps it as a ``torch.nn.Module``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterable

import torch
from torch import fx

from ditq_compiler import meta
from ditq_compiler.artifact.store import read_artifact, write_artifact
from ditq_compiler.capture import captured_constants, cat_rows, split_rows
from ditq_compiler.inspection.summary import Summary
from ditq_compiler.records import CompileRecord
from ditq_compiler.report import rotation_table, sites_table, summary_rows
from ditq_compiler.trajectory import Trajectory, state_inputs

_CAST_REFUSED = ("holds integer weight codes with their calibrated scales; casting it would silently "
                 "dequantize them or change the quantizers' arithmetic. Compile the float model again "
                 "for another precision, or export it (export_onnx) for a runtime that picks its own.")


class CompiledModel(torch.nn.Module):
    """A quantized denoiser: call it like the original model.

    Besides the graph it carries what ``save`` writes and ``ditq inspect`` shows: ``provenance``
    (FP size, model config, calibration seed, an example call), ``activation_stats`` (per layer,
    ``ditq_compiler.inspection.activations``) and, for a lowered backend, the reference graph.
    """

    def __init__(self, record: CompileRecord):
        super().__init__()
        self.graph_module = record.graph_module    # a submodule: moves with .to(), saved in state_dict()
        self.record = record                       # not a module: the reference graph is not a second copy
        self.state_inputs = state_inputs(record.graph_module)   # BiDM+'s TES: state across sampler steps
        self.trajectory = Trajectory()
        if record.captured.constants is None and record.provenance is not None \
                and record.provenance.example_inputs is not None:   # an artifact keeps them in its example call
            record.captured.constants = captured_constants(record.provenance.example_inputs)
        _ = record.captured.call_plan              # read the graph once, before any torch.compile traces a call
        for parameter in self.graph_module.parameters():   # an inference graph: torch.compile traces no backward
            parameter.requires_grad_(False)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """The original ``forward``'s call: same arguments, same output (``return_dict=False``: its tuple)."""
        values = self.captured.call_plan.arguments(args, kwargs)
        inputs = self.captured.graph_inputs(values)
        if not self.state_inputs:
            out = self._run(inputs)
        else:
            timesteps = inputs[self.captured.timestep_input]
            state = self.trajectory.inputs(self.state_inputs, timesteps, inputs[self.captured.sample_input])
            out, states = self._run({**inputs, **state})
            self.trajectory.advance(states, timesteps)
        return out if values.get("return_dict", True) is not False else output_tuple(out)

    def _run(self, inputs: dict[str, Any]) -> Any:
        """The graph on ``inputs``, in chunks of rows where the model bounds its batch (``capture.max_batch``)."""
        if self.captured.max_batch is None:
            return self.graph_module(**inputs)
        return cat_rows([self.graph_module(**chunk) for chunk in split_rows(inputs, self.captured.max_batch)])

    @property
    def stateful(self) -> bool:
        """Whether calls depend on the previous call of the same sampling run (``ditq_compiler.trajectory``)."""
        return bool(self.state_inputs)

    def reset_trajectory(self) -> None:
        """Start a new sampling run: the next call is a first step (a no-op for models without state)."""
        self.trajectory = Trajectory()

    # ---- what the record holds ---------------------------------------------------------------
    @property
    def captured(self):
        """How the graph was exported and how to call it (``capture.CapturedModel``)."""
        return self.record.captured

    @property
    def recipe(self):
        return self.record.recipe

    @property
    def backend(self) -> str:
        return self.record.backend

    @property
    def reports(self):
        return self.record.reports

    @property
    def layers(self):
        return self.record.reports.layers

    @property
    def output_sqnr_db(self) -> float | None:
        return self.record.reports.output_sqnr_db

    @property
    def sites(self):
        return self.record.reports.sites

    @property
    def time_groups(self) -> list[str]:
        return self.record.reports.time_groups

    @property
    def rotations(self):
        return self.record.reports.rotations

    @property
    def allocation(self):
        return self.record.reports.allocation

    @property
    def unsupported(self):
        return self.record.reports.unsupported

    @property
    def unit_seconds(self) -> dict[str, dict[str, float]]:
        return self.record.reports.unit_seconds

    @property
    def activation_stats(self) -> dict:
        return self.record.reports.activation_stats

    @property
    def stage_seconds(self) -> dict[str, float]:
        return self.record.stage_seconds

    @property
    def resumed_from_cache(self) -> list[str]:
        return self.record.resumed_from_cache

    @property
    def provenance(self):
        return self.record.provenance

    @property
    def world_size(self) -> int:
        """How many processes calibrated it (``ditq_compiler.distributed``)."""
        return self.record.world_size

    @property
    def manifest(self) -> dict | None:
        return self.record.manifest

    @property
    def reference_graph_module(self) -> fx.GraphModule:
        """The fake-quant reference graph (the one saved); ``graph_module`` itself for backend 'torch'."""
        return self.record.reference_graph if self.record.reference_graph is not None else self.graph_module

    # ---- dtype casts are refused --------------------------------------------------------------
    def _refuse_cast(self, what: str):
        raise TypeError(f"CompiledModel.{what}: a compiled {self.captured.model_class} {_CAST_REFUSED}")

    def half(self):
        self._refuse_cast("half()")

    def bfloat16(self):
        self._refuse_cast("bfloat16()")

    def double(self):
        self._refuse_cast("double()")

    def type(self, dst_type):
        self._refuse_cast(f"type({dst_type})")

    def to(self, *args: Any, **kwargs: Any):
        """Moves to another device; a dtype change is refused (see ``half``).

        Parameters and buffers move as in any module; the captured graph also names the device it was
        exported on in some nodes' ``device=`` arguments (``arange``, ``_assert_tensor_metadata``), and
        those are rewritten to the new device so the graph runs there."""
        device, dtype, _, _ = torch._C._nn._parse_to(*args, **kwargs)
        if dtype is not None:
            self._refuse_cast(f"to({dtype})")
        moved = super().to(*args, **kwargs)
        if device is not None:
            _retarget_device(self.graph_module, device)
        return moved

    def cuda(self, device: Any = None):
        return self.to(torch.device("cuda", device) if isinstance(device, int) else device or "cuda")

    def cpu(self):
        return self.to("cpu")

    # ---- looking at it ----------------------------------------------------------------------------
    def summary(self) -> Summary:
        reports = self.reports
        total = sum(1 for n in self.graph_module.graph.nodes
                    if n.op in ("call_function", "call_module") and meta.get(n).role is not None)
        sqnr = "n/a" if reports.output_sqnr_db is None else f"{reports.output_sqnr_db:.1f} dB"
        head = (f"{self.captured.model_class} compiled with recipe '{self.recipe.name}' "
                f"(backend {self.backend}): {len(reports.layers)} of {total} linear/conv layers quantized; "
                f"output SQNR vs FP on the calibration data: {sqnr}")
        if self.stage_seconds:
            head += "\nstages: " + ", ".join(f"{k} {v:.1f} s" for k, v in self.stage_seconds.items())
        if self.world_size > 1:
            head += f"\ncalibrated by {self.world_size} processes (torch.distributed)"
        learned = [v["total"] for v in reports.unit_seconds.values() if v["total"] > 0]
        if learned:
            head += (f"\nreconstruction: {len(reports.unit_seconds)} block(s), "
                     f"median {sorted(learned)[len(learned) // 2]:.1f} s per block learned")
        if reports.float_layers:
            head += "\n" + float_layers_line(reports.float_layers, self.recipe.quantize_roles)
        if reports.unsupported:
            head += (f"\nleft in float, no quantized lowering ({len(reports.unsupported)}): " +
                     ", ".join(f"{u.name} (aten.{u.op})" for u in reports.unsupported))
        if self.resumed_from_cache:
            head += "\nresumed an interrupted compile: " + ", ".join(self.resumed_from_cache) + " taken from the cache"
        if reports.allocation is not None:
            head += (f"\nmixed precision (AMPN, sensitivity {reports.allocation.sensitivity_from}): average "
                     f"activation bits {reports.allocation.average_bits:.2f}")
        for note in reports.notes:
            head += f"\n{note.stage}: {note.text}"
        tail = []
        if reports.sites:
            tail.append("activation sites:\n" + sites_table(reports.sites, reports.time_groups))
        if reports.rotations:
            tail.append("Hadamard rotations:\n" + rotation_table(reports.rotations))
        return Summary(head, *summary_rows(reports.layers), tail="\n\n".join(tail))

    def print_readable(self, print_output: bool = True) -> str:
        return self.graph_module.print_readable(print_output=print_output)

    def plot(self, out_dir: str | Path, layers: Iterable[str] | None = None) -> list[Path]:
        """PNGs of each layer's activation range over timesteps, before and after the transformations."""
        from ditq_compiler.inspection.plot import plot_activations   # matplotlib: an optional extra
        return plot_activations(self, out_dir, layers)

    # ---- saving and exporting ---------------------------------------------------------------------
    def save(self, path: str | os.PathLike, progress: bool = False, sign_key: bytes | str | None = None) -> Path:
        """Write a versioned artifact directory (``ditq_compiler.artifact``); ``dq.load`` reads it back.

        ``path`` may be new, empty, or an artifact (files in it the artifact did not write are kept);
        anything else is refused. ``sign_key``: also sign it (HMAC of the manifest; ``artifact.signing``).
        Compiled by several processes: call it on every one; rank 0 writes, the others wait for it."""
        return write_artifact(self.record, self.reference_graph_module, path, progress=progress, sign_key=sign_key)

    def export_onnx(self, path: str | os.PathLike, target: str = "ort", **options: Any) -> Path:
        """Write an opset-21 Q/DQ ONNX model for ``target`` ("ort" or "tensorrt"); see ``backends/onnx.py``."""
        from ditq_compiler.backends.onnx import export_compiled   # onnx and onnxscript load only when exporting
        return export_compiled(self, path, target, **options)


def float_layers_line(layers, quantize_roles) -> str:
    """'left in float by the recipe (N): role adaln (2): a, b; ...' with why: the role, or an override."""
    by_role: dict[str, list[str]] = {}
    for layer in layers:
        by_role.setdefault(layer.role if layer.reason == "role" else "an override", []).append(layer.name)
    parts = [f"{'role ' if role != 'an override' else 'by '}{role} ({len(names)}): {', '.join(names[:4])}"
             f"{' ...' if len(names) > 4 else ''}" for role, names in by_role.items()]
    return (f"left in float by the recipe ({len(layers)}; it quantizes roles {', '.join(quantize_roles)}): "
            + "; ".join(parts))


def output_tuple(out: Any) -> tuple:
    """A diffusers output as its ``to_tuple()``, as ``return_dict=False`` gives it; a tuple as it is."""
    if hasattr(out, "to_tuple"):
        return out.to_tuple()
    return out if isinstance(out, tuple) else (out,)


def load(path: str | os.PathLike, progress: bool = False, verify_key: bytes | str | None = None) -> CompiledModel:
    """The ``CompiledModel`` saved at ``path``; its outputs equal the saved model's bit for bit.

    The artifact is verified before any of it runs (``artifact.verify``: only allowed ops, checked names,
    dtypes, shapes, bounds and scales); anything wrong is an ``ArtifactError`` naming the file, node or
    tensor. ``verify_key``: also require a signature made with this key (``save(..., sign_key=)``)."""
    return CompiledModel(read_artifact(path, progress=progress, verify_key=verify_key))


def _retarget_device(gm: fx.GraphModule, device: torch.device) -> None:
    """Point every ``device=`` argument of ``gm``'s nodes at ``device`` (see ``CompiledModel.to``)."""
    changed = False
    for node in gm.graph.nodes:
        if isinstance(node.kwargs.get("device"), (torch.device, str)) and torch.device(node.kwargs["device"]) != device:
            node.update_kwarg("device", device)
            changed = True
    if changed:
        gm.recompile()


__all__ = ["CompiledModel", "load"]
