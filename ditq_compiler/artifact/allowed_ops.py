"""The ops a loaded artifact may call: the one allow-list, and what each quantized op expects.

``dq.load`` rebuilds a graph from ``graph.json``. Every ``call_function`` node names its target;
a target that is not listed here is refused before anything is built, so a tampered artifact can
run only ops that compute on tensors (no ``aten::empty`` of any size, no op of another namespace,
no Python callable). The list holds

* the ``ditq::`` quantized ops (``ditq_compiler/ops.py``, ``activation_ops.py``), each with a
  *contract*: what the dtypes and shapes of its operands must be, and that its scales are
  finite and positive. Their fake kernels only compute the output shape, so without the contract
  a weight of the wrong shape would load and fail in a matmul at run time;
* the aten ops of the compiler's own graphs: what ``torch.export`` captures of the DiT, U-Net,
  PixArt and SD3-style denoisers under every preset, and what the passes insert
  (``tests/artifact/test_allowed_ops.py`` compiles them and checks every op is here);
* a few Python operators on sizes (``operator.getitem`` of a multi-output op, ``torch.sym_*``).

The aten ops are checked by the op itself when the loader propagates shapes with fake tensors
(``verify.check_graph``): a wrong shape or dtype is an error naming the node there.

A model whose graph needs an op not listed here cannot be saved (``write_artifact`` says which);
code that registers an op of its own allows it with ``allow_op(op, contract)``: that is the
caller's decision, never the artifact's.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import torch
from torch import fx

from ditq_compiler.artifact.errors import ArtifactError

# ---- the list ------------------------------------------------------------------------------------
_SHAPE_OPS = (
    "_assert_tensor_metadata.default", "cat.default", "chunk.default", "clone.default", "contiguous.default",
    "expand.default", "flatten.using_ints", "permute.default", "reshape.default", "slice.Tensor", "split.Tensor",
    "split_with_sizes.default", "squeeze.dim", "stack.default", "sym_size.int", "to.dtype", "to.dtype_layout",
    "index.Tensor",
    "_to_copy.default", "transpose.int", "unflatten.int", "unsqueeze.default", "view.default",
    "upsample_nearest2d.vec", "constant_pad_nd.default", "select.int",
)
_ELEMENTWISE_OPS = (
    "add.Tensor", "addcmul.default", "clamp.default", "cos.default", "div.Tensor", "exp.default", "floor.default",
    "gelu.default",
    "gt.Tensor", "logical_not.default", "lt.Tensor", "masked_fill.Scalar", "mul.Tensor", "neg.default",
    "pow.Tensor_Scalar", "rsqrt.default", "rsub.Scalar", "sigmoid.default", "silu.default", "sin.default",
    "sqrt.default", "sub.Tensor", "tanh.default", "where.self",
)
_REDUCTION_AND_NN_OPS = (
    "conv2d.default", "dropout.default", "einsum.default", "embedding.default", "group_norm.default",
    "layer_norm.default", "linear.default", "matmul.default", "mean.dim", "bmm.default", "baddbmm.default",
    "scaled_dot_product_attention.default", "softmax.int", "sum.dim_IntList",
)
# ops that make a tensor from sizes alone: the loader bounds every node's output before any real run
_FACTORY_OPS = ("arange.default", "arange.start", "full.default", "ones.default", "zeros.default")

ATEN_OPS = frozenset(f"aten::{name}" for group in (_SHAPE_OPS, _ELEMENTWISE_OPS, _REDUCTION_AND_NN_OPS, _FACTORY_OPS)
                     for name in group)

_PYTHON_OPERATORS = ("getitem", "add", "sub", "mul", "truediv", "floordiv", "mod", "pow", "neg", "pos", "abs", "eq",
                     "ne", "lt", "le", "gt", "ge", "and_", "or_", "xor", "not_", "invert", "lshift", "rshift")
PYTHON_FUNCTIONS = frozenset([*(f"operator.{name}" for name in _PYTHON_OPERATORS),
                              *(f"math.{name}" for name in ("ceil", "floor", "sqrt", "trunc")),
                              *(f"torch.{name}" for name in dir(torch) if name.startswith("sym_")),
                              "torch._assert"])

Contract = Callable[["OpCall"], None]
_CONTRACTS: dict[str, Contract | None] = {}      # ditq ops and ops allowed by allow_op


def is_allowed(name: str) -> bool:
    """Whether a loaded graph may call the target spelled ``name`` (``namespace::op.overload``)."""
    return name in ATEN_OPS or name in PYTHON_FUNCTIONS or name in _CONTRACTS


def allowed_names() -> frozenset[str]:
    return frozenset(ATEN_OPS | PYTHON_FUNCTIONS | set(_CONTRACTS))


def op_name(op: torch._ops.OpOverload) -> str:
    """``namespace::op.overload``, as graph.json spells a target."""
    return f"{op.namespace}::{op._schema.name.split('::', 1)[1]}.{op._overloadname}"


def allow_op(op: torch._ops.OpOverload, contract: Contract | None = None) -> None:
    """Let loaded graphs call ``op`` (an op your code registers); ``contract(call)`` checks its operands."""
    if not isinstance(op, torch._ops.OpOverload):
        raise TypeError(f"allow_op takes an op overload such as torch.ops.my_ns.my_op.default, got {op!r}")
    _CONTRACTS[op_name(op)] = contract


def disallow_op(op: torch._ops.OpOverload) -> None:
    """Undo ``allow_op`` (the built-in ops cannot be removed)."""
    name = op_name(op)
    if name in BUILTIN_CONTRACTS:
        raise ValueError(f"{name} is one of ditq-compiler's own ops")
    _CONTRACTS.pop(name, None)


def contract_of(name: str) -> Contract | None:
    return _CONTRACTS.get(name)


# ---- what the contracts see ----------------------------------------------------------------------
class OpCall:
    """One call of a quantized op in a loaded graph, as its contract sees it.

    Operands are read by their schema names. A computed operand is its fake value (shape and dtype
    from shape propagation); an operand stored in the artifact (a ``get_attr``) is the real tensor,
    so contracts can check values (scales finite and positive) before the graph ever runs.
    """

    def __init__(self, node: fx.Node, gm: fx.GraphModule):
        self.node, self.gm = node, gm
        schema = node.target._schema
        self.args: dict[str, Any] = {}
        for i, argument in enumerate(schema.arguments):
            if i < len(node.args):
                self.args[argument.name] = node.args[i]
            else:
                self.args[argument.name] = node.kwargs.get(argument.name, argument.default_value)

    def fail(self, message: str) -> None:
        raise ArtifactError(f"node '{self.node.name}' ({op_name(self.node.target)}): {message}")

    def where(self, name: str) -> str:
        arg = self.args[name]
        return f"{name} (tensor '{arg.target}')" if isinstance(arg, fx.Node) and arg.op == "get_attr" else name

    def literal(self, name: str, kind: type, lo: int, hi: int) -> Any:
        value = self.args[name]
        if isinstance(value, fx.Node) or not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            self.fail(f"{name} must be a {kind.__name__}, got {value!r}")
        if kind is int and not lo <= value <= hi:
            self.fail(f"{name} is {value}, outside {lo}..{hi}")
        return value

    def tensor(self, name: str, *, floating: bool | None = None, dims: tuple[int, ...] | None = None,
               optional: bool = False) -> torch.Tensor | None:
        """The operand as a (fake or stored) tensor, its kind and rank checked."""
        arg = self.args[name]
        if arg is None and optional:
            return None
        value = self._value(arg)
        if not isinstance(value, torch.Tensor):
            self.fail(f"{name} must be a tensor, got {value!r}")
        if floating is True and not value.is_floating_point():
            self.fail(f"{self.where(name)} must be floating point, got {value.dtype}")
        if floating is False and (value.is_floating_point() or value.is_complex() or value.dtype == torch.bool):
            self.fail(f"{self.where(name)} must hold integers, got {value.dtype}")
        if dims is not None and value.dim() not in dims:
            self.fail(f"{self.where(name)} must have {' or '.join(map(str, dims))} dims, got shape "
                      f"{tuple(value.shape)}")
        return value

    def stored(self, name: str, *, floating: bool | None = None, dims: tuple[int, ...] | None = None,
               optional: bool = False) -> torch.Tensor | None:
        """A tensor that must be stored in the artifact (weights, scales, zero points)."""
        arg = self.args[name]
        if arg is None and optional:
            return None
        if not (isinstance(arg, fx.Node) and arg.op == "get_attr"):
            self.fail(f"{name} must be a tensor stored in the artifact (a get_attr), got {arg!r}")
        return self.tensor(name, floating=floating, dims=dims)

    def positive(self, name: str, value: torch.Tensor) -> None:
        """Scales: every value finite and > 0 (a zero scale divides by zero, a NaN one poisons the output)."""
        bad = ~(torch.isfinite(value) & (value > 0))
        if bool(bad.any()):
            first = value.reshape(-1)[bad.reshape(-1).nonzero()[0]].item()
            self.fail(f"{self.where(name)} holds {int(bad.sum())} value(s) that are not finite and positive "
                      f"(e.g. {first}); a quantizer scale must be > 0")

    def _value(self, arg: Any) -> Any:
        if isinstance(arg, fx.Node):
            if arg.op == "get_attr":
                obj = self.gm
                for part in arg.target.split("."):
                    obj = getattr(obj, part)
                return obj
            return arg.meta.get("val")
        return arg


def _same_shape(call: OpCall, a: str, b: str, x: torch.Tensor, y: torch.Tensor) -> None:
    if tuple(x.shape) != tuple(y.shape):
        call.fail(f"{call.where(b)} has shape {tuple(y.shape)}, {call.where(a)} has {tuple(x.shape)}; they must match")


# ---- the contracts of the ditq:: ops -------------------------------------------------------------
MAX_BITS = 16


def _weight_quantizer(call: OpCall, codes: torch.Tensor) -> None:
    """w_scale: one value, one per output channel, or one per (output channel, group of inputs)."""
    scale = call.stored("w_scale", floating=True, dims=(0, 1, 2))
    out_channels, inputs = codes.shape[0], math.prod(codes.shape[1:])
    fits = (scale.dim() == 0 or (scale.dim() == 1 and scale.shape[0] == out_channels)
            or (scale.dim() == 2 and codes.dim() == 2 and scale.shape[0] == out_channels and scale.shape[1] > 0
                and inputs % scale.shape[1] == 0))
    if not fits:
        call.fail(f"{call.where('w_scale')} has shape {tuple(scale.shape)}, which is no weight granularity of "
                  f"w_codes {tuple(codes.shape)}: () per tensor, ({out_channels},) per channel, or "
                  f"({out_channels}, groups) per group")
    call.positive("w_scale", scale)
    zero_point = call.stored("w_zero_point")
    _same_shape(call, "w_scale", "w_zero_point", scale, zero_point)


def _bias(call: OpCall, out_channels: int) -> None:
    bias = call.tensor("bias", floating=True, dims=(1,), optional=True)
    if bias is not None and bias.shape[0] != out_channels:
        call.fail(f"{call.where('bias')} has {bias.shape[0]} values for {out_channels} output channels")


def _activation_quantizer(call: OpCall, per_token: bool) -> None:
    """a_bits 0 (no quantizer) or 1..16; a static quantizer has one scale and one zero point."""
    bits = call.literal("a_bits", int, 0, MAX_BITS)
    scale = call.stored("a_scale", floating=True, optional=True)
    zero_point = call.stored("a_zero_point", optional=True)
    if bits and not per_token and (scale is None or zero_point is None):
        call.fail(f"a {bits}-bit static activation quantizer needs a_scale and a_zero_point")
    for name, value in (("a_scale", scale), ("a_zero_point", zero_point)):
        if value is not None and value.numel() != 1:
            call.fail(f"{call.where(name)} must hold one value, got shape {tuple(value.shape)}")
    if scale is not None:
        call.positive("a_scale", scale)


def _linear_weight(call: OpCall, name: str) -> torch.Tensor:
    """A linear op's stored (out, in) integer weight, checked to take x's last dim."""
    x = call.tensor("x", floating=True)
    weight = call.stored(name, floating=False, dims=(2,))
    if x.dim() == 0 or x.shape[-1] != weight.shape[1]:
        call.fail(f"{call.where(name)} has shape {tuple(weight.shape)}: it takes {weight.shape[1]} input "
                  f"features, x has shape {tuple(x.shape)}")
    return weight


def quant_linear_contract(call: OpCall) -> None:
    codes = _linear_weight(call, "w_codes")
    _weight_quantizer(call, codes)
    _bias(call, codes.shape[0])
    _activation_quantizer(call, call.literal("a_per_token", bool, 0, 1))


def _conv_geometry(call: OpCall, x: torch.Tensor, weight: torch.Tensor, name: str = "w_bits") -> None:
    """stride, padding, dilation and groups of a conv op, and that the weight takes x's channels."""
    groups = call.literal("groups", int, 1, weight.shape[0] or 1)
    for arg, lo in (("stride", 1), ("padding", 0), ("dilation", 1)):
        value = call.args[arg]
        if not (isinstance(value, (list, tuple)) and len(value) == 2
                and all(isinstance(v, int) and not isinstance(v, bool) and lo <= v <= 1 << 16 for v in value)):
            call.fail(f"{arg} must be two integers >= {lo}, got {value!r}")
    if weight.shape[0] % groups or x.shape[-3] != weight.shape[1] * groups:
        call.fail(f"{call.where(name)} has shape {tuple(weight.shape)} with groups={groups}: it takes "
                  f"{weight.shape[1] * groups} input channels, x has shape {tuple(x.shape)}")


