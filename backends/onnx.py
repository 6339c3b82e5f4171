"""ONNX backend: lower a compiled (fake-quant) graph to opset-21 QuantizeLinear / DequantizeLinear.

    compiled.export_onnx("dit.onnx", target="ort")        # ONNX Runtime on x86: integer kernels
    compiled.export_onnx("dit.onnx", target="tensorrt")   # symmetric int8 Q/DQ for a strongly typed engine
    export_float(model, "dit-fp32.onnx")                   # the same route without quantization

Route
-----
1. **Lower in FX.** A copy of ``compiled.reference_graph_module`` (the fake-quant graph) is rewritten: every
   quantized op (``ditq::*``) is replaced, by the lowering registered for it, with plain aten ops and the
   ONNX-mirror ops of ``ditq_compiler.backends.onnx_ops`` (``quantize_linear``, ``dequantize_linear``,
   ``matmul``, ``matmul_integer``, ``conv``, ``conv_integer``). Those run in torch with ONNX's
   semantics, so the lowered graph is itself a runnable check against the fake-quant reference.
   Constants (transposed integer codes, unsigned zero points, folded biases) are prepared here in
   eager torch, where their values are known; nothing is left to constant folding.
2. **Export** with ``torch.onnx.export(..., dynamo=True, opset_version=21,
   custom_translation_table=onnx_ops.TRANSLATIONS)``: each mirror op becomes one ONNX node; the batch
   axis of every input is dynamic. (Lowering inside translation functions instead was tried and
   dropped: they see symbolic values only, so every constant transformation would have to be
   emitted as ONNX ops and folded later, and the exporter's optimiser folds small tensors only.)
3. **Post-process** the ``onnx_ir`` model: integer codes tagged ``int4`` become INT4 initializers
   (with a Cast to INT8 where the int8 kernel should see them), IR version 10 (ONNX Runtime 1.32 reads
   <= 10), and metadata for ``backends/ort.py`` (call signature, output pytree, layer -> node map).
4. **Check and write**: the file is written to a temporary name next to ``path`` (external data
   when the weights exceed 1.8 GB, or when asked), checked with
   ``onnx.checker.check_model(path, full_check=True)`` (a failure is an error), the ``tensorrt``
   flavour is checked to hold only int8 Q/DQ with zero points 0, then renamed into place.

Targets (measured on this machine's AMD EPYC with AVX512-VNNI, ONNX Runtime 1.32; 512 x 768 -> 3072)
--------------------------------------------------------------------------------------------------
``ort``  Static per-tensor activations as ``Q(uint8) -> DQ -> MatMul <- DQ(int8 weight, per column)``:
         ONNX Runtime fuses this into ``MatMulIntegerToFloat`` (3.4x faster than fp32 on one thread).
         int8 activations fused in that lone GEMM, but in DiT-B/2 49 of 85 layers stayed float
         MatMuls (1.42x faster than fp32 against 2.76x with uint8, ``bench/speed.py``), and
         ``ConvInteger`` with int8 weights ran 4.5x slower than with uint8, so activations are uint8
         (code + 128, zero point z + 128: the same grid). 2-4 bit weight codes are stored as INT4
         initializers behind a Cast to INT8, which ONNX Runtime folds at load time, so W4A8 files
         are half the size of W8A8 ones and run the same int8 kernel (``DQ(INT4) -> MatMul`` is not
         fused: 4x slower). Convs become ``ConvInteger`` (uint8 x uint8; weights recentred to a
         scalar zero point, since ONNX Runtime takes no per-channel one) followed by the float
         rescale; a QDQ Conv with no quantized output runs in float. Per-token activations are
         quantized in the graph (min/max per row, blocked QuantizeLinear) and multiplied by
         ``MatMulInteger``, the zero points corrected with the weights' column sums. On CPUs without
         VNNI, 8-bit weights that could overflow ONNX Runtime's int16 pair sums are stored as uint8
         (``kernel_weight_codes``).
``tensorrt``  Symmetric int8 only, zero points 0, Q/DQ on the inputs of MatMul/Conv. An affine
         activation quantizer with zero point z is exactly ``x + z s`` quantized symmetrically and
         ``- z s W 1`` folded into the bias (for a padded conv the zero padding is applied first);
         asymmetric weights of at most 7 bits are recentred (``q - z_w`` fits int8). Per-token
         activations (run-time scales) and per-group weights have no int8 TensorRT form: an error.

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
integer codes through ``QuantizedInput``.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import json
import logging
import os
import shutil
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import onnx
import torch
from torch import Tensor, fx

from ditq_compiler.backends import onnx_binary, onnx_ops, onnx_sites  # noqa: F401  (register the lowerings)
from ditq_compiler.backends.onnx_lowering import (INT4_RANGE, LOWERINGS, ONNX, TARGETS, LoweringContext,
                                                  LoweringError, OnnxExportError, QuantizedInput, Target, add_bias,
                                                  fits, kernel_weight_codes, lower_graph, lower_graph_with_state,
                                                  make_target, register_lowering, signed_range, static_activation,
                                                  symmetric_codes, token_activation, weight_matrix, weight_operand)
from ditq_compiler.logs import quiet_logger
from ditq_compiler.capture import CapturedModel, bind_inputs, capture
from ditq_compiler.trajectory import StateInput, state_inputs
from ditq_compiler.pipeline import copy_graph

OPSET = 21
IR_VERSION = 10
EXTERNAL_DATA_THRESHOLD = int(1.8 * 2**30)   # protobuf's limit is 2 GiB for the whole file
aten = torch.ops.aten


# ---------------------------------------------------------------------------------------------- lowerings

@register_lowering(torch.ops.ditq.quant_linear.default)
def lower_quant_linear(ctx: LoweringContext, node: fx.Node) -> fx.Node:
    """``ditq::quant_linear`` -> Q/DQ + MatMul (static / no activations), or per-token MatMulInteger.

    With ``a_bits = 0`` behind a standalone activation quantizer (TQ-DiT's sites), the MatMul reads that
    quantizer's codes (``QuantizedInput``) and applies its per-sample shift and scale after the product;
    a two-region quantizer gives two integer MatMuls whose outputs are added."""
    _, w_codes, w_scale, w_zp, bias, a_scale, a_zp, a_bits, a_per_token = ctx.args()
    x = ctx.input(0)
    if a_bits and a_per_token:
        return _lower_token_linear(ctx, x, w_codes, w_scale, w_zp, bias, a_bits, a_scale)
    terms = ctx.quantized_input(x) if not a_bits and w_scale.dim() < 2 else ()
    input_bits = a_bits
    if len(terms) == 1 and terms[0].scale is None and terms[0].shift == 0.0:
        x, input_bits, terms = terms[0].codes, terms[0].bits, ()     # a constant Q/DQ, like the linear's own
    # ONNX Runtime fuses a 2-D MatMul + Add into a float Gemm before its Q/DQ fusions run, which then
    # leaves Q/DQ -> Gemm in float (the adaLN modulation linears, on (batch, dim)): a unit axis keeps
    # the MatMul 3-D, and MatMulIntegerToFloat
    unit_axis = bool(input_bits or terms) and ctx.target.integer_ops and ctx.node.meta["val"].dim() == 2
    if terms:
        return _lower_quantized_input_linear(ctx, terms, w_codes, w_scale, w_zp, bias, unit_axis)
    if unit_axis:
        x = ctx.call(aten.unsqueeze.default, x, 1)
    offset = 0.0
    if a_bits:
        x, offset = static_activation(ctx, x, a_scale, a_zp, a_bits)
    weight = weight_operand(ctx, w_codes, w_scale, w_zp, activation_bits=input_bits)
    y = ctx.call(ONNX.matmul.default, x, weight, ctx.layer)
    correction = offset * weight_matrix(w_codes, w_scale, w_zp).sum(1) if offset else None
    y = add_bias(ctx, y, bias, correction)
    return ctx.call(aten.squeeze.dim, y, 1) if unit_axis else y


def _lower_quantized_input_linear(ctx: LoweringContext, terms: tuple[QuantizedInput, ...], w_codes: Tensor,
                                  w_scale: Tensor, w_zp: Tensor, bias: Tensor | None, unit_axis: bool) -> fx.Node:
    """``y = sum_t (MatMul(codes_t, W^T) - shift_t colsum(W)) * scale_t + b`` (see ``QuantizedInput``)."""
    weight = weight_operand(ctx, w_codes, w_scale, w_zp, activation_bits=max(t.bits for t in terms))
    column_sums = y = None
    for term in terms:
        codes = ctx.call(aten.unsqueeze.default, term.codes, 1) if unit_axis else term.codes
        product = ctx.call(ONNX.matmul.default, codes, weight, ctx.layer)
        if unit_axis:
            product = ctx.call(aten.squeeze.dim, product, 1)
        if isinstance(term.shift, fx.Node) or term.shift != 0.0:
            if column_sums is None:
                column_sums = ctx.constant("w_column_sums", weight_matrix(w_codes, w_scale, w_zp).sum(1).float())
            product = ctx.call(aten.sub.Tensor, product, ctx.call(aten.mul.Tensor, term.shift, column_sums))
        if term.scale is not None:
            product = ctx.call(aten.mul.Tensor, product, term.scale)
        y = product if y is None else ctx.call(aten.add.Tensor, y, product)
    return add_bias(ctx, y, bias)


def _lower_token_linear(ctx: LoweringContext, x: fx.Node, w_codes: Tensor, w_scale: Tensor, w_zp: Tensor,
                        bias: Tensor | None, bits: int, clip: Tensor | None = None) -> fx.Node:
    """Per-token activations: ``acc = MatMulInteger(q_x, q_w - z_w)``, then in float
    ``y = (acc - z_x colsum(q_w - z_w)) s_x s_w + b`` (z_x, s_x per token; s_w per column)."""
    codes, scale, zero_point = token_activation(ctx, x, bits, w_codes.shape[1], clip)
    if w_scale.dim() == 2:   # per-group weights: no single integer GEMM; run Q/DQ and a float MatMul
        x_hat = ctx.call(ONNX.dequantize_linear.default, codes, scale, zero_point, -1, w_codes.shape[1], "int8")
        y = ctx.call(ONNX.matmul.default, x_hat, weight_operand(ctx, w_codes, w_scale, w_zp, activation_bits=0),
                     ctx.layer)
        return add_bias(ctx, y, bias)
    kernel_codes, kernel_zero = kernel_weight_codes(ctx, w_codes, w_zp, bits)
    acc = ctx.call(ONNX.matmul_integer.default, codes, ctx.constant("w_codes", kernel_codes.t()),
                   ctx.constant("w_zero_point", kernel_zero), ctx.layer)
    column_sums = (w_codes.double() - w_zp.double().reshape(-1, 1)).sum(1)
    zero = ctx.call(aten._to_copy.default, zero_point, dtype=torch.float32)
    shifted = ctx.call(aten.sub.Tensor, ctx.call(aten._to_copy.default, acc, dtype=torch.float32),
                       ctx.call(aten.mul.Tensor, zero, ctx.constant("w_column_sums", column_sums.float())))
    scales = ctx.call(aten.mul.Tensor, scale, ctx.constant("w_scale", w_scale.float()))
    return add_bias(ctx, ctx.call(aten.mul.Tensor, shifted, scales), bias)


@register_lowering(torch.ops.ditq.quant_conv2d.default)
def lower_quant_conv2d(ctx: LoweringContext, node: fx.Node) -> fx.Node:
    """``ditq::quant_conv2d`` -> ConvInteger + rescale (ort, uint8 activations), or Q/DQ + Conv."""
    (_, w_codes, w_scale, w_zp, bias, a_scale, a_zp, a_bits, _, stride, padding, dilation, groups) = ctx.args()
    if w_scale.dim() > 1:
        raise LoweringError("per-group conv weights have no ONNX lowering")
    x, padding, channels = ctx.input(0), list(padding), (1, -1, 1, 1)
    if a_bits and ctx.target.integer_ops and ctx.target.activation_dtype == torch.uint8:
        centred = _try(lambda: symmetric_codes(w_codes, w_zp, 0))
        if centred is not None:
            acc, rescale = _conv_integer(ctx, x, centred, w_scale, a_scale, a_zp, a_bits,
                                         [list(stride), padding, list(dilation), groups])
            y = ctx.call(aten.mul.Tensor, ctx.call(aten._to_copy.default, acc, dtype=torch.float32),
                         ctx.constant("rescale", rescale.float().reshape(channels)))
            return add_bias(ctx, y, bias, shape=channels)
    offset = 0.0
    if a_bits:
        if ctx.target.symmetric_int8_only and int(a_zp) != 0 and any(padding):
            # the zero padding must pad x, not x + z s: pad first, then convolve unpadded
            x = ctx.call(aten.constant_pad_nd.default, x, [padding[1], padding[1], padding[0], padding[0]], 0.0)
            padding = [0, 0]
        x, offset = static_activation(ctx, x, a_scale, a_zp, a_bits)
    codes, zero_point = w_codes, w_zp
    if ctx.target.symmetric_int8_only:
        codes, zero_point = symmetric_codes(w_codes, w_zp, 0), torch.zeros_like(w_zp)
    weight = ctx.call(ONNX.dequantize_linear.default, ctx.constant("w_codes", codes),
                      ctx.constant("w_scale", w_scale.float()), ctx.constant("w_zero_point", zero_point.to(torch.int8)),
                      0, 0, "int8")
    y = ctx.call(ONNX.conv.default, x, weight, list(stride), padding, list(dilation), groups, ctx.layer)
    correction = offset * weight_matrix(w_codes, w_scale, w_zp).flatten(1).sum(1) if offset else None
    return add_bias(ctx, y, bias, correction, shape=channels)


def _conv_integer(ctx: LoweringContext, x: fx.Node, centred: Tensor, w_scale: Tensor, a_scale: Tensor,
                  a_zp: Tensor, bits: int, conv_args: list) -> tuple[fx.Node, Tensor]:
    """``acc = ConvInteger(q_x + 128, q_w + 128; z_x + 128, 128)`` and its rescale ``s_x s_w`` per channel."""
    s, z = float(a_scale), int(a_zp)
    qmin, qmax = signed_range(bits)
    if bits < 8:
        x = ctx.call(aten.clamp.default, x, (qmin - z) * s, (qmax - z) * s)
    x_zero = ctx.constant("a_zero_point", torch.tensor(z + 128, dtype=torch.uint8))
    codes = ctx.call(ONNX.quantize_linear.default, x, ctx.constant("a_scale", torch.tensor(s)), x_zero, 0, 0)
    weight = ctx.constant("w_codes", (centred.to(torch.int16) + 128).to(torch.uint8))
    acc = ctx.call(ONNX.conv_integer.default, codes, weight, x_zero,
                   ctx.constant("w_zero_point", torch.tensor(128, dtype=torch.uint8)), *conv_args, ctx.layer)
    return acc, s * w_scale.double().expand(centred.shape[0])


def _try(fn: Callable[[], Any]) -> Any:
    try:
        return fn()
    except LoweringError:
        return None


# ---------------------------------------------------------------------------------------------- export

def export_compiled(compiled: Any, path: str | os.PathLike, target: str = "ort", *,
                    activation_dtype: str | None = None, vnni: bool | None = None,
                    external_data: bool | None = None) -> Path:
    """Lower ``compiled`` (a ``CompiledModel``) for ``target`` and write it to ``path``; see the module doc."""
    return export_graph(compiled.reference_graph_module, compiled.captured, path, target,
                        activation_dtype=activation_dtype, vnni=vnni, external_data=external_data,
                        metadata={"ditq.recipe": compiled.recipe.name})


def export_float(model: torch.nn.Module, path: str | os.PathLike, *, example_inputs: Any = None,
                 external_data: bool | None = None) -> Path:
    """Export ``model`` unquantized through the same route (capture, dynamo export, checks)."""
    captured = capture(model, example_inputs)
    return export_graph(captured.graph_module, captured, path, None, external_data=external_data)


def export_graph(gm: fx.GraphModule, captured: CapturedModel, path: str | os.PathLike, target: str | None, *,
                 activation_dtype: str | None = None, vnni: bool | None = None, external_data: bool | None = None,
                 metadata: dict[str, str] | None = None) -> Path:
    """Lower ``gm`` for ``target`` (None: export as it is, in float), export, post-process, check, write."""
    import onnx_ir as ir

    resolved = make_target(target, activation_dtype, vnni) if target is not None else None
    needs_vnni = False
    if resolved is not None:
        gm, lowered = lower_graph_with_state(gm, resolved)
        needs_vnni = lowered.needs_vnni
    gm = _without_noop_squeezes(gm if resolved is not None else copy_graph(gm))
    inputs, dynamic = _example_inputs(gm)
    # torch.onnx logs a warning per torchvision op it cannot register when torchvision is absent (nms,
    # roi_align, ...): noise for a denoiser, which uses none of them
    with warnings.catch_warnings(), quiet_logger("torch.onnx._internal.exporter._registration", logging.ERROR):
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", message=".*(training mode|axis name).*")
        program = torch.onnx.export(gm, (), kwargs=inputs, dynamo=True, opset_version=OPSET,
                                    custom_translation_table=onnx_ops.TRANSLATIONS, dynamic_shapes=dynamic,
                                    verbose=False, optimize=True)
    model: ir.Model = program.model
    store_int4_codes(model)
    for i, value in enumerate(model.graph.outputs):
        value.name = f"output_{i}"
    model.ir_version = IR_VERSION
    model.metadata_props.update({
        "ditq.target": resolved.name if resolved else "float",
        "ditq.activation_dtype": str(resolved.activation_dtype).removeprefix("torch.") if resolved else "",
        "ditq.needs_vnni": str(needs_vnni).lower(),
        "ditq.parameters": json.dumps(list(captured.signature.parameters)),
        "ditq.inputs": json.dumps([name for name, value in inputs.items() if _has_tensor(value)]),
        "ditq.constants": json.dumps({name: value for name, value in inputs.items() if not _has_tensor(value)},
                                     default=repr, sort_keys=True),
        "ditq.timestep": captured.timestep_input or "",
        "ditq.sample": captured.sample_input,
        "ditq.output": torch.utils._pytree.treespec_dumps(gm._out_spec),
        "ditq.layers": json.dumps(layer_nodes(model)),
        "ditq.states": json.dumps([dataclasses.asdict(s) for s in state_inputs(gm)]),
        **(metadata or {}),
    })
    return write_checked(model, path, external_data, tensorrt=bool(resolved and resolved.symmetric_int8_only))


def _example_inputs(gm: fx.GraphModule) -> tuple[dict[str, Any], dict[str, Any]]:
    """Concrete inputs from the placeholders' fake values (symbolic dims -> 2; integers -> 0; a constant as
    captured), as the keyword arguments of the graph's call, and their dynamic shapes: ``batch`` on dim 0 of
    the inputs whose dim 0 was captured as the batch (a symbol), nothing on the others (Flux's ``img_ids``)."""
    generator = torch.Generator().manual_seed(0)
    batch = torch.export.Dim("batch")
    leaves, dims, names = [], [], []
    for node in gm.graph.nodes:
        if node.op != "placeholder":
            continue
        val = node.meta.get("val")
        names.append(node.name)
        if not isinstance(val, Tensor):
            leaves.append(val)
            dims.append(None)
            continue
        shape = [d if isinstance(d, int) else 2 for d in val.shape]
        leaves.append(torch.randn(shape, generator=generator, dtype=val.dtype) if val.is_floating_point()
                      else torch.zeros(shape, dtype=val.dtype))
        dims.append({0: batch} if val.dim() and not isinstance(val.shape[0], int) else None)
    spec = getattr(getattr(gm.graph._codegen, "pytree_info", None), "in_spec", None)
    if spec is None:                       # a flat graph: one keyword per placeholder
        return dict(zip(names, leaves, strict=True)), dict(zip(names, dims, strict=True))
    (args, inputs), (_, dynamic) = (torch.utils._pytree.tree_unflatten(leaves, spec),
                                    torch.utils._pytree.tree_unflatten(dims, spec))
    if args:
        raise OnnxExportError(f"the graph takes {len(args)} positional inputs; captured graphs take keywords only")
    return inputs, dynamic


def _without_noop_squeezes(gm: fx.GraphModule) -> fx.GraphModule:
    """``x.squeeze(d)`` where dim ``d`` is statically not 1 is a no-op in torch, but torch.onnx writes it as a
    Squeeze that the checker refuses (PixArt's ``hidden_states.squeeze(1)`` on (B, tokens, C)): such nodes go."""
    changed = False
    for node in list(gm.graph.nodes):
        if node.op == "call_function" and node.target is torch.ops.aten.squeeze.dim:
            source, dim = node.args[0], node.args[1]
            val = source.meta.get("val") if isinstance(source, fx.Node) else None
            if isinstance(val, Tensor) and val.dim() and isinstance(val.shape[dim], int) and val.shape[dim] != 1:
                node.replace_all_uses_with(source)
                gm.graph.erase_node(node)
                changed = True
    if changed:
        gm.recompile()
    return gm


def _has_tensor(value: Any) -> bool:
    return any(isinstance(leaf, Tensor) for leaf in torch.utils._pytree.tree_leaves(value))


def store_int4_codes(model: Any) -> None:
    """Replace the integer input of every DequantizeLinear tagged ``ditq.storage`` by an INT4 initializer.

    ``int4``: the DequantizeLinear reads INT4 codes (and an INT4 zero point). ``int4-as-int8``: a Cast
    widens the INT4 initializer to INT8 in front of it, which ONNX Runtime folds at load time.
    """
    import ml_dtypes
    import onnx_ir as ir

    graph = model.graph
    for node in list(graph):
        storage = node.metadata_props.get("ditq.storage")
        if storage is None:
            continue
        wanted = [0, 2] if storage == "int4" else [0]
        for index in wanted:
            old = node.inputs[index]
            if old is None or old.const_value is None:
                raise OnnxExportError(f"{node.name}: input {index} of a DequantizeLinear tagged {storage} "
                                      "is not an initializer")
            codes = old.const_value.numpy()
            if not fits(torch.from_numpy(codes.astype("int16")), *INT4_RANGE):
                raise OnnxExportError(f"{node.name}: codes tagged {storage} do not fit INT4")
            new = ir.Value(name=f"{old.name}_int4", type=ir.TensorType(ir.DataType.INT4), shape=old.shape,
                           const_value=ir.Tensor(codes.astype(ml_dtypes.int4), name=f"{old.name}_int4"))
            graph.register_initializer(new)
            if storage == "int4-as-int8":
                cast = ir.node("Cast", inputs=[new], attributes={"to": ir.DataType.INT8}, name=f"{node.name}_widen")
                cast.outputs[0].dtype, cast.outputs[0].shape = ir.DataType.INT8, old.shape
                graph.insert_before(node, cast)
                new = cast.outputs[0]
            node.replace_input_with(index, new)
            if not old.uses() and old.name in graph.initializers:
                del graph.initializers[old.name]


def layer_nodes(model: Any) -> dict[str, dict[str, str]]:
    """Quantized layer -> {"node": ONNX node name, "op": op type} of the node doing its multiply."""
    layers: dict[str, dict[str, str]] = {}
    for node in model.graph:
        layer = node.metadata_props.get("ditq.layer")
        if layer is not None:
            layers[layer] = {"node": node.name, "op": node.op_type}
    return layers


def check_tensorrt_qdq(model: onnx.ModelProto) -> list[str]:
    """Every Q/DQ int8 with an explicit all-zero zero point (the ``tensorrt`` flavour); the violations."""
    from onnx import numpy_helper

    initializers = {t.name: t for t in model.graph.initializer}
    problems = []
    for node in model.graph.node:
        if node.op_type not in ("QuantizeLinear", "DequantizeLinear"):
            continue
        zero = initializers.get(node.input[2]) if len(node.input) > 2 and node.input[2] else None
        if zero is None:
            problems.append(f"{node.name}: no constant zero point (the default is uint8)")
        elif zero.data_type != onnx.TensorProto.INT8 or numpy_helper.to_array(zero).any():
            problems.append(f"{node.name}: zero point {onnx.TensorProto.DataType.Name(zero.data_type)} "
                            f"{numpy_helper.to_array(zero).ravel()[:4].tolist()}...")
        if node.op_type == "DequantizeLinear" and node.input[0] in initializers \
                and initializers[node.input[0]].data_type != onnx.TensorProto.INT8:
            problems.append(f"{node.name}: weight codes are not int8")
    return problems


def write_checked(model: Any, path: str | os.PathLike, external_data: bool | None, tensorrt: bool = False) -> Path:
    """Write ``model`` atomically: save to a temporary folder beside ``path``, run the full ONNX checker
    (and the TensorRT Q/DQ check), then rename into place (the external data first, the model last)."""
    import onnx_ir as ir

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    weights = sum(v.const_value.nbytes for v in model.graph.initializers.values() if v.const_value is not None)
    external = weights > EXTERNAL_DATA_THRESHOLD if external_data is None else external_data
    data_name = f"{path.name}.data"
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}."))
    try:
        ir.save(model, tmp / path.name, external_data=data_name if external else None)
        try:
            onnx.checker.check_model(str(tmp / path.name), full_check=True)
        except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as e:
            raise OnnxExportError(f"the exported model fails the ONNX checker: {e}") from e
        if tensorrt:
            problems = check_tensorrt_qdq(onnx.load(str(tmp / path.name), load_external_data=False))
            if problems:
                raise OnnxExportError("tensorrt flavour: Q/DQ that are not symmetric int8 with zero point 0:\n  "
                                      + "\n  ".join(problems))
        if external:
            os.replace(tmp / data_name, path.parent / data_name)
        os.replace(tmp / path.name, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def file_size(path: str | os.PathLike) -> int:
    """Bytes of an ONNX model together with its external data file, if any."""
    path = Path(path)
    data = path.parent / f"{path.name}.data"
    return path.stat().st_size + (data.stat().st_size if data.exists() else 0)


# ---------------------------------------------------------------------------------------------- calling an export

class ExportedSignature:
    """The original model's call signature, read back from an export's metadata (for ORT and TensorRT).

    The export records the forward parameters in order, the graph inputs, the timestep input (a
    Python number becomes a tensor of the batch size, as in ``capture``) and the output pytree (a
    diffusers output, a tuple, a tensor). ``return_dict=False`` gives a tuple, as diffusers does.
    Parameters that are not graph inputs must be left at None.
    """

    def __init__(self, parameters: list[str], inputs: list[str], timestep: str | None, out_spec: Any, name: str,
                 states: list[StateInput] | None = None, constants: dict[str, Any] | None = None):
        self.signature = inspect.Signature([inspect.Parameter(p, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=None)
                                            for p in parameters])
        self.states = list(states or [])          # BiDM+'s TES: inputs the caller's trajectory fills
        state_names = {s.name for s in self.states}
        self.inputs = tuple(i for i in inputs if i not in state_names)
        self.timestep, self.name = timestep, name
        self.constants = dict(constants or {})    # non-tensor arguments as captured (JSON, reprs for the rest)
        self.out_spec = out_spec.children()[0] if self.states and out_spec is not None else out_spec

    @classmethod
    def from_metadata(cls, meta: dict[str, str], name: str) -> ExportedSignature:
        if "ditq.inputs" not in meta:
            raise ValueError(f"{name} was not written by ditq_compiler's ONNX export (no ditq.* metadata)")
        states = [StateInput(s["name"], s["index"], tuple(s["shape"]))
                  for s in json.loads(meta.get("ditq.states", "[]"))]
        return cls(json.loads(meta["ditq.parameters"]), json.loads(meta["ditq.inputs"]),
                   meta.get("ditq.timestep") or None, _load_treespec(meta["ditq.output"]), name, states,
                   json.loads(meta.get("ditq.constants", "{}")))

    def bind(self, args: tuple, kwargs: dict) -> tuple[dict[str, Any], bool]:
        """(graph input name -> value, return_dict) for a call of the original model."""
        kwargs = dict(kwargs)
        return_dict = kwargs.pop("return_dict", True) is not False
        bound = bind_inputs(self.signature, args, kwargs, self.timestep, model_class=self.name)
        bound.pop("return_dict", None)
        extra = [name for name, value in bound.items() if name not in self.inputs and value is not None
                 and (_has_tensor(value) or json.loads(json.dumps(value, default=repr)) != self.constants.get(name))]
        if extra:
            raise TypeError(f"{self.name}: {extra} are not inputs of the exported graph {list(self.inputs)} (its "
                            f"other arguments keep their captured values {self.constants})")
        missing = [name for name in self.inputs if bound.get(name) is None]
        if missing:
            raise TypeError(f"{self.name}: missing input(s) {missing}")
        return {name: bound[name] for name in self.inputs}, return_dict

    def structure(self, outputs: list[Tensor], return_dict: bool = True) -> Any:
        """The outputs in the original model's output structure (a tuple when return_dict is False)."""
        if not return_dict:
            return tuple(outputs)
        if self.out_spec is None:
            return outputs[0] if len(outputs) == 1 else tuple(outputs)
        return torch.utils._pytree.tree_unflatten(outputs, self.out_spec)


def _load_treespec(text: str) -> Any:
    """The output pytree; None when its node type is unknown here (outputs then come back as a tuple).

    A diffusers output class registers itself with pytree when its module is imported, so that module
    is imported (diffusers' own modules only) before giving up.
    """
    pytree = torch.utils._pytree
    try:
        return pytree.treespec_loads(text)
    except (KeyError, NotImplementedError, ValueError):
        pass
    for module in {t.rsplit(".", 1)[0] for t in _type_names(json.loads(text)[1])}:
        if module.startswith("diffusers."):
            importlib.import_module(module)
    try:
        return pytree.treespec_loads(text)
    except (KeyError, NotImplementedError, ValueError):
        return None


def _type_names(spec: dict) -> list[str]:
    names = [spec["type"]] if spec.get("type") and "." in spec["type"] else []
    for child in spec.get("children_spec", []):
        names += _type_names(child)
    return names


# the lowering machinery is ``onnx_lowering``; these names stay importable from here for users and tests
__all__ = ["IR_VERSION", "LOWERINGS", "OPSET", "TARGETS", "ExportedSignature", "LoweringContext", "LoweringError",
           "OnnxExportError", "Target", "check_tensorrt_qdq", "export_compiled", "export_float", "export_graph",
           "file_size", "lower_graph", "make_target", "register_lowering"]
