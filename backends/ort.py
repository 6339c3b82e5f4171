"""ONNX Runtime backend: run an exported model with the original model's call signature, and profile it.

    model = OrtModel("dit.onnx", threads=2)
    out = model(x, timestep=t, class_labels=y)       # like the PyTorch model: out.sample is a tensor
    sample(model, scheduler, labels)                 # so the sampler and bench/quality.py can drive it
    report = profile("dit.onnx", (x, t, y), threads=2)
    report.layers["transformer_blocks.0.ff.net.2"].kernel    # e.g. 'MatMulIntegerToFloat'

The call is bound by ``ExportedSignature`` from the metadata the export wrote (``backends/onnx.py``).

Kernels: ONNX Runtime rewrites the graph when the session starts (``Q/DQ -> MatMul`` becomes
``MatMulIntegerToFloat``, and so on) and keeps the name of the MatMul / Conv node it fused into,
so the profile finds each quantized layer's kernel through the node name the export recorded
(``ditq.layers``). ``INTEGER_KERNELS`` are the ops that multiply integer codes.
"""

from __future__ import annotations

import json
import os
import tempfile
import warnings
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import torch

from ditq_compiler.backends.onnx import ExportedSignature
from ditq_compiler.backends.torch import cpu_has_vnni
from ditq_compiler.trajectory import Trajectory

INTEGER_KERNELS = frozenset({"MatMulIntegerToFloat", "QLinearMatMul", "MatMulInteger", "DynamicQuantizeMatMul",
                             "QGemm", "ConvInteger", "QLinearConv", "QAttention"})
_NUMPY_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64,
                "tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(bool)": np.bool_}


def session_options(threads: int | None = None, profile_prefix: str | None = None,
                    spinning: bool = True) -> ort.SessionOptions:
    """Sequential execution on ``threads`` intra-op threads (None: ONNX Runtime's default, all cores).

    ``spinning=False`` lets idle worker threads sleep at once instead of spinning for more work: slower
    to wake, but fair when several sessions (or processes) share the cores, as in a benchmark.

    ONNX Runtime fuses ``DQ(INT4 weight) -> MatMul`` (weight-only int4) into ``MatMulNBits`` and by
    default lets that kernel quantize its float input to int8 per block (accuracy level 4): a second
    quantizer the recipe does not have (49 dB from the reference on a test layer). Level 0 keeps the
    input in float, as the ONNX graph says (147 dB).
    """
    options = ort.SessionOptions()
    options.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "0")
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.inter_op_num_threads = 1
    if threads is not None:
        options.intra_op_num_threads = threads
    if not spinning:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.log_severity_level = 3
    if profile_prefix is not None:
        options.enable_profiling = True
        options.profile_file_prefix = profile_prefix
    return options


class OrtModel:
    """An ONNX Runtime session called like the PyTorch model it was exported from."""

    def __init__(self, path: str | os.PathLike, *, threads: int | None = None,
                 providers: tuple[str, ...] = ("CPUExecutionProvider",), options: ort.SessionOptions | None = None):
        self.path = Path(path)
        self.session = ort.InferenceSession(str(self.path), options or session_options(threads),
                                            providers=list(providers))
        meta = self.session.get_modelmeta().custom_metadata_map
        self.signature = ExportedSignature.from_metadata(meta, str(self.path))
        self.layers: dict[str, dict[str, str]] = json.loads(meta.get("ditq.layers", "{}"))
        self.target = meta.get("ditq.target", "")
        if meta.get("ditq.needs_vnni") == "true" and not cpu_has_vnni():
            warnings.warn(f"{self.path.name} has 8-bit weights exported for a CPU with VNNI; on this one ONNX "
                          "Runtime's u8 x s8 kernel adds product pairs in saturating int16 and can be wrong. Export "
                          "it here (or with vnni=False) for the exact u8 x u8 kernel in those layers.", stacklevel=2)
        self._types = {i.name: _NUMPY_TYPES.get(i.type) for i in self.session.get_inputs()}
        self.trajectory = Trajectory()      # BiDM+'s TES: state across sampler steps (``ditq_compiler.trajectory``)

    def reset_trajectory(self) -> None:
        """Start a new sampling run (a no-op for models without state across steps)."""
        self.trajectory = Trajectory()

    def feeds(self, *args: Any, **kwargs: Any) -> dict[str, np.ndarray]:
        """The session's input arrays for a call of the original model."""
        return self._bind(args, kwargs)[0]

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        feeds, return_dict = self._bind(args, kwargs)
        states = self.signature.states
        if states:
            timesteps = torch.as_tensor(feeds[self.signature.timestep])
            feeds.update({name: _as_array(value, self._types.get(name)) for name, value in
                          self.trajectory.inputs(states, timesteps).items()})
        outputs = [torch.from_numpy(o) for o in self.session.run(None, feeds)]
        if states:
            count = sum(1 for s in states if s.index >= 0)
            outputs, new_states = outputs[:len(outputs) - count], outputs[len(outputs) - count:]
            self.trajectory.advance(new_states, timesteps)
        return self.signature.structure(outputs, return_dict)

    def _bind(self, args: tuple, kwargs: dict) -> tuple[dict[str, np.ndarray], bool]:
        inputs, return_dict = self.signature.bind(args, kwargs)
        return {name: _as_array(value, self._types.get(name)) for name, value in inputs.items()}, return_dict