def quant_conv2d_contract(call: OpCall) -> None:
    x = call.tensor("x", floating=True, dims=(3, 4))
    codes = call.stored("w_codes", floating=False, dims=(4,))
    _conv_geometry(call, x, codes, "w_codes")
    if call.literal("a_per_token", bool, 0, 1):
        call.fail("per-token activations are defined for linears only")
    _weight_quantizer(call, codes)
    _bias(call, codes.shape[0])
    _activation_quantizer(call, False)


def _finite(call: OpCall, name: str, value: torch.Tensor) -> None:
    if not bool(torch.isfinite(value).all()):
        call.fail(f"{call.where(name)} holds NaN or Inf")


def _channel_vector(call: OpCall, name: str, size: int, optional: bool = True) -> torch.Tensor | None:
    """A stored, finite float vector of one value per channel (binary scales, offsets, clip factors)."""
    value = call.stored(name, floating=True, dims=(1,), optional=optional)
    if value is not None:
        if value.shape[0] != size:
            call.fail(f"{call.where(name)} has {value.shape[0]} values for {size} channels")
        _finite(call, name, value)
    return value


def _binary_operands(call: OpCall, bits: torch.Tensor, in_channels: int) -> None:
    """W1A1 ops: 0/1 weight bits, sigma per output channel, tau_x / mu per input channel, the scale mode."""
    if bits.numel() and not bool(((bits == 0) | (bits == 1)).all()):
        call.fail(f"{call.where('w_bits')} must hold 0/1 bits")
    _channel_vector(call, "w_scale", bits.shape[0], optional=False)
    _channel_vector(call, "tau", in_channels)
    mode = call.literal("mode", int, 0, 2)
    clip = [_channel_vector(call, name, in_channels) for name in ("mu_min", "mu_max")]
    if mode == 2 and any(v is None for v in clip):
        call.fail("the clipped activation scale (mode 2) needs mu_min and mu_max")
    _bias(call, bits.shape[0])


