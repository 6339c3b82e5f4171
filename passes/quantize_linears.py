"""Replace annotated ``aten.linear`` / ``aten.conv2d`` nodes with quantized custom ops.

For each node annotated by the recipe (``meta.get(node).annotation``), the float weight ``W`` is replaced
by integer codes and their quantization parameters,

    q_w = clamp(round(W / s_w) + z_w, qmin, qmax),      (s_w, z_w) from the weight observer,

and the node becomes ``ditq::quant_linear`` / ``ditq::quant_conv2d`` (``ditq_compiler.ops``)
with the calibrated input-activation parameters ``(s_a, z_a)``. The rewrite preserves

    op(x) = linear(x_hat, (q_w - z_w) s_w, b)

which is the fake-quant reference every backend is checked against. A layer whose input already
passes through a standalone quantizer op (``input_site`` in its meta record, set by
``quantize_activations``) gets ``a_bits = 0``. Float weights that no other node uses are deleted
from the module.

A binarized (W1A1) layer becomes ``ditq::binary_linear`` / ``ditq::binary_conv2d`` (``ditq_compiler.binary``)
with its weight bits, scales and activation binarizer instead.
"""

from __future__ import annotations


import torch
from torch import fx
from torch.fx.passes.infra.pass_base import PassBase, PassResult

import ditq_compiler.binary  # noqa: F401  (registers the ditq:: binary ops)
import ditq_compiler.ops  # noqa: F401  (registers the ditq:: ops)
from ditq_compiler import meta
from ditq_compiler.calibration.params import QuantParams
from ditq_compiler.meta import LayerAnnotation
from ditq_compiler.pipeline import (PreconditionError, delete_unused_attrs, fetch_attr, layer_parameters,
                                    register_constant)
from ditq_compiler.quant import quantize, weight_qparams
from ditq_compiler.train.binary_layer import BinaryLayer


def _layers(gm: fx.GraphModule) -> list[fx.Node]:
    """The annotated ``aten.linear`` / ``aten.conv2d`` nodes."""
    return [n for n in gm.graph.nodes if meta.get(n).annotation is not None and n.op == "call_function"
            and n.target in (torch.ops.aten.linear.default, torch.ops.aten.conv2d.default)]


