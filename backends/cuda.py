"""CUDA backend: quantized linears on Triton int8 kernels or FP8 ``_scaled_mm``, the float parts in bf16.

``lower_cuda(gm)`` rewrites a quantized graph (the output of ``ditq_compiler.compile``, backend
"torch") in place and returns it with the kernel each quantized layer got, keyed by its source
node (``meta.get(node).source_node``, as ``lower_int8`` does).

int8 (``precision="int8"``). A ``ditq::quant_linear`` node is lowered when

* its weights are symmetric (``z_w = 0``), per output channel or per tensor, with codes in
  [-128, 127] (<= 8 bits), and K <= 65536 (the int32 accumulator cannot overflow), and
* its input activation quantizer is static per tensor with <= 8 bits (the op's own ``a_scale``,
  ``a_zero_point``), or a time-grouped uniform ``ditq::quant_act`` with <= 8 bits feeding the
  layer (TQ-DiT: the op then has ``a_bits = 0``); each sample's row of the table is picked by its
  time group, as in the reference.

It becomes ``ditq_cuda::w8a8_linear`` (activation quantized in the kernel's prologue,
``act_quant="prologue"``) or ``w8a8_linear_producer`` (quantized by torch ops that
``torch.compile`` fuses into the kernel producing the input, then ``ditq_cuda::w8a8_linear_codes``;
``act_quant="producer"``, the default), with the math of ``ditq_compiler.kernels.triton_w8a8``:
the result equals the reference's up to fp32 rounding of the epilogue (the codes are the same).
Per-token activations, weight-only layers, asymmetric or per-group weights and two-region input
quantizers keep the reference op, with the reason.

fp8 (``precision="fp8"``). Every ``ditq::quant_linear`` with a quantized input and K, N multiples
of 16 becomes ``fp8_linear`` (``ditq_compiler.kernels.fp8``): the reference's dequantized weight
``W_hat = (q_w - z_w) s_w`` re-encoded in e4m3 with per-channel scales (a second rounding on top
of the integer grid's), activations per token at run time (``fp8_activations="dynamic"``) or
static from the calibrated range ``max(|(qmin - z) s|, |(qmax - z) s|)`` per tensor or per time
group (``"static"``; per-token layers stay dynamic).

Float parts (``float_dtype``, default bf16). The graph's float parameters and buffers are cast to
``float_dtype``, except the quantized layers' codes, scales, zero points, tables and the int8
kernels' fp32 biases (the int8 kernel reads them in fp32, the FP8 one takes a bf16 bias); float
inputs are cast on entry (a timestep input is left as it is: the graph turns it into sinusoids in
fp32, as diffusers does in a bf16 model) and float outputs back to fp32 at the exit, so the lowered
graph is called like the reference. In the graph, casts between float dtypes (diffusers'
``.to(hidden_dtype)``, a no-op in the fp32 export) now cast to ``float_dtype``; casts from integers
(``timesteps.float()``) and explicit ``dtype=`` factories (``arange``) stay fp32, again as in a
diffusers bf16 model; export's dtype assertions on float tensors are dropped. The kernels take
``x`` in bf16 and return bf16 (the int8 epilogue runs in fp32). ``float_dtype=None`` leaves the
float parts as they are (fp32). The nodes' ``meta['val']`` keep the fp32 dtypes of the export.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor, fx

import ditq_compiler.activation_ops  # noqa: F401  (registers the ditq:: activation ops)
import ditq_compiler.ops  # noqa: F401  (registers the ditq:: ops)
from ditq_compiler import meta
from ditq_compiler.backends.registry import register_backend
from ditq_compiler.capture import TIMESTEP_NAMES
from ditq_compiler.kernels import fp8 as fp8_kernels
from ditq_compiler.kernels import triton_w8a8
from ditq_compiler.ops import dequantize_weight
from ditq_compiler.passes.attach_time_groups import BOUNDARIES
from ditq_compiler.pipeline import copy_graph, delete_unused_attrs, fetch_attr, register_constant

PRECISIONS = ("int8", "fp8")
ACT_QUANT = ("producer", "prologue")
FP8_ACTIVATIONS = ("dynamic", "static")

ops = torch.ops
QUANT_LINEAR = ops.ditq.quant_linear.default
REFERENCE_OPS = {ops.ditq.quant_linear.default, ops.ditq.quant_conv2d.default, ops.ditq.quant_act.default,
                 ops.ditq.quant_softmax_mrq.default, ops.ditq.quant_gelu_mrq.default, ops.ditq.hadamard.default}
KERNEL_TARGETS = {ops.ditq_cuda.w8a8_linear.default, ops.ditq_cuda.w8a8_linear_codes.default,
                  triton_w8a8.w8a8_linear_producer, fp8_kernels.fp8_linear}
CAST_TARGETS = {ops.aten.to.dtype, ops.aten._to_copy.default, ops.aten.to.dtype_layout}


@dataclass
class InputQuantizer:
    """The activation quantizer in front of a quantized linear, as 1-D tables (one entry per time group)."""

    x: fx.Node                     # the float input it quantizes
    scale: Tensor | None           # None: per token, at run time
    zero_point: Tensor | None
    group: fx.Node | None          # the time group index (a graph node), None for a static quantizer
    bits: int

    @property
    def kind(self) -> str:
        return "per-token" if self.scale is None else "time-grouped" if self.group is not None else "per-tensor"

    def amax(self) -> Tensor:
        """The largest magnitude on the calibrated grid, per table entry."""
        qmin, qmax = -(2 ** (self.bits - 1)), 2 ** (self.bits - 1) - 1
        s, z = self.scale.float(), self.zero_point.float()
        return torch.maximum(((qmin - z) * s).abs(), ((qmax - z) * s).abs())


def _constant(gm: fx.GraphModule, arg) -> Tensor | None:
    return fetch_attr(gm, arg.target).detach() if isinstance(arg, fx.Node) and arg.op == "get_attr" else arg


def input_quantizer(gm: fx.GraphModule, node: fx.Node) -> InputQuantizer | str:
    """The quantizer of a ``quant_linear`` node's input, or why there is none the kernels can run."""
    x, _, _, _, _, a_scale, a_zp, a_bits, a_per_token = node.args
    if a_per_token:
        return InputQuantizer(x, None, None, None, a_bits)
    if a_bits:
        scale, zero_point = _constant(gm, a_scale), _constant(gm, a_zp)
        return InputQuantizer(x, scale.float().reshape(1), zero_point.float().reshape(1), None, a_bits)
    if not (isinstance(x, fx.Node) and x.op == "call_function" and x.target in REFERENCE_OPS):
        return "weight-only (activations in float)"
    if x.target is not ops.ditq.quant_act.default:
        return f"input quantizer {x.target.name()} (two-region)"
    source, group, scale, zero_point, bits = x.args
    return InputQuantizer(source, _constant(gm, scale).float(), _constant(gm, zero_point).float(), group, bits)


