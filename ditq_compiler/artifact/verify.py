"""What ``dq.load`` checks of an artifact's tensors and graph before any of it runs.

The loader is a verifier: an artifact is data from somewhere else, and the manifest's checksums
only say the files are the ones the manifest lists (whoever changes a file can rewrite the
manifest). So, in this order, and each failure an ``ArtifactError`` naming the tensor or node:

1. ``graph_json.graph_from_json`` builds the graph only from checked parts (allowed ops, plain
   names, plain values; see its module doc).
2. ``packed_info``: how an integer tensor was packed, checked before it is unpacked, so a shape
   in ``graph.json`` cannot make the loader allocate more than the packed bytes hold
   (``MAX_FILL_ELEMENTS`` for a tensor stored in zero bits: one value repeated).
3. ``check_tensors``: every stored tensor and the example call have a dtype an artifact holds,
   at most ``MAX_ELEMENTS`` values, and no NaN or Inf in a floating-point one.
4. ``check_graph``: the example call is propagated through the graph with fake tensors (shapes and
   dtypes only, no data: nothing is computed or allocated at full size). Before each quantized op
   runs, its contract (``allowed_ops``) checks its operands' dtypes and shapes against each other
   and that its scales are finite and positive; each aten op checks its own operands; every
   node's output is bounded by ``MAX_ELEMENTS``. A node that fails is named with its operands.

Only then is the graph lowered and handed to the user. What this does not check: that the
weights are the ones you expect (use a signature, ``signing``), nor memory at larger batches than
the example's (it grows with the batch as the model's own would).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import fx
from torch.utils._pytree import tree_leaves

from ditq_compiler.artifact import allowed_ops
from ditq_compiler.artifact.bitpack import MAX_PACKED_BITS, PackedInfo, packed_size
from ditq_compiler.artifact.errors import ArtifactError
from ditq_compiler.logs import quiet_logger

MAX_ELEMENTS = 1 << 31          # per tensor: stored, example input, or any node's output at the example's batch
MAX_FILL_ELEMENTS = 1 << 24     # a packed tensor of zero bits (one value repeated) holds no bytes to bound it
MAX_DIMS = 8
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
INTEGER_DTYPES = (torch.int8, torch.uint8, torch.int16, torch.int32, torch.int64, torch.bool)
_INTEGER_NAMES = {str(d).removeprefix("torch."): d for d in INTEGER_DTYPES if d is not torch.bool}


# ---- stored tensors ------------------------------------------------------------------------------
def _shape(value: Any, what: str) -> tuple[int, ...]:
    if not (isinstance(value, list) and len(value) <= MAX_DIMS
            and all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in value)):
        raise ArtifactError(f"{what}: shape {value!r} is not a list of at most {MAX_DIMS} sizes >= 0")
    return tuple(value)


def packed_info(name: str, info: Any, data: torch.Tensor) -> PackedInfo:
    """The packing of tensor ``name``, checked against its packed bytes before anything is unpacked."""
    what = f"tensor '{name}'"
    if not (isinstance(info, dict) and set(info) == {"bits", "offset", "dtype", "shape"}):
        raise ArtifactError(f"{what}: malformed packing entry {str(info)[:80]}")
    bits, offset, dtype = info["bits"], info["offset"], info["dtype"]
    if not (isinstance(bits, int) and not isinstance(bits, bool) and 0 <= bits <= MAX_PACKED_BITS):
        raise ArtifactError(f"{what}: packed at {bits!r} bits (0..{MAX_PACKED_BITS})")
    if not isinstance(dtype, str) or dtype not in _INTEGER_NAMES:
        raise ArtifactError(f"{what}: packed dtype {dtype!r} is not an integer dtype ({', '.join(_INTEGER_NAMES)})")
    info_dtype = _INTEGER_NAMES[dtype]
    lo, hi = torch.iinfo(info_dtype).min, torch.iinfo(info_dtype).max
    if not (isinstance(offset, int) and not isinstance(offset, bool) and lo <= offset
            and offset + (1 << bits) - 1 <= hi):
        raise ArtifactError(f"{what}: offset {offset!r} with {bits} bits does not fit {dtype}")
    shape = _shape(info["shape"], what)
    numel = math.prod(shape)
    if bits == 0 and numel > MAX_FILL_ELEMENTS:
        raise ArtifactError(f"{what}: a constant tensor of {numel} values (shape {shape}) is more than the "
                            f"{MAX_FILL_ELEMENTS} an artifact may store in zero bits")
    if data.dtype != torch.uint8 or data.dim() != 1 or data.numel() != packed_size(numel, bits):
        raise ArtifactError(f"{what}: {numel} values at {bits} bits need {packed_size(numel, bits)} packed bytes, "
                            f"the tensor file holds {data.numel()} {data.dtype} values")
    return PackedInfo(bits, offset, dtype, shape)


def check_tensor(name: str, tensor: torch.Tensor, what: str = "tensor") -> None:
    """A dtype artifacts hold, at most ``MAX_ELEMENTS`` values, no NaN or Inf if floating point."""
    if tensor.dtype not in FLOAT_DTYPES + INTEGER_DTYPES:
        raise ArtifactError(f"{what} '{name}' is {tensor.dtype}; artifacts hold "
                            f"{', '.join(str(d).removeprefix('torch.') for d in FLOAT_DTYPES + INTEGER_DTYPES)}")
    if tensor.numel() > MAX_ELEMENTS or tensor.dim() > MAX_DIMS:
        raise ArtifactError(f"{what} '{name}' has shape {tuple(tensor.shape)}, more than an artifact may hold")
    if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
        bad = int((~torch.isfinite(tensor)).sum())
        raise ArtifactError(f"{what} '{name}' (shape {tuple(tensor.shape)}) holds {bad} NaN or Inf value(s)")


def check_tensors(tensors: dict[str, torch.Tensor], what: str = "tensor") -> None:
    for name, tensor in tensors.items():
        check_tensor(name, tensor, what)


# ---- the graph -----------------------------------------------------------------------------------
def _operand(arg: Any) -> str:
    if not isinstance(arg, fx.Node):
        return repr(arg)
    value = arg.meta.get("val")
    label = f"tensor '{arg.target}'" if arg.op == "get_attr" else arg.name
    if isinstance(value, torch.Tensor):
        return f"{label} {tuple(value.shape)} {str(value.dtype).removeprefix('torch.')}"
    return label


def _describe(node: fx.Node) -> str:
    target = allowed_ops.op_name(node.target) if isinstance(node.target, torch._ops.OpOverload) else str(node.target)
    operands = [_operand(a) for a in node.args] + [f"{k}={_operand(v)}" for k, v in node.kwargs.items()]
    return f"node '{node.name}' ({target}) on {', '.join(operands) or 'no operands'}"


def _check_output(node: fx.Node, result: Any) -> None:
    for leaf in tree_leaves(result):
        if isinstance(leaf, torch.Tensor):
            numel = math.prod(int(s) for s in leaf.shape)
            if numel > MAX_ELEMENTS or leaf.dim() > MAX_DIMS:
                raise ArtifactError(f"node '{node.name}' would make a tensor of shape {tuple(leaf.shape)} "
                                    f"({numel} values), more than the {MAX_ELEMENTS} an artifact's op may")


def check_graph(gm: fx.GraphModule, inputs: list[Any]) -> None:
    """Propagate ``inputs`` (the artifact's example call) with fake tensors, checking each node (module doc).

    Leaves every node's ``meta["val"]``: what shape restoration, re-export and the ONNX lowering read."""
    from torch._subclasses.fake_tensor import FakeTensorMode, unset_fake_temporarily
    from torch.fx.passes.fake_tensor_prop import FakeTensorProp

    class Checked(FakeTensorProp):
        def run_node(self, node: fx.Node) -> Any:
            if node.op == "call_function" and isinstance(node.target, torch._ops.OpOverload):
                contract = allowed_ops.contract_of(allowed_ops.op_name(node.target))
                if contract is not None:
                    with unset_fake_temporarily():      # contracts read stored values (scales) for real
                        contract(allowed_ops.OpCall(node, gm))
            try:
                result = super().run_node(node)
            except ArtifactError:
                raise
            except Exception as e:  # the op's own check of its operands, whatever torch raises
                message = " ".join(str(e).split("\n")[0].split()) or type(e).__name__
                raise ArtifactError(f"{_describe(node)} cannot run: {message}") from None
            _check_output(node, result)
            return result

    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if len(placeholders) != len(inputs):
        raise ArtifactError(f"the example call has {len(inputs)} inputs, the graph takes {len(placeholders)}")
    propagation = Checked(gm, FakeTensorMode(allow_non_fake_inputs=True))
    propagation.extra_traceback = False      # our errors name the node already
    with quiet_logger(_FAKE_TENSOR_LOGGER):   # it prints tracebacks before our one-line error
        try:
            propagation.propagate(*inputs)
        except ArtifactError:
            raise
        except Exception as e:  # outside any node: the inputs or the output structure
            raise ArtifactError(f"the example call does not fit the graph's inputs and outputs: {e}") from None


_FAKE_TENSOR_LOGGER = "torch._subclasses.fake_tensor"   # logs a traceback for every op that refuses its operands


__all__ = ["FLOAT_DTYPES", "INTEGER_DTYPES", "MAX_ELEMENTS", "MAX_FILL_ELEMENTS", "check_graph", "check_tensor",
           "check_tensors", "packed_info"]
