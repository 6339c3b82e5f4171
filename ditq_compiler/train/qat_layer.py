"""A quantized linear / conv with trainable latent weights and scales, for distillation.

Replaces one annotated ``aten.linear`` / ``aten.conv2d`` while the quantized graph is trained:

    W_hat = fq(W, s_w) computed on W.detach(), plus (W - W.detach())
            forward: the quantized weight; d/dW: identity (the straight-through estimator of
            BitNet / EfficientDM, through the clamp too, so weights beyond the grid can come back);
            d/ds_w: LSQ's (round(W/s) - W/s inside the grid, the clamp bound outside)
    x_hat = per-token: fq on [c min_t x, c max_t x] per token, c the learned clipping ratio
            static:    fq(x, s_a, z_a), s_a learned (LSQ)
            either way d/dx is the STE (1 inside the range, 0 where clipped)
    y     = linear(x_hat, W_hat, b)     (or conv2d), with b trainable

``fq`` is ``ditq_compiler.quant.fake_quantize`` on the layer's grid (ternary {-1, 0, 1} for
W1.58). Scales stay positive: the parameters are used as ``|s|`` floored at float32 eps. The
activation bit width is an attribute, so mixed precision can change it between evaluations.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor, nn

from ditq_compiler.calibration.params import QuantParams
from ditq_compiler.trainable import LayerSource, TrainableLayer
from ditq_compiler.quant import QuantSpec, fake_quantize, fake_quantize_per_token, quantize, weight_qparams

SCALE_FLOOR = torch.finfo(torch.float32).eps


def _positive(value: Tensor) -> Tensor:
    return value.abs().clamp_min(SCALE_FLOOR)


class QATLayer(TrainableLayer):
    def __init__(self, weight: Tensor, bias: Tensor | None, weight_spec: QuantSpec, act_spec: QuantSpec | None,
                 act_qparams: tuple[Tensor, Tensor] | None = None, conv_args: tuple | None = None):
        super().__init__()
        self.weight_spec, self.act_spec, self.conv_args = weight_spec, act_spec, conv_args
        self.weight = nn.Parameter(weight.detach().clone())
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone())
        scale, zero_point = weight_qparams(self.weight.detach(), weight_spec)
        self.weight_scale = nn.Parameter(scale.clone())
        self.register_buffer("weight_zero_point", zero_point.clone())
        self.act_clip = self.act_scale = None
        self.register_buffer("act_zero_point", None)
        if act_spec is not None and act_spec.granularity == "token":
            self.act_clip = nn.Parameter(torch.tensor(1.0))
        elif act_spec is not None:
            if act_qparams is None:
                raise ValueError("a layer with a static activation quantizer needs its calibrated (scale, zero_point)")
            self.act_scale = nn.Parameter(act_qparams[0].detach().clone().reshape(()))
            self.act_zero_point = act_qparams[1].detach().clone().reshape(())

    @classmethod
    def from_source(cls, source: LayerSource) -> QATLayer:
        a = source.annotation
        return cls(source.weight, source.bias, a.weights, a.activations, source.act_qparams, source.conv_args)

    def learned(self, node: str) -> QuantParams:
        """Codes of the trained weight, the trained bias, and the clipping ratio or static input quantizer."""
        params = QuantParams(weights={node: self.weight_codes()})
        activation = self.activation_parameters()
        if activation is not None and activation[1] is None:
            params.token_clips[node] = activation[0]
        elif activation is not None:
            params.activations[node] = activation
        if self.bias is not None:
            params.biases[node] = self.trained_bias()
        return params

    def set_activation_bits(self, bits: int) -> None:
        """Change the per-token activation grid (mixed precision); static grids keep their calibration."""
        if self.act_clip is None:
            raise ValueError("only per-token activation quantizers change bits without recalibration")
        self.act_spec = dataclasses.replace(self.act_spec, bits=bits)

    def scale_parameters(self) -> list[nn.Parameter]:
        return [p for p in (self.weight_scale, self.act_clip, self.act_scale) if p is not None]

    def weight_parameters(self) -> list[nn.Parameter]:
        return [p for p in (self.weight, self.bias) if p is not None]

    def quantized_weight(self) -> Tensor:
        w = self.weight
        hard = fake_quantize(w.detach(), _positive(self.weight_scale), self.weight_zero_point, self.weight_spec)
        return hard + (w - w.detach())

    def quantized_input(self, x: Tensor) -> Tensor:
        spec = self.act_spec
        if spec is None:
            return x
        if self.act_clip is not None:
            return fake_quantize_per_token(x, spec, clip=_positive(self.act_clip))
        return fake_quantize(x, _positive(self.act_scale), self.act_zero_point, spec)

    # ---- results --------------------------------------------------------------------------
    def weight_codes(self) -> tuple[Tensor, Tensor, Tensor]:
        """(int8 codes, scale, zero point) of the trained weight."""
        with torch.no_grad():
            scale = _positive(self.weight_scale).clone()
            return quantize(self.weight, scale, self.weight_zero_point, self.weight_spec), scale, \
                self.weight_zero_point.clone()

    def activation_parameters(self) -> tuple[Tensor, Tensor | None] | None:
        """(clipping ratio, None) per token, (scale, zero point) static, None for float inputs."""
        with torch.no_grad():
            if self.act_clip is not None:
                return _positive(self.act_clip).clone(), None
            if self.act_scale is not None:
                return _positive(self.act_scale).clone(), self.act_zero_point.clone()
        return None

    def trained_bias(self) -> Tensor | None:
        return None if self.bias is None else self.bias.detach().clone()