def _int8_weights(gm: fx.GraphModule, node: fx.Node) -> tuple[Tensor, Tensor] | str:
    """(int8 codes (N, K), fp32 per-channel scales (N,)), or why the int8 kernel cannot take them."""
    codes, scale, zero_point = (_constant(gm, a) for a in node.args[1:4])
    if scale.dim() > 1:
        return "per-group weights"
    if bool(zero_point.ne(0).any()):
        return "asymmetric weights"
    if codes.numel() and (int(codes.min()) < -128 or int(codes.max()) > 127):
        return "weight codes beyond 8 bits"
    if codes.shape[1] > triton_w8a8.MAX_K:
        return f"K = {codes.shape[1]} > {triton_w8a8.MAX_K} (int32 accumulator)"
    return codes.to(torch.int8).contiguous(), scale.float().expand(codes.shape[0]).contiguous()


def _layer_name(node: fx.Node) -> str:
    record = meta.get(node)
    return record.annotation.name if record.annotation is not None else record.source_node or node.name


def _int8_node(gm: fx.GraphModule, node: fx.Node, act: InputQuantizer, act_quant: str) -> fx.Node | str:
    if act.scale is None:
        return "per-token activations"
    if act.bits > 8:
        return f"{act.bits}-bit activations"
    weights = _int8_weights(gm, node)
    if isinstance(weights, str):
        return weights
    codes, w_scale = weights
    bias = _constant(gm, node.args[4])
    prefix = f"ditq_cuda_{node.name}"
    constants = [register_constant(gm, f"{prefix}_{name}", value, node) for name, value in (
        ("w_codes", codes), ("w_scale", w_scale), ("w_colsum", codes.int().sum(1, dtype=torch.int32)))]
    constants.append(None if bias is None else register_constant(gm, f"{prefix}_bias", bias.float(), node))
    constants += [register_constant(gm, f"{prefix}_a_scale", act.scale.contiguous(), node),
                  register_constant(gm, f"{prefix}_a_zero_point", act.zero_point.contiguous(), node)]
    target = triton_w8a8.w8a8_linear_producer if act_quant == "producer" else ops.ditq_cuda.w8a8_linear.default
    with gm.graph.inserting_before(node):
        return gm.graph.call_function(target, (act.x, *constants, act.group, act.bits, _layer_name(node)))