def binary_linear_contract(call: OpCall) -> None:
    bits = _linear_weight(call, "w_bits")
    _binary_operands(call, bits, bits.shape[1])


def binary_conv2d_contract(call: OpCall) -> None:
    x = call.tensor("x", floating=True, dims=(4,))
    bits = call.stored("w_bits", floating=False, dims=(4,))
    _conv_geometry(call, x, bits)
    k = call.stored("k", floating=True, dims=(2,))
    if tuple(k.shape) != tuple(bits.shape[2:]):
        call.fail(f"{call.where('k')} has shape {tuple(k.shape)}, the kernel is {tuple(bits.shape[2:])}")
    _finite(call, "k", k)
    _binary_operands(call, bits, x.shape[1])


def hadamard_contract(call: OpCall) -> None:
    """y = x (L (x) R)^T on x viewed as (..., |L|, |R|): square, finite factors whose sizes fit x's last dim."""
    x = call.tensor("x", floating=True)
    width = x.shape[-1] if x.dim() else 0
    sizes = []
    for name in ("left", "right"):
        factor = call.stored(name, floating=True, dims=(2,), optional=True)
        if factor is None:
            continue
        if factor.shape[0] != factor.shape[1] or factor.shape[0] == 0:
            call.fail(f"{call.where(name)} must be a square matrix, got shape {tuple(factor.shape)}")
        _finite(call, name, factor)
        sizes.append(factor.shape[0])
    fits = width % math.prod(sizes) == 0 if len(sizes) < 2 else width == math.prod(sizes)
    if not fits:
        call.fail(f"rotation factors of sizes {sizes} do not fit x's last dim {width} (shape {tuple(x.shape)})")


