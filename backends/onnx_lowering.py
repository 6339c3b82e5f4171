"""The ONNX lowering machinery: targets, the lowering registry, the context a lowering gets, and building blocks.

``backends/onnx.py`` (linears, convs, the export route) and ``backends/onnx_sites.py`` (TQ-DiT's activation
sites, RobuQ's rotations) register their lowerings here; ``lower_graph`` replaces every registered op of
a graph by plain aten ops and the ONNX-mirror ops of ``onnx_ops``.

Adding a lowering (one function per quantized op)
-------------------------------------------------
::

    @register_lowering(torch.ops.ditq.my_op.default)
    def lower_my_op(ctx: LoweringContext, node: fx.Node) -> fx.Node:
        x, w_codes, ... = ctx.args()             # get_attr constants come back as tensors
        scale = ctx.constant("a_scale", tensor)  # a new constant (an initializer in ONNX)
        y = ctx.call(torch.ops.aten.mul.Tensor, x, scale)          # any aten op exports as usual
        ...
        return y                                 # the node that replaces ``node``

``ctx.target`` says what the target takes (``activation_dtype``, ``symmetric_int8_only``,
``int4_weights``, ``integer_ops``, ``vnni``). Raise ``LoweringError("why")`` where the target cannot
express the op: the errors of all nodes are reported together, before any file is written. Name
the multiply with ``ctx.layer`` (the ``layer`` argument of ``ditq_onnx.matmul`` / ``conv`` / ...) so
the profile can find its kernel. The building blocks below do the common parts:
``static_activation`` (per-tensor Q/DQ, the zero-point offset for symmetric-only targets),
``token_activation`` (per-token codes computed in the graph), ``weight_operand`` (integer codes +
DequantizeLinear in the layout MatMul wants, INT4 where they fit) and ``add_bias`` (with the offset
correction folded in). The activation-site quantizers (TQ-DiT: time-grouped ``Mul(1/s_g) -> Q(1) ->
DQ(1) -> MatMul -> Mul(s_g)``, two-region quantizers as two Q/DQ branches) and the online Hadamard
rotation (RobuQ) are lowered in ``backends/onnx_sites.py``; a site hands the linear it feeds its
integer codes through ``ctx.quantized_input`` / ``ctx.set_quantized_input`` (``QuantizedInput``).

"""

from __future__ import annotations

import copy
import dataclasses
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, fx

import ditq_compiler.ops  # noqa: F401  (registers the ditq:: ops)
from ditq_compiler import meta
from ditq_compiler.backends import onnx_ops  # noqa: F401  (registers the ditq_onnx:: ops)
from ditq_compiler.backends.torch import INT16_MAX, cpu_has_vnni, pair_sum_bound
from ditq_compiler.pipeline import delete_unused_attrs, fetch_attr
from ditq_compiler.quant import SCALE_EPS

INT4_RANGE = (-8, 7)
ONNX = torch.ops.ditq_onnx
aten = torch.ops.aten


class OnnxExportError(RuntimeError):
    """The export failed; the message lists every node that could not be lowered."""


class LoweringError(ValueError):
    """A node cannot be expressed in the requested target."""


@dataclasses.dataclass(frozen=True)
class Target:
    """What an ONNX consumer takes (see the module docstring for the measurements behind each)."""

    name: str
    activation_dtype: torch.dtype      # dtype of activation codes
    symmetric_int8_only: bool          # only int8 Q/DQ with zero point 0 (TensorRT)
    int4_weights: bool                 # store codes that fit [-8, 7] as INT4 initializers
    integer_ops: bool                  # may use MatMulInteger / ConvInteger
    vnni: bool = True                  # u8 x s8 products accumulate exactly on the CPU that will run it


TARGETS = ("ort", "tensorrt")
ACTIVATION_DTYPES = {"uint8": torch.uint8, "int8": torch.int8}