def _fp8_node(gm: fx.GraphModule, node: fx.Node, act: InputQuantizer, fp8_activations: str) -> fx.Node | str:
    codes, scale, zero_point = (_constant(gm, a) for a in node.args[1:4])
    n, k = codes.shape
    if n % 16 or k % 16:
        return f"N = {n}, K = {k} not multiples of 16 (_scaled_mm)"
    w8, w_scale = fp8_kernels.quantize_weight(dequantize_weight(codes, scale, zero_point))
    bias = _constant(gm, node.args[4])
    prefix = f"ditq_fp8_{node.name}"
    constants = [register_constant(gm, f"{prefix}_w", w8, node), register_constant(gm, f"{prefix}_w_scale", w_scale,
                                                                                  node)]
    constants.append(None if bias is None else register_constant(gm, f"{prefix}_bias", bias.to(torch.bfloat16), node))
    static = fp8_activations == "static" and act.scale is not None
    a_scale = (register_constant(gm, f"{prefix}_a_scale", fp8_kernels.scale_from_amax(act.amax()), node)
               if static else None)
    with gm.graph.inserting_before(node):
        return gm.graph.call_function(fp8_kernels.fp8_linear, (act.x, *constants, a_scale,
                                                               act.group if static else None, _layer_name(node)))


def lower_cuda(gm: fx.GraphModule, precision: str = "int8", *, act_quant: str = "producer",
               fp8_activations: str = "dynamic",
               float_dtype: Optional[torch.dtype] = torch.bfloat16) -> tuple[fx.GraphModule, dict[str, str]]:
    """Replace eligible ``ditq::quant_linear`` nodes by the CUDA kernels and cast the float parts (module doc).

    Rewrites ``gm`` in place (pass a copy to keep the reference) and returns it with, per quantized
    layer's source node, the kernel it got or ``"reference (<why>)"``.
    """
    for name, value, allowed in (("precision", precision, PRECISIONS), ("act_quant", act_quant, ACT_QUANT),
                                 ("fp8_activations", fp8_activations, FP8_ACTIVATIONS)):
        if value not in allowed:
            raise ValueError(f"lower_cuda: {name} must be one of {allowed}, got {value!r}")
    kernels: dict[str, str] = {}
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target is not QUANT_LINEAR:
            continue
        source = meta.get(node).source_node or node.name
        act = input_quantizer(gm, node)
        if isinstance(act, str):
            kernels[source] = f"reference ({act})"
            continue
        if precision == "int8":
            new = _int8_node(gm, node, act, act_quant)
            label = f"triton w8a8 ({act_quant} quant, {act.kind})"
        else:
            new = _fp8_node(gm, node, act, fp8_activations)
            static = fp8_activations == "static" and act.scale is not None
            label = f"fp8 _scaled_mm ({act.kind} static)" if static else "fp8 _scaled_mm (per-token dynamic)"
        if isinstance(new, str):
            kernels[source] = f"reference ({new})"
            continue
        new.meta.update(node.meta)
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)
        kernels[source] = label
    gm.graph.eliminate_dead_code()
    delete_unused_attrs(gm)
    if float_dtype is not None and float_dtype != torch.float32:
        cast_float_parts(gm, float_dtype)
    gm.graph.lint()
    gm.recompile()
    return gm, kernels


# ---- float parts -------------------------------------------------------------------------------

def _kept_fp32(gm: fx.GraphModule) -> set[str]:
    """get_attr targets that keep their dtype: the quantized layers' constants and the time-group boundaries."""
    keep = {BOUNDARIES}
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.target not in REFERENCE_OPS | KERNEL_TARGETS:
            continue
        for index, arg in enumerate(node.args[1:], start=1):
            follows_x = node.target in (QUANT_LINEAR, ops.ditq.quant_conv2d.default) and index == 4   # bias
            if isinstance(arg, fx.Node) and arg.op == "get_attr" and not follows_x:
                keep.add(arg.target)
    return keep


