"""TensorRT backend: a strongly typed engine from the ``tensorrt`` ONNX flavour, run with the model's call signature.

    compiled.export_onnx("dit.onnx", target="tensorrt")
    build_engine("dit.onnx", "dit.plan", batch=(1, 2, 8))            # needs TensorRT and a CUDA GPU
    model = TensorRTModel("dit.plan")                                # loads dit.plan + dit.plan.json
    out = model(x, timestep=t, class_labels=y)                       # out.sample, a CUDA tensor

TensorRT 10 and 11 take quantization from the graph: explicit int8 Q/DQ (zero point 0) on the inputs
of MatMul / Conv, which the ``tensorrt`` flavour writes, and no INT8 builder flag (TensorRT 11 has
none, and is always strongly typed; on 10 the network is created with the ``STRONGLY_TYPED`` flag).
Precision therefore follows the ONNX types: the int8 Q/DQ layers run in int8, the rest in the
exported float type. An FP16 engine of the same model is built from an FP16 export.

The optimisation profile covers the dynamic axes of the ONNX inputs: the batch axis (``batch`` =
min, opt, max) and, where the export left them dynamic, the height and width of the sample input
(``resolution`` = three (h, w) pairs). The engine file is written atomically with a ``.json`` beside
it that carries the call signature from the ONNX metadata (``ExportedSignature``).

Without TensorRT or a CUDA device, building and running raise ``TensorRTUnavailable``; the tests skip.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import onnx
import torch

from ditq_compiler.backends.onnx import ExportedSignature

Shape = tuple[int, ...]


class TensorRTUnavailable(RuntimeError):
    """TensorRT (the Python package) or a CUDA device is missing."""


class TensorRTError(RuntimeError):
    """TensorRT could not parse or build the model."""


def _tensorrt() -> Any:
    try:
        import tensorrt
    except ImportError as e:
        raise TensorRTUnavailable("the 'tensorrt' package is not installed (pip install tensorrt)") from e
    if not torch.cuda.is_available():
        raise TensorRTUnavailable("TensorRT needs a CUDA device; torch sees none")
    return tensorrt


def profile_shapes(inputs: dict[str, Shape], sample_input: str | None, batch: tuple[int, int, int],
                   resolution: tuple[tuple[int, int], ...] | None = None) -> dict[str, tuple[Shape, Shape, Shape]]:
    """(min, opt, max) shape of every input; -1 marks a dynamic axis (as TensorRT reports them).

    Axis 0 takes ``batch``; the last two axes of ``sample_input`` take ``resolution`` when dynamic.
    Any other dynamic axis, or a resolution for an input exported with a fixed one, is an error.
    """
    if len(batch) != 3 or not 1 <= batch[0] <= batch[1] <= batch[2]:
        raise ValueError(f"batch must be (min, opt, max) with 1 <= min <= opt <= max, got {batch}")
    if resolution is not None and len(resolution) != 3:
        raise ValueError(f"resolution must be three (height, width) pairs (min, opt, max), got {resolution}")
    shapes = {}
    for name, dims in inputs.items():
        per_level: list[list[int]] = [list(dims), list(dims), list(dims)]
        for axis, size in enumerate(dims):
            spatial = name == sample_input and axis >= len(dims) - 2
            which = axis - (len(dims) - 2)          # 0: height, 1: width of the sample input
            if size >= 0:
                if spatial and resolution is not None and any(r[which] != size for r in resolution):
                    raise ValueError(f"input '{name}' was exported with a fixed {('height', 'width')[which]} "
                                     f"{size}; re-export with a dynamic resolution to build for {resolution}")
                continue
            if axis == 0:
                values = batch
            elif spatial and resolution is not None:
                values = tuple(r[which] for r in resolution)
            else:
                raise ValueError(f"input '{name}' axis {axis} is dynamic and has no range: give resolution= for the "
                                 "sample's height and width")
            for level, value in zip(per_level, values, strict=True):
                level[axis] = value
        shapes[name] = tuple(tuple(level) for level in per_level)
    return shapes


def _metadata(onnx_path: Path) -> dict[str, str]:
    model = onnx.load(str(onnx_path), load_external_data=False)
    meta = {p.key: p.value for p in model.metadata_props}
    target = meta.get("ditq.target")
    if target not in ("tensorrt", "float"):
        raise TensorRTError(f"{onnx_path} is the '{target}' flavour; TensorRT engines are built from "
                            "export_onnx(..., target='tensorrt') (symmetric int8 Q/DQ) or a float export")
    return meta


def build_engine(onnx_path: str | os.PathLike, engine_path: str | os.PathLike, *,
                 batch: tuple[int, int, int] = (1, 2, 8), resolution: tuple[tuple[int, int], ...] | None = None,
                 workspace_gib: float = 4.0) -> Path:
    """Parse the ONNX file, build a strongly typed engine with one optimisation profile, write it atomically."""
    onnx_path, engine_path = Path(onnx_path), Path(engine_path)
    meta = _metadata(onnx_path)
    trt = _tensorrt()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags = 0
    if hasattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED"):   # required on 10.x, ignored on 11.x
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "\n  ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise TensorRTError(f"TensorRT could not parse {onnx_path}:\n  {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gib * 2**30))
    inputs = {network.get_input(i).name: tuple(network.get_input(i).shape) for i in range(network.num_inputs)}
    optimisation = builder.create_optimization_profile()
    for name, (low, opt, high) in profile_shapes(inputs, meta.get("ditq.sample"), batch, resolution).items():
        optimisation.set_shape(name, low, opt, high)
    config.add_optimization_profile(optimisation)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise TensorRTError(f"TensorRT failed to build an engine from {onnx_path} (see its log above)")
    _write_atomically(engine_path, bytes(plan))
    _write_atomically(Path(f"{engine_path}.json"), json.dumps(meta, indent=1).encode())
    return engine_path


def _write_atomically(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class TensorRTModel:
    """A deserialized engine called like the PyTorch model; inputs are moved to the GPU, outputs stay there."""

    def __init__(self, engine_path: str | os.PathLike, device: str = "cuda"):
        trt = _tensorrt()
        self.path, self.device = Path(engine_path), torch.device(device)
        meta = json.loads(Path(f"{self.path}.json").read_text())
        self.signature = ExportedSignature.from_metadata(meta, self.path.name)
        self._logger = trt.Logger(trt.Logger.WARNING)
        # an engine is executable code: load only engines you built or trust
        self.engine = trt.Runtime(self._logger).deserialize_cuda_engine(self.path.read_bytes())
        if self.engine is None:
            raise TensorRTError(f"TensorRT could not deserialize {self.path} (built by another TensorRT version?)")
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.outputs = sorted((n for n in names if n not in self.inputs), key=_output_index)
        self._dtypes = {n: _torch_dtype(trt, self.engine.get_tensor_dtype(n)) for n in names}

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        values, return_dict = self.signature.bind(args, kwargs)
        keep = []
        for name in self.inputs:
            tensor = torch.as_tensor(values[name]).to(self.device, self._dtypes[name]).contiguous()
            self.context.set_input_shape(name, tuple(tensor.shape))
            self.context.set_tensor_address(name, tensor.data_ptr())
            keep.append(tensor)
        outputs = []
        for name in self.outputs:
            out = torch.empty(tuple(self.context.get_tensor_shape(name)), dtype=self._dtypes[name], device=self.device)
            self.context.set_tensor_address(name, out.data_ptr())
            outputs.append(out)
        stream = torch.cuda.current_stream(self.device)
        if not self.context.execute_async_v3(stream.cuda_stream):
            raise TensorRTError(f"{self.path.name}: execution failed")
        stream.synchronize()
        return self.signature.structure(outputs, return_dict)


def _output_index(name: str) -> int:
    return int(name.rsplit("_", 1)[1]) if name.startswith("output_") else 0


def _torch_dtype(trt: Any, dtype: Any) -> torch.dtype:
    table = {"FLOAT": torch.float32, "HALF": torch.float16, "BF16": torch.bfloat16, "INT8": torch.int8,
             "UINT8": torch.uint8, "INT32": torch.int32, "INT64": torch.int64, "BOOL": torch.bool}
    for name, torch_dtype in table.items():
        if hasattr(trt.DataType, name) and dtype == getattr(trt.DataType, name):
            return torch_dtype
    raise TensorRTError(f"no torch dtype for TensorRT's {dtype}")