class QuantizeLinears(PassBase):
    """The pass, with the calibrated ``QuantParams``: ``activations`` (node name -> (scale, zero_point)),
    ``weights`` (node name -> codes, scale, zero_point; replaces the observer's nearest rounding for the
    layers it names, e.g. with the learned rounding of reconstruction), ``token_clips`` (node name ->
    a per-token clipping ratio) and ``biases`` (node name -> a trained bias); distillation learns the last two.
    """

    name = "quantize_linears"

    def __init__(self, params: QuantParams):
        self.activation_qparams = params.activations
        self.weight_codes = params.weights
        self.token_clips = params.token_clips
        self.biases = params.biases
        self.binary = params.binary

    def requires(self, gm: fx.GraphModule) -> None:
        """Every annotated layer whose input it quantizes itself has calibrated (scale, zero point)."""
        for node in _layers(gm):
            annotation = meta.get(node).annotation
            acts = annotation.activations
            static = acts is not None and acts.granularity != "token" and not meta.get(node).input_site \
                and not annotation.weights.binary
            if static and node.name not in self.activation_qparams:
                raise PreconditionError(f"{self.name}: layer '{annotation.name}' (node {node.name}) quantizes its "
                                        "input activation but has no calibrated activation parameters")

    def call(self, gm: fx.GraphModule) -> PassResult:
        modified = False
        for node in _layers(gm):
            annotation = meta.get(node).annotation
            if annotation.weights.binary:
                self._rewrite_binary(gm, node, annotation)
            else:
                self._rewrite(gm, node, annotation)
            modified = True
        if modified:
            delete_unused_attrs(gm)
            gm.graph.lint()
            gm.recompile()
        return PassResult(gm, modified)

    def _rewrite_binary(self, gm: fx.GraphModule, node: fx.Node, annotation: LayerAnnotation) -> None:
        """A W1A1 layer becomes ``ditq::binary_linear`` / ``binary_conv2d`` with its trained stored form, or, untrained,
        the binarizer's initial one (``BinaryLayer``'s before any step: tau 0, mu 1, k = 1 / (kh kw))."""
        record = self.binary.get(node.name)
        if record is None:
            weight, bias, conv = layer_parameters(gm, node)
            layer = BinaryLayer(weight, bias, annotation.weights.binarizer, conv)
            record = layer.learned(node.name).binary[node.name]
        prefix = f"ditq_{node.name}"
        bias_node = node.args[2] if len(node.args) > 2 else None
        if node.name in self.biases:
            bias_node = register_constant(gm, f"{prefix}_bias", self.biases[node.name], node)
        constant = {name: register_constant(gm, f"{prefix}_{name}", record[name], node)
                    for name in ("w_bits", "w_scale", "tau", "mu_min", "mu_max")}
        mode = int(record["mode"])
        if node.target is torch.ops.aten.linear.default:
            target = torch.ops.ditq.binary_linear.default
            args = (node.args[0], constant["w_bits"], constant["w_scale"], constant["tau"], constant["mu_min"],
                    constant["mu_max"], mode, bias_node)
        else:
            target = torch.ops.ditq.binary_conv2d.default
            _, _, conv = layer_parameters(gm, node)
            k = register_constant(gm, f"{prefix}_k", record["k"], node)
            args = (node.args[0], constant["w_bits"], constant["w_scale"], k, constant["tau"], constant["mu_min"],
                    constant["mu_max"], mode, bias_node, *[list(a) for a in conv[:3]], conv[3])
        self._replace(gm, node, target, args, "binarized ({})".format(
            "trained" if node.name in self.binary else "initial"))

    def _rewrite(self, gm: fx.GraphModule, node: fx.Node, annotation: LayerAnnotation) -> None:
        x, weight_node, bias_node = (list(node.args) + [None, None])[:3]
        if node.name in self.weight_codes:
            codes, w_scale, w_zero_point = self.weight_codes[node.name]
        else:
            weight = fetch_attr(gm, weight_node.target).detach()
            w_scale, w_zero_point = weight_qparams(weight, annotation.weights)
            codes = quantize(weight, w_scale, w_zero_point, annotation.weights)
        prefix = f"ditq_{node.name}"
        if node.name in self.biases:
            bias_node = register_constant(gm, f"{prefix}_bias", self.biases[node.name], node)
        args = [x,
                register_constant(gm, f"{prefix}_w_codes", codes, node),
                register_constant(gm, f"{prefix}_w_scale", w_scale, node),
                register_constant(gm, f"{prefix}_w_zero_point", w_zero_point, node),
                bias_node]
        acts = annotation.activations
        if acts is None or meta.get(node).input_site:   # weight-only, or a quantizer op feeds it
            args += [None, None, 0, False]
        elif acts.granularity == "token":
            clip = self.token_clips.get(node.name)
            clip = None if clip is None else register_constant(gm, f"{prefix}_a_clip", clip.reshape(()), node)
            args += [clip, None, acts.bits, True]
        else:
            a_scale, a_zero_point = self.activation_qparams[node.name]
            args += [register_constant(gm, f"{prefix}_a_scale", a_scale.reshape(()), node),
                     register_constant(gm, f"{prefix}_a_zero_point", a_zero_point.reshape(()), node),
                     acts.bits, False]
        if node.target is torch.ops.aten.linear.default:
            target = torch.ops.ditq.quant_linear.default
        else:
            target = torch.ops.ditq.quant_conv2d.default
            stride, padding, dilation, groups = (list(node.args) + [None] * 7)[3:7]
            args += [list(stride or [1, 1]), list(padding or [0, 0]), list(dilation or [1, 1]), groups or 1]
        self._replace(gm, node, target, tuple(args),
                      "learned (reconstruction)" if node.name in self.weight_codes else "nearest")

    @staticmethod
    def _replace(gm: fx.GraphModule, node: fx.Node, target, args: tuple, rounding: str) -> None:
        with gm.graph.inserting_after(node):
            new = gm.graph.call_function(target, args)
        new.meta.update(node.meta)
        meta.update(new, source_node=node.name)
        meta.record_applied(new, "quantize_linears", op=str(target), weight_rounding=rounding)
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)