def _replace_attr(gm: fx.GraphModule, target: str, value: Tensor) -> None:
    owner_path, _, attr = target.rpartition(".")
    owner = gm.get_submodule(owner_path) if owner_path else gm
    if attr in owner._parameters:
        owner._parameters[attr] = torch.nn.Parameter(value, requires_grad=False)
    elif attr in owner._buffers:
        owner._buffers[attr] = value
    else:
        setattr(owner, attr, value)


def _cast_constants(gm: fx.GraphModule, dtype: torch.dtype) -> None:
    keep = _kept_fp32(gm)
    cast: dict[int, Tensor] = {}      # one copy per tensor, so tied parameters stay tied
    for target in sorted({n.target for n in gm.graph.nodes if n.op == "get_attr"} - keep):
        value = fetch_attr(gm, target)
        if isinstance(value, Tensor) and value.is_floating_point() and value.dtype != dtype:
            if id(value) not in cast:
                cast[id(value)] = value.detach().to(dtype)
            _replace_attr(gm, target, cast[id(value)])


def _is_float(node) -> bool:
    val = node.meta.get("val") if isinstance(node, fx.Node) else None
    return isinstance(val, Tensor) and val.is_floating_point()


def _cast_node(graph: fx.Graph, x: fx.Node, dtype: torch.dtype) -> fx.Node:
    cast = graph.call_function(ops.aten._to_copy.default, (x,), {"dtype": dtype})
    cast.meta["val"] = x.meta.get("val")
    return cast


def cast_float_parts(gm: fx.GraphModule, dtype: torch.dtype) -> None:
    """Run the float parts of ``gm`` in ``dtype``: constants, inputs, float-to-float casts (module doc)."""
    _cast_constants(gm, dtype)
    graph = gm.graph
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    for node in list(graph.nodes):
        if node.op != "call_function":
            continue
        if node.target is ops.aten._assert_tensor_metadata.default and _float_dtype(node.kwargs.get("dtype")):
            graph.erase_node(node)
        elif node.target in CAST_TARGETS and _is_float(node.args[0]):
            if node.target is ops.aten.to.dtype and node.args[1] == torch.float32:
                node.args = (node.args[0], dtype, *node.args[2:])
            elif node.kwargs.get("dtype") == torch.float32:
                node.update_kwarg("dtype", dtype)
    if placeholders:
        with graph.inserting_after(placeholders[-1]):
            for ph in reversed(placeholders):
                if _is_float(ph) and ph.meta["val"].dtype == torch.float32 and ph.name not in TIMESTEP_NAMES:
                    cast = _cast_node(graph, ph, dtype)
                    ph.replace_all_uses_with(cast, delete_user_cb=lambda user, c=cast: user is not c)
    output = next(n for n in graph.nodes if n.op == "output")
    with graph.inserting_before(output):
        casts = {}
        for value in output.all_input_nodes:
            if _is_float(value) and value.meta["val"].dtype == torch.float32:
                casts[value] = _cast_node(graph, value, torch.float32)
    output.args = fx.node.map_arg(output.args, lambda a: casts.get(a, a))


def _float_dtype(dtype) -> bool:
    return isinstance(dtype, torch.dtype) and dtype.is_floating_point


@register_backend("cuda", "Triton int8 W8A8 GEMMs for eligible linears on a CUDA GPU, the float parts in bf16",
                  device="cuda")
def lower_cuda_int8(gm: fx.GraphModule) -> tuple[fx.GraphModule, dict[str, str]]:
    return lower_cuda(copy_graph(gm), "int8")


@register_backend("cuda-fp8", "FP8 (e4m3) linears through torch._scaled_mm on a CUDA GPU, the float parts in bf16",
                  device="cuda")
def lower_cuda_fp8(gm: fx.GraphModule) -> tuple[fx.GraphModule, dict[str, str]]:
    return lower_cuda(copy_graph(gm), "fp8")


__all__ = ["ACT_QUANT", "FP8_ACTIVATIONS", "PRECISIONS", "InputQuantizer", "cast_float_parts", "input_quantizer",
           "lower_cuda"]