def _as_array(value: Any, dtype: Any) -> np.ndarray:
    array = value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else np.asarray(value)
    return np.ascontiguousarray(array.astype(dtype, copy=False) if dtype is not None else array)


# ---------------------------------------------------------------------------------------------- profile

@dataclass
class LayerKernel:
    layer: str
    node: str                 # the ONNX node the export made for the layer's multiply
    kernel: str               # the op ONNX Runtime ran for it, after its graph rewrites
    ms: float                 # time in that kernel per run

    @property
    def integer(self) -> bool:
        return self.kernel in INTEGER_KERNELS


@dataclass
class Profile:
    layers: dict[str, LayerKernel]                            # quantized layer -> its kernel (our exports)
    op_ms: dict[str, float] = field(default_factory=dict)     # total per op type, per run, largest first
    op_counts: dict[str, int] = field(default_factory=dict)   # nodes of each op type that ran
    runs: int = 1

    def integer_layers(self) -> list[str]:
        return [name for name, k in self.layers.items() if k.integer]

    def kernel_counts(self) -> dict[str, int]:
        counts: dict[str, int] = defaultdict(int)
        for k in self.layers.values():
            counts[k.kernel] += 1
        return dict(counts)

    def table(self) -> str:
        from ditq_compiler.report import format_table

        rows = [[k.layer, k.kernel, "yes" if k.integer else "no", f"{k.ms:.3f}"] for k in self.layers.values()]
        return format_table(rows, ["layer", "kernel", "integer", "ms/run"])


def profile(path: str | os.PathLike, args: tuple = (), kwargs: dict | None = None, *, threads: int | None = None,
            runs: int = 1, feeds: dict[str, np.ndarray] | None = None) -> Profile:
    """Run the model ``runs`` times with ONNX Runtime's profiler on: time per op type, and the kernel of every
    quantized layer. ``feeds`` (input name -> array) runs models not exported by ditq_compiler."""
    with tempfile.TemporaryDirectory() as tmp:
        options = session_options(threads, profile_prefix=str(Path(tmp) / "ort"))
        if feeds is None:
            model = OrtModel(path, options=options)
            session, feeds, layers = model.session, model.feeds(*args, **(kwargs or {})), model.layers
        else:
            session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
            layers = json.loads(session.get_modelmeta().custom_metadata_map.get("ditq.layers", "{}"))
        for _ in range(runs):
            session.run(None, feeds)
        events = json.loads(Path(session.end_profiling()).read_text())
    kernels: dict[str, str] = {}
    node_us: dict[str, float] = defaultdict(float)
    op_us: dict[str, float] = defaultdict(float)
    for event in events:
        if event.get("cat") != "Node" or not event["name"].endswith("_kernel_time"):
            continue
        node = event["name"].removesuffix("_kernel_time")
        kernels[node] = event["args"]["op_name"]
        node_us[node] += event["dur"]
        op_us[event["args"]["op_name"]] += event["dur"]
    counts: dict[str, int] = defaultdict(int)
    for op in kernels.values():
        counts[op] += 1
    per_layer = {layer: LayerKernel(layer, info["node"], kernels.get(info["node"], "not run (fused away?)"),
                                    node_us.get(info["node"], 0.0) / 1e3 / runs)
                 for layer, info in layers.items()}
    op_ms = {op: us / 1e3 / runs for op, us in sorted(op_us.items(), key=lambda kv: -kv[1])}
    return Profile(per_layer, op_ms, dict(counts), runs)
