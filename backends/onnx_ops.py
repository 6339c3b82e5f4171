"""ONNX-mirror ops: torch.library ops that each export as one ONNX node, with ONNX's semantics in torch.

Lowerings (``ditq_compiler.backends.onnx``) rewrite a quantized graph into these ops and plain aten
ops. Each op here runs in torch with the semantics of the ONNX operator it exports to, so the
lowered graph can be checked against the fake-quant reference before any ONNX file exists, and
its translation (``TRANSLATIONS``, the ``custom_translation_table`` of ``torch.onnx.export``) is a
single ONNX node.

    quantize_linear(x, s, z, axis, block)    QuantizeLinear: saturate(round_half_even(x / s) + z), dtype of z
    dequantize_linear(q, s, z, axis, block, storage)
                                             DequantizeLinear: (q - z) * s
    matmul(a, b, layer)                      MatMul (kept whole: aten.matmul would decompose into reshapes
                                             that hide the DequantizeLinear from ORT's and TensorRT's fusions)
    matmul_integer(a, b, b_zero_point, layer)  MatMulInteger: int32 sum_k a_k (b_kn - zb_n)
    conv(x, w, stride, padding, dilation, groups, layer)         Conv (no bias)
    conv_integer(x, w, x_zero_point, w_zero_point, ..., layer)   ConvInteger: int32, padding with x_zero_point

Two string arguments do nothing in torch and travel into the ONNX node's ``metadata_props``, where
they survive the exporter's renaming and optimisation: ``layer`` (``ditq.layer``) names the quantized
layer a compute node serves, for the profile; ``storage`` (``ditq.storage``) asks the export to store
the integer input of a DequantizeLinear as INT4 (``"int4"``) or as INT4 that a Cast widens to INT8 at
load time (``"int4-as-int8"``); ``"int8"`` leaves it as it is.

(s, z) are broadcast as ONNX does: a scalar is per tensor; a 1-D tensor lies along ``axis``; with
``block > 0`` they have the input's rank and each entry covers ``block`` elements along ``axis``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from onnxscript import opset21 as op
from torch import Tensor


def _along(param: Tensor, x: Tensor, axis: int, block: int) -> Tensor:
    """``param`` broadcast against ``x`` (ONNX per-tensor / per-axis / blocked layouts)."""
    if param.dim() == 0:
        return param
    axis = axis % x.dim()
    if block > 0:
        return param.repeat_interleave(block, dim=axis).narrow(axis, 0, x.shape[axis])
    shape = [1] * x.dim()
    shape[axis] = -1
    return param.reshape(shape)


@torch.library.custom_op("ditq_onnx::quantize_linear", mutates_args=())
def quantize_linear(x: Tensor, scale: Tensor, zero_point: Tensor, axis: int, block: int) -> Tensor:
    info = torch.iinfo(zero_point.dtype)
    q = torch.round(x.float() / _along(scale, x, axis, block)) + _along(zero_point, x, axis, block).float()
    return q.clamp(info.min, info.max).to(zero_point.dtype)


@quantize_linear.register_fake
def _(x, scale, zero_point, axis, block):
    return x.new_empty(x.shape, dtype=zero_point.dtype)


@torch.library.custom_op("ditq_onnx::dequantize_linear", mutates_args=())
def dequantize_linear(q: Tensor, scale: Tensor, zero_point: Tensor, axis: int, block: int,
                      storage: str) -> Tensor:
    return (q.float() - _along(zero_point, q, axis, block).float()) * _along(scale, q, axis, block)


@dequantize_linear.register_fake
def _(q, scale, zero_point, axis, block, storage):
    return q.new_empty(q.shape, dtype=torch.float32)


@torch.library.custom_op("ditq_onnx::matmul", mutates_args=())
def matmul(a: Tensor, b: Tensor, layer: str) -> Tensor:
    return torch.matmul(a, b)


@matmul.register_fake
def _(a, b, layer):   # numpy broadcasting of the batch dims, as MatMul (a constant left block: L @ X)
    return a.new_empty((*torch.broadcast_shapes(a.shape[:-2], b.shape[:-2]), a.shape[-2], b.shape[-1]))


@torch.library.custom_op("ditq_onnx::matmul_integer", mutates_args=())
def matmul_integer(a: Tensor, b: Tensor, b_zero_point: Tensor, layer: str) -> Tensor:
    # float64 holds these sums exactly (|sum| < 2^53 for any K below 2^37)
    acc = torch.matmul(a.double(), b.double() - _along(b_zero_point, b, -1, 0).double())
    return acc.to(torch.int32)


@matmul_integer.register_fake
def _(a, b, b_zero_point, layer):
    return a.new_empty((*a.shape[:-1], b.shape[-1]), dtype=torch.int32)


@torch.library.custom_op("ditq_onnx::conv", mutates_args=())
def conv(x: Tensor, w: Tensor, stride: list[int], padding: list[int], dilation: list[int], groups: int,
         layer: str) -> Tensor:
    return F.conv2d(x, w, None, stride, padding, dilation, groups)


@conv.register_fake
def _(x, w, stride, padding, dilation, groups, layer):
    return F.conv2d(x, w, None, stride, padding, dilation, groups)


@torch.library.custom_op("ditq_onnx::conv_integer", mutates_args=())
def conv_integer(x: Tensor, w: Tensor, x_zero_point: Tensor, w_zero_point: Tensor, stride: list[int],
                 padding: list[int], dilation: list[int], groups: int, layer: str) -> Tensor:
    # (x - zx) padded with 0 == x padded with zx, as ConvInteger pads
    acc = F.conv2d(x.double() - x_zero_point.double(), w.double() - w_zero_point.double(), None,
                   stride, padding, dilation, groups)
    return acc.to(torch.int32)


@conv_integer.register_fake
def _(x, w, x_zero_point, w_zero_point, stride, padding, dilation, groups, layer):
    return F.conv2d(x.float(), w.float(), None, stride, padding, dilation, groups).to(torch.int32)


def _pads(padding: list[int]) -> list[int]:
    return [*padding, *padding]


def _tagged(value, key: str, tag: str):
    if tag:
        value.producer().metadata_props[key] = tag
    return value


def _quantize_linear(x, scale, zero_point, axis: int, block: int):
    return op.QuantizeLinear(x, scale, zero_point, axis=axis, block_size=block)


def _dequantize_linear(q, scale, zero_point, axis: int, block: int, storage: str):
    out = op.DequantizeLinear(q, scale, zero_point, axis=axis, block_size=block)
    return _tagged(out, "ditq.storage", "" if storage == "int8" else storage)


def _matmul(a, b, layer: str):
    return _tagged(op.MatMul(a, b), "ditq.layer", layer)


def _matmul_integer(a, b, b_zero_point, layer: str):
    return _tagged(op.MatMulInteger(a, b, None, b_zero_point), "ditq.layer", layer)


def _conv(x, w, stride: list[int], padding: list[int], dilation: list[int], groups: int, layer: str):
    out = op.Conv(x, w, strides=stride, pads=_pads(padding), dilations=dilation, group=groups)
    return _tagged(out, "ditq.layer", layer)


def _conv_integer(x, w, x_zero_point, w_zero_point, stride: list[int], padding: list[int], dilation: list[int],
                  groups: int, layer: str):
    out = op.ConvInteger(x, w, x_zero_point, w_zero_point, strides=stride, pads=_pads(padding),
                         dilations=dilation, group=groups)
    return _tagged(out, "ditq.layer", layer)


TRANSLATIONS = {
    torch.ops.ditq_onnx.quantize_linear.default: _quantize_linear,
    torch.ops.ditq_onnx.dequantize_linear.default: _dequantize_linear,
    torch.ops.ditq_onnx.matmul.default: _matmul,
    torch.ops.ditq_onnx.matmul_integer.default: _matmul_integer,
    torch.ops.ditq_onnx.conv.default: _conv,
    torch.ops.ditq_onnx.conv_integer.default: _conv_integer,
}