def _tables(call: OpCall, names: tuple[str, ...], positive: tuple[str, ...]) -> None:
    """Per-time-group tables: 1-D, equally long, one row when there is no group input."""
    x = call.tensor("x", floating=True)
    group = call.tensor("group", floating=False, dims=(0, 1), optional=True)
    call.literal("bits", int, 1, MAX_BITS)
    tables = {name: call.stored(name, dims=(1,)) for name in names}
    first, rows = names[0], tables[names[0]].shape[0]
    for name, table in tables.items():
        if table.shape[0] != rows or rows == 0:
            call.fail(f"{call.where(name)} has {table.shape[0]} rows, {call.where(first)} has {rows}; every "
                      "table needs one row per time group")
    if group is None and rows != 1:
        call.fail(f"{call.where(first)} has {rows} time groups but the node has no group input")
    if group is not None and group.dim() == 1 and x.dim() and group.shape[0] not in (1, x.shape[0]):
        call.fail(f"group has {group.shape[0]} entries for a batch of {x.shape[0]}")
    for name in positive:
        if not tables[name].is_floating_point():
            call.fail(f"{call.where(name)} must be floating point, got {tables[name].dtype}")
        call.positive(name, tables[name])


def quant_act_contract(call: OpCall) -> None:
    _tables(call, ("scale", "zero_point"), positive=("scale",))


def quant_softmax_mrq_contract(call: OpCall) -> None:
    _tables(call, ("s1",), positive=("s1",))


def quant_gelu_mrq_contract(call: OpCall) -> None:
    _tables(call, ("s_neg", "s_pos"), positive=("s_neg", "s_pos"))


BUILTIN_CONTRACTS: dict[str, Contract] = {
    "ditq::quant_linear.default": quant_linear_contract,
    "ditq::quant_conv2d.default": quant_conv2d_contract,
    "ditq::hadamard.default": hadamard_contract,
    "ditq::binary_linear.default": binary_linear_contract,
    "ditq::binary_conv2d.default": binary_conv2d_contract,
    "ditq::quant_act.default": quant_act_contract,
    "ditq::quant_softmax_mrq.default": quant_softmax_mrq_contract,
    "ditq::quant_gelu_mrq.default": quant_gelu_mrq_contract,
}
_CONTRACTS.update(BUILTIN_CONTRACTS)

__all__ = ["ATEN_OPS", "BUILTIN_CONTRACTS", "PYTHON_FUNCTIONS", "OpCall", "allow_op", "allowed_names", "contract_of",
           "disallow_op", "is_allowed", "op_name"]
