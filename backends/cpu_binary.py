"""CPU binary backend ``cpu-binary``: W1A1 layers on the XNOR-popcount kernels, the rest as the torch backend.

The graph is first lowered as backend ``torch`` does (``backends/torch.lower_reference``), then every
``ditq::binary_linear`` / ``ditq::binary_conv2d`` node (``ditq_compiler.binary``) becomes a call of the
kernel ops of ``ditq_compiler.kernels.binary_cpu``:

    y = ((acc * row_scale) * col_scale) + bias         acc = sign(x - tau) (*) w_b, an exact int32 popcount sum

with, from the reference op's operands,

    w_b        the stored weight bits (1 = negative), packed once here into 64-bit words (a buffer of the graph)
    tau        the activation threshold per input channel (the kernel's threshold: sign(x - tau) without x - tau)
    row_scale  linear: A(x), one per token (none for scale mode "none", where the reference multiplies by 1)
               conv:   conv2d(A(x), k) per output pixel (``binary.conv_activation_scale``, computed in torch)
    col_scale  sigma, the weight scale per output channel
    bias       b

Exactness. The reference computes ``acc`` in float32 from +-1 values, exact while the sum has at most
2^24 terms (K, or C_in / groups x kh x kw for a conv), and its epilogue in float32 in the kernel's order
(``((acc * a) * sigma) + b``); the scales are the same torch expressions on the same tensors. So on a
float32 graph the lowered layer equals the reference bit for bit, on every kernel path (tested on whole
models). One difference is outside that: a NaN activation has sign -1 in the reference (``x >= tau`` is
false) and +1 in the kernel; with a scale mode other than "none" the NaN also reaches ``A(x)`` and the
row is NaN either way.

Layout. ``F.conv2d`` returns a channels-last result for a channels-last input (a U-Net's attention hands its
convs such tensors), and later float ops (group norm) round differently on the two layouts; so the
lowered conv returns its result in the memory format ``F.conv2d`` would (``suggest_memory_format(x)``),
and the whole model stays bitwise equal to the reference, not only each layer.

A layer keeps the reference op, with the reason in ``summary()``, when its input is not float32 (the
kernel's epilogue is float32), when its sum has more than 2^24 terms, or when the kernels could not be
built on this machine (no C compiler: ``binary_cpu`` warns once and every W1A1 layer stays on the
reference). ``$DITQ_BINARY_IMPL`` picks the kernel path (``kernels/binary_cpu``); the one seen at
lowering is named per layer, e.g. ``xnor-popcount (avx512-vpopcntdq)``. The kernels use
``torch.get_num_threads()`` threads at each call.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, fx
from torch._prims_common import suggest_memory_format

import ditq_compiler.binary  # noqa: F401  (registers the ditq:: binary ops)
from ditq_compiler import meta
from ditq_compiler.backends.registry import register_backend
from ditq_compiler.backends.torch import lower_reference
from ditq_compiler.binary import SCALE_MODES, activation_scale, conv_activation_scale, weight_signs
from ditq_compiler.kernels import binary_cpu
from ditq_compiler.pipeline import copy_graph, delete_unused_attrs, fetch_attr, register_constant

LINEAR, CONV = torch.ops.ditq.binary_linear.default, torch.ops.ditq.binary_conv2d.default
MAX_TERMS = binary_cpu.EXACT_FLOAT32_K    # the reference's float32 sums of +-1 are exact up to here


def _on_cpu(x: Tensor, layer: str) -> None:
    if x.device.type != "cpu":
        raise RuntimeError(f"layer {layer}: backend 'cpu-binary' runs W1A1 layers on CPU kernels, got x on {x.device};"
                           f" compile or load with backend='torch' to run on {x.device.type}")


def xnor_linear(x: Tensor, w_packed: Tensor, in_features: int, w_scale: Tensor, tau: Optional[Tensor],
                mu_min: Optional[Tensor], mu_max: Optional[Tensor], mode: int, bias: Optional[Tensor],
                layer: str) -> Tensor:
    """``ditq::binary_linear`` on the kernel: ``((acc * A(x)) * sigma) + b``, ``A(x)`` per token in torch."""
    _on_cpu(x, layer)
    row_scale = None if mode == SCALE_MODES["none"] else activation_scale(x, mode, mu_min, mu_max)
    return torch.ops.ditq_kernels.binary_linear(x, w_packed, in_features, tau, row_scale, w_scale, bias, 0)


def xnor_conv2d(x: Tensor, w_packed: Tensor, w_scale: Tensor, k: Tensor, tau: Optional[Tensor],
                mu_min: Optional[Tensor], mu_max: Optional[Tensor], mode: int, bias: Optional[Tensor],
                stride: list[int], padding: list[int], dilation: list[int], groups: int, layer: str) -> Tensor:
    """``ditq::binary_conv2d`` on the kernel: ``((acc * conv2d(A(x), k)) * sigma) + b``, the scale map in torch."""
    _on_cpu(x, layer)
    row_scale = conv_activation_scale(x, k, mode, mu_min, mu_max, stride, padding, dilation)
    y = torch.ops.ditq_kernels.binary_conv2d(x, w_packed, tau, row_scale, w_scale, bias, stride, padding, dilation,
                                             groups, 0)
    return y.contiguous(memory_format=suggest_memory_format(x))    # F.conv2d's layout: the ops after it round alike


def _layer_name(node: fx.Node) -> str:
    record = meta.get(node)
    return record.annotation.name if record.annotation is not None else record.source_node or node.name


def _refusal(node: fx.Node, bits: Tensor | None, info: dict) -> str | None:
    """Why this layer keeps the reference op, or None."""
    if info["path"] == binary_cpu.TORCH and info["build_failure"]:
        return f"XNOR-popcount kernels not built: {info['build_failure'].splitlines()[0][:200]}"
    if node.kwargs or bits is None:
        return "operands passed by keyword (the quantize pass writes them in order)"
    x = node.args[0].meta.get("val") if isinstance(node.args[0], fx.Node) else None
    if x is not None and x.dtype != torch.float32:
        return f"input is {x.dtype}: the kernel's epilogue is float32"
    terms = bits[0].numel()       # K, or C_in / groups x kh x kw
    if terms > MAX_TERMS:
        return f"{terms} terms per output > 2^24: the float32 reference is not exact there"
    return None


def _kernel_node(gm: fx.GraphModule, node: fx.Node, bits: Tensor) -> fx.Node:
    """The call replacing ``node``: its operands with the weight bits packed into a new buffer."""
    signs = weight_signs(bits)
    packed = binary_cpu.pack_signs(signs)[0] if node.target is LINEAR else binary_cpu.pack_conv_weight(signs)
    w_packed = register_constant(gm, f"ditq_xnor_{node.name}_w_packed", packed.contiguous(), node)
    x, _, *rest = node.args
    with gm.graph.inserting_before(node):
        if node.target is LINEAR:
            return gm.graph.call_function(xnor_linear, (x, w_packed, bits.shape[1], *rest, _layer_name(node)))
        return gm.graph.call_function(xnor_conv2d, (x, w_packed, *rest, _layer_name(node)))


def lower_binary(gm: fx.GraphModule) -> tuple[fx.GraphModule, dict[str, str]]:
    """Replace the W1A1 nodes of ``gm`` (in place) by the kernels; per layer's source node, the kernel or why not."""
    info = binary_cpu.kernel_info()          # builds the library on first use; warns once if it cannot
    kernels: dict[str, str] = {}
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target not in (LINEAR, CONV):
            continue
        source = meta.get(node).source_node or node.name
        bits = fetch_attr(gm, node.args[1].target) if len(node.args) > 1 else None
        reason = _refusal(node, bits, info)
        if reason:
            kernels[source] = f"reference ({reason})"
            continue
        new = _kernel_node(gm, node, bits)
        new.meta.update(node.meta)
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)
        kernels[source] = f"xnor-popcount ({info['path']})"
    delete_unused_attrs(gm)
    gm.graph.lint()
    gm.recompile()
    return gm, kernels


@register_backend("cpu-binary", "W1A1 layers on the XNOR-popcount CPU kernels, the rest as the torch backend")
def lower_cpu_binary(gm: fx.GraphModule) -> tuple[fx.GraphModule, dict[str, str]]:
    lowered, kernels = lower_reference(copy_graph(gm))
    lowered, binary = lower_binary(lowered)
    return lowered, {**kernels, **binary}


__all__ = ["MAX_TERMS", "lower_binary", "xnor_conv2d", "xnor_linear"]