def make_target(name: str, activation_dtype: str | None = None, vnni: bool | None = None) -> Target:
    """The target's settings; ``vnni`` (ort) is whether the CPU that runs the model has AVX512-VNNI / AVX-VNNI
    (None: this CPU's answer; see ``kernel_weight_codes``)."""
    if name == "ort":
        dtype = ACTIVATION_DTYPES.get(activation_dtype or "uint8")
        if dtype is None:
            raise ValueError(f"activation_dtype must be one of {sorted(ACTIVATION_DTYPES)}, got {activation_dtype!r}")
        return Target("ort", dtype, symmetric_int8_only=False, int4_weights=True, integer_ops=True,
                      vnni=cpu_has_vnni() if vnni is None else vnni)
    if name == "tensorrt":
        if vnni is not None:
            raise ValueError("vnni= applies to target 'ort' (CPU kernels), not 'tensorrt'")
        if activation_dtype not in (None, "int8"):
            raise ValueError(f"target 'tensorrt' takes int8 activations only, got {activation_dtype!r}")
        return Target("tensorrt", torch.int8, symmetric_int8_only=True, int4_weights=False, integer_ops=False)
    raise ValueError(f"target must be one of {TARGETS}, got {name!r}")


# ---------------------------------------------------------------------------------------------- registry

Lowering = Callable[["LoweringContext", fx.Node], fx.Node]
LOWERINGS: dict[Any, Lowering] = {}


def register_lowering(op: Any) -> Callable[[Lowering], Lowering]:
    """Register ``fn(ctx, node) -> replacement node`` as the ONNX lowering of ``op`` (an OpOverload)."""
    def decorate(fn: Lowering) -> Lowering:
        if op in LOWERINGS:
            raise ValueError(f"a lowering for {op} is already registered ({LOWERINGS[op].__name__})")
        LOWERINGS[op] = fn
        return fn
    return decorate


@dataclasses.dataclass
class LoweringState:
    """What lowerings of one graph tell each other and the export: the integer terms a lowered activation
    quantizer hands the linear it feeds, and whether a kernel needs VNNI to be exact."""

    quantized_inputs: dict[fx.Node, tuple["QuantizedInput", ...]] = dataclasses.field(default_factory=dict)
    needs_vnni: bool = False


class LoweringContext:
    """Handed to a lowering: the graph, the node being replaced, the target, and builders.

    New nodes are inserted just before ``node``; constants become buffers of the graph module
    (initializers in ONNX) named after the node.
    """

    def __init__(self, gm: fx.GraphModule, node: fx.Node, target: Target, state: LoweringState | None = None):
        self.gm, self.node, self.target = gm, node, target
        self.state = state if state is not None else LoweringState()
        annotation = meta.get(node).annotation
        self.layer = annotation.name if annotation is not None else node.name

    def args(self) -> list[Any]:
        """The node's arguments, with constants (get_attr nodes) replaced by their tensors."""
        return [fetch_attr(self.gm, a.target).detach() if isinstance(a, fx.Node) and a.op == "get_attr" else a
                for a in self.node.args]

    def input(self, index: int = 0) -> fx.Node:
        return self.node.args[index]

    def constant(self, suffix: str, value: Tensor) -> fx.Node:
        name = f"onnx_{self.node.name}_{suffix}"
        self.gm.register_buffer(name, value.detach().clone().contiguous())
        with self.gm.graph.inserting_before(self.node):
            return self.gm.graph.get_attr(name)

    def call(self, op: Any, *args: Any, **kwargs: Any) -> fx.Node:
        with self.gm.graph.inserting_before(self.node):
            return self.gm.graph.call_function(op, args, kwargs)

    def set_quantized_input(self, node: fx.Node, *terms: "QuantizedInput") -> fx.Node:
        """Record that ``node`` (a lowered activation quantizer's output) is ``sum of terms``; returns it."""
        self.state.quantized_inputs[node] = terms
        return node

    def quantized_input(self, node: fx.Node) -> tuple["QuantizedInput", ...]:
        """The terms recorded for ``node`` (empty when it is not a lowered quantizer's output)."""
        return self.state.quantized_inputs.get(node, ())


# ---------------------------------------------------------------------------------------------- building blocks

def signed_range(bits: int) -> tuple[int, int]:
    return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1


def code_offset(dtype: torch.dtype) -> int:
    """Our codes are signed; uint8 codes are code + 128 (zero point too), exactly the same grid."""
    return 128 if dtype == torch.uint8 else 0


