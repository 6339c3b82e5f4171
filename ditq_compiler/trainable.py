"""Trainable layers: the one mechanism by which reconstruction and distillation learn quantization.

Both work on a copy of the float graph in which every layer the recipe quantizes is replaced by a
module that fake-quantizes its input and weight with learnable parameters:

    y = linear(x_hat, W_hat, b)     or     conv2d(x_hat, W_hat, b, stride, padding, dilation, groups)

``TrainableLayer`` holds that forward once; a method says how ``x_hat = quantized_input(x)`` and
``W_hat = quantized_weight()`` are made and learned (``calibration.recon_layer.ReconLayer``:
AdaRound rounding, LSQ activation scale, migration factors; ``train.qat_layer.QATLayer``: latent
weights with the straight-through estimator). ``learned(node)`` returns what training found as
``QuantParams`` entries for that node, so every trainable method reports its results one way.

``swap_in_trainable_layers`` does the swapping: for each annotated ``aten.linear`` / ``aten.conv2d``
node it builds the method's layer from a ``LayerSource`` (weight, bias, conv arguments, annotation,
calibrated input quantizer and, when asked, TaQ-DiT's shift / migration affine in front of the
layer, which the layer then applies itself) and calls it in the node's place. The new call node keeps
the original's meta, with ``trainable_of`` naming the node it replaced.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping

import torch.nn.functional as F
from torch import Tensor, fx, nn

from ditq_compiler import meta
from ditq_compiler.calibration.params import QuantParams
from ditq_compiler.meta import LayerAnnotation
from ditq_compiler.passes.migrate_outliers import channel_affine
from ditq_compiler.pipeline import layer_parameters, swap_for_module

PREFIX = "ditq_trainable_"


@dataclass(frozen=True)
class LayerSource:
    """What a trainable layer is built from."""

    node: str
    annotation: LayerAnnotation
    weight: Tensor
    bias: Tensor | None
    conv_args: tuple | None                      # (stride, padding, dilation, groups), None for a linear
    act_qparams: tuple[Tensor, Tensor] | None    # the calibrated static input quantizer (scale, zero point)
    shift: Tensor | None = None                  # TaQ-DiT shift in front of the layer (when taken over)
    factors: Tensor | None = None                # TaQ-DiT migration factors (when taken over)


class TrainableLayer(nn.Module):
    """``y = op(quantized_input(x), quantized_weight(), bias)``; subclasses define the two quantizers and set
    ``conv_args`` ((stride, padding, dilation, groups), or None for a linear) and ``bias``."""

    conv_args: tuple | None
    bias: Tensor | None

    def quantized_input(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def quantized_weight(self) -> Tensor:
        raise NotImplementedError

    def learned(self, node: str) -> QuantParams:
        """What training found for this layer, as entries of ``node``."""
        raise NotImplementedError

    def forward(self, x: Tensor) -> Tensor:
        x_hat, w_hat = self.quantized_input(x), self.quantized_weight()
        if self.conv_args is None:
            return F.linear(x_hat, w_hat, self.bias)
        return F.conv2d(x_hat, w_hat, self.bias, *self.conv_args)


def swap_in_trainable_layers(gm: fx.GraphModule, annotations: Mapping[str, LayerAnnotation],
                             act_qparams: Mapping[str, tuple[Tensor, Tensor]],
                             build: Callable[[LayerSource], TrainableLayer],
                             take_affine: bool = False) -> dict[str, TrainableLayer]:
    """Replace every annotated layer of ``gm`` (in place) by ``build(source)``; returns them by node name.

    ``take_affine``: the layer applies the shift / migration affine in front of it itself (reconstruction
    learns the factors), and that graph node goes; otherwise the affine stays in the graph.
    """
    layers = {}
    for node in list(gm.graph.nodes):
        annotation = annotations.get(node.name)
        if annotation is None or node.op != "call_function":
            continue
        x, shift, factors, affine = channel_affine(gm, node) if take_affine else (node.args[0], None, None, None)
        weight, bias, conv = layer_parameters(gm, node)
        layer = build(LayerSource(node.name, annotation, weight, bias, conv, act_qparams.get(node.name), shift,
                                  factors))
        call = swap_for_module(gm, node, PREFIX + node.name, layer, x)
        meta.update(call, trainable_of=node.name)
        if affine is not None and not affine.users:
            gm.graph.erase_node(affine)
        layers[node.name] = layer
    gm.graph.eliminate_dead_code()
    gm.recompile()
    return layers


def learned_params(layers: Mapping[str, TrainableLayer]) -> QuantParams:
    """Every layer's ``learned`` entries, merged."""
    params = QuantParams()
    for node, layer in layers.items():
        params = params.merged(layer.learned(node))
    return params


def trainable_calls(gm: fx.GraphModule) -> dict[str, fx.Node]:
    """Original node name -> the call of its trainable layer."""
    return {meta.get(n).trainable_of: n for n in gm.graph.nodes if meta.get(n).trainable_of is not None}


__all__ = ["LayerSource", "TrainableLayer", "learned_params", "swap_in_trainable_layers", "trainable_calls"]