def static_activation(ctx: LoweringContext, x: fx.Node, scale: Tensor, zero_point: Tensor,
                      bits: int) -> tuple[fx.Node, float]:
    """Per-tensor ``Q -> DQ`` of ``x`` with constant (scale, zero point): returns (x_hat, offset).

    The reference is ``x_hat = (clamp(round(x / s) + z, qmin, qmax) - z) s``. Grids narrower than
    the dtype clip x to ``[(qmin - z) s, (qmax - z) s]`` first. For symmetric-only targets the
    returned node is ``x_hat + offset`` with ``offset = z s`` (``x + z s`` is quantized with zero
    point 0); the caller subtracts ``offset`` after the matmul (``add_bias`` folds it into the
    bias). Elsewhere offset is 0.
    """
    s, z = float(scale), int(zero_point)
    qmin, qmax = signed_range(bits)
    offset = 0.0
    if ctx.target.symmetric_int8_only and z != 0:   # round((x + z s) / s) = round(x / s) + z: same codes
        x = ctx.call(aten.add.Tensor, x, z * s)
        z, offset = 0, z * s
    if bits < 8:
        x = ctx.call(aten.clamp.default, x, (qmin - z) * s, (qmax - z) * s)
    dtype = ctx.target.activation_dtype
    scale_node = ctx.constant("a_scale", torch.tensor(s, dtype=torch.float32))
    zp_node = ctx.constant("a_zero_point", torch.tensor(z + code_offset(dtype), dtype=dtype))
    codes = ctx.call(ONNX.quantize_linear.default, x, scale_node, zp_node, 0, 0)
    return ctx.call(ONNX.dequantize_linear.default, codes, scale_node, zp_node, 0, 0, "int8"), offset


def token_activation(ctx: LoweringContext, x: fx.Node, bits: int, features: int,
                     clip: Tensor | None = None) -> tuple[fx.Node, fx.Node, fx.Node]:
    """Dynamic per-token quantization in the graph: (codes, scale, zero point), each row of the last dim
    with its own affine qparams from its min / max (as ``fake_quantize_per_token``), codes in the
    target's activation dtype via a blocked QuantizeLinear (block = the whole row). ``clip`` (RobuQ's
    learned ratio c, a scalar) shrinks the range first: ``[lo, hi] = c [min x, max x]``, then widened to 0."""
    if ctx.target.symmetric_int8_only:
        raise LoweringError("per-token activations need scales computed at run time (affine, from each token's "
                            "min / max); TensorRT's int8 Q/DQ takes build-time constant scales with zero point 0")
    qmin, qmax = signed_range(bits)
    lo, hi = ctx.call(aten.amin.default, x, [-1], True), ctx.call(aten.amax.default, x, [-1], True)
    if clip is not None:
        ratio = ctx.constant("a_clip", clip.float().reshape(()))
        lo, hi = ctx.call(aten.mul.Tensor, lo, ratio), ctx.call(aten.mul.Tensor, hi, ratio)
    lo = ctx.call(aten.clamp.default, lo, None, 0.0)
    hi = ctx.call(aten.clamp.default, hi, 0.0, None)
    scale = ctx.call(aten.clamp.default, ctx.call(aten.div.Tensor, ctx.call(aten.sub.Tensor, hi, lo), qmax - qmin),
                     SCALE_EPS, None)
    zero = ctx.call(aten.clamp.default, ctx.call(aten.round.default, ctx.call(
        aten.rsub.Scalar, ctx.call(aten.div.Tensor, lo, scale), qmin)), qmin, qmax)
    if bits < 8:
        low = ctx.call(aten.mul.Tensor, ctx.call(aten.rsub.Scalar, zero, qmin), scale)
        high = ctx.call(aten.mul.Tensor, ctx.call(aten.rsub.Scalar, zero, qmax), scale)
        x = ctx.call(aten.clamp.Tensor, x, low, high)
    dtype = ctx.target.activation_dtype
    zero_point = ctx.call(aten._to_copy.default, ctx.call(aten.add.Tensor, zero, code_offset(dtype)), dtype=dtype)
    codes = ctx.call(ONNX.quantize_linear.default, x, scale, zero_point, -1, features)
    return codes, scale, zero_point


def fits(t: Tensor, lo: int, hi: int) -> bool:
    return bool(((t >= lo) & (t <= hi)).all())


def symmetric_codes(codes: Tensor, zero_point: Tensor, axis: int) -> Tensor:
    """Weight codes with the zero point subtracted, ``q - z_w`` (exact; fits int8 for up to 7 bits)."""
    shape = [1] * codes.dim()
    if zero_point.dim():
        shape[axis] = -1
    centred = codes.to(torch.int16) - zero_point.to(torch.int16).reshape(shape)
    if not fits(centred, -128, 127):
        raise LoweringError("asymmetric 8-bit weights: q - z_w leaves int8, and this target needs zero point 0")
    return centred.to(torch.int8)


def kernel_weight_codes(ctx: LoweringContext, codes: Tensor, zero_point: Tensor,
                        activation_bits: int) -> tuple[Tensor, Tensor]:
    """Weight codes (out, in) and zero points in the dtype an ONNX Runtime integer kernel multiplies exactly.

    ONNX Runtime's u8 x s8 GEMM (MLAS) accumulates in int32 on CPUs with VNNI. Without VNNI it uses
    ``vpmaddubsw``, which adds pairs of products into a saturating int16 (ONNX Runtime's docs warn of
    it). Where ``u_max (|q_w|_(1) + |q_w|_(2)) > 32767`` for some output row (8-bit weights; the bound
    of ``backends/torch.py``), the codes are stored as uint8 (``q + 128``, zero point ``z + 128``), which
    runs the exact u8 x u8 kernel: 2.2x slower than u8 x s8 on this VNNI CPU (512 x 768 -> 3072).
    """
    if not ctx.target.integer_ops or not activation_bits \
            or pair_sum_bound(codes, 2 ** (activation_bits - 1) - 1) <= INT16_MAX:
        return codes, zero_point.to(torch.int8)
    if ctx.target.vnni:
        ctx.state.needs_vnni = True       # recorded in the file: OrtModel warns on a CPU without
        return codes, zero_point.to(torch.int8)
    return (codes.to(torch.int16) + 128).to(torch.uint8), (zero_point.to(torch.int16) + 128).to(torch.uint8)


def weight_operand(ctx: LoweringContext, codes: Tensor, scale: Tensor, zero_point: Tensor, *,
                   activation_bits: int) -> fx.Node:
    """``DequantizeLinear`` of a linear's weight as the MatMul's right operand ``W^T`` (in, out).

    Per-tensor: scalar scale; per-channel: axis 1 (the output column); per-group of g inputs:
    blocked along axis 0 with block g. With ``int4_weights`` codes that fit [-8, 7] are stored as
    INT4: widened to INT8 by a Cast when an int8 kernel consumes them (quantized activations,
    ``activation_bits > 0``), as INT4 DequantizeLinear otherwise. Symmetric-only targets get zero
    points 0; 8-bit codes may become uint8 (``kernel_weight_codes``).
    """
    grouped = scale.dim() == 2
    if ctx.target.symmetric_int8_only:
        if grouped:
            raise LoweringError("per-group weights: TensorRT's int8 Q/DQ takes per-tensor or per-channel "
                                "weight scales (block quantization is INT4 weight-only)")
        codes, zero_point = symmetric_codes(codes, zero_point, 0), torch.zeros_like(zero_point)
    storage = "int8"
    if ctx.target.int4_weights and fits(codes, *INT4_RANGE) and fits(zero_point, *INT4_RANGE):
        storage = "int4-as-int8" if activation_bits and not grouped else "int4"
    if grouped:
        block = codes.shape[1] // scale.shape[1]
        scale, zero_point, axis = scale.t(), zero_point.t().to(torch.int8), 0
    else:
        codes, zero_point = kernel_weight_codes(ctx, codes, zero_point, activation_bits)
        axis, block = 1, 0
    return ctx.call(ONNX.dequantize_linear.default, ctx.constant("w_codes", codes.t()),
                    ctx.constant("w_scale", scale.float()), ctx.constant("w_zero_point", zero_point),
                    axis, block, storage)


def weight_matrix(codes: Tensor, scale: Tensor, zero_point: Tensor) -> Tensor:
    """The dequantized weight (out, in) in float64, for bias folds."""
    from ditq_compiler.ops import weight_spec_for
    from ditq_compiler.quant import dequantize

    return dequantize(codes, scale, zero_point, weight_spec_for(codes, scale)).double()


def add_bias(ctx: LoweringContext, y: fx.Node, bias: Tensor | None, correction: Tensor | None = None,
             shape: tuple[int, ...] = (-1,)) -> fx.Node:
    """``y + (bias - correction)``, the vector viewed as ``shape``; ``y`` itself when both are None.

    ``correction`` (float64, per output channel) is what a symmetric-only target's activation offset
    adds after the matmul: ``offset * sum_k W_hat[n, k]``.
    """
    if bias is None and correction is None:
        return y
    folded = (bias.double() if bias is not None else 0.0) - (correction if correction is not None else 0.0)
    return ctx.call(aten.add.Tensor, y, ctx.constant("bias", folded.float().reshape(shape)))


@dataclasses.dataclass(frozen=True)
class QuantizedInput:
    """One term of a lowered standalone activation quantizer (``backends/onnx_sites.py``), recorded for the node it
    returns (``LoweringContext.set_quantized_input``, a tuple of terms) for the linear it feeds:
    ``x_hat = sum over terms of (codes - shift) * scale`` (two terms for a two-region quantizer).

    ``codes`` is a DequantizeLinear with constant scale and zero point, so a MatMul reading it (and a
    DequantizeLinear weight) is what ONNX Runtime fuses into ``MatMulIntegerToFloat`` and TensorRT into
    an int8 GEMM. ``shift`` (0, or a node ``z_g``) and ``scale`` (None, or a node ``s_g``), per sample
    of shape (B, 1, .., 1) or constant, do not vary along the reduction, so the linear applies them
    after its matmul: ``y = sum over terms of (codes W^T - shift colsum(W)) * scale + b``.
    """

    codes: fx.Node
    bits: int
    shift: float | fx.Node = 0.0
    scale: fx.Node | None = None


def lower_graph(gm: fx.GraphModule, target: Target) -> fx.GraphModule:
    """A copy of ``gm`` with every registered op lowered; all nodes that cannot be are listed in one error."""
    return lower_graph_with_state(gm, target)[0]


def lower_graph_with_state(gm: fx.GraphModule, target: Target) -> tuple[fx.GraphModule, LoweringState]:
    """``lower_graph``, and what the lowerings recorded (``LoweringState``)."""
    with warnings.catch_warnings():  # torch's own pytree deprecation notice on deepcopy
        warnings.filterwarnings("ignore", message=".*treespec, LeafSpec.*", category=FutureWarning)
        gm = copy.deepcopy(gm)
    problems, state = [], LoweringState()
    for node in list(gm.graph.nodes):
        if node.op == "call_module" and type(gm.get_submodule(node.target)).__module__.startswith("ditq_compiler"):
            problems.append(f"node {node.name}: call of module '{node.target}' (a torch-int8 kernel? export the "
                            "model compiled with backend='torch', the reference)")
            continue
        lowering = LOWERINGS.get(node.target) if node.op == "call_function" else None
        if lowering is None:
            if node.op == "call_function" and _needs_lowering(node.target):
                problems.append(f"node {node.name} ({node.target}): no ONNX lowering is registered")
            continue
        ctx = LoweringContext(gm, node, target, state)
        try:
            replacement = lowering(ctx, node)
        except LoweringError as e:
            problems.append(f"layer '{ctx.layer}' (node {node.name}, {node.target}): {e}")
            continue
        node.replace_all_uses_with(replacement)
        gm.graph.erase_node(node)
    if problems:
        raise OnnxExportError(f"cannot export to target '{target.name}' ({len(problems)} node(s)):\n  "
                              + "\n  ".join(problems))
    gm.graph.eliminate_dead_code()
    delete_unused_attrs(gm)
    gm.graph.lint()
    gm.recompile()
    return gm, state


def _needs_lowering(op: Any) -> bool:
    """Custom ops (anything outside aten / prims and our ONNX mirrors) have no ONNX translation of their own."""
    namespace = getattr(op, "namespace", None)
    return namespace is not None and namespace not in ("aten", "prims", "ditq_onnx")
