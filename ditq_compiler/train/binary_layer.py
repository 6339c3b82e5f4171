"""A binarized (W1A1) layer under quantization-aware training: BiDM+'s FPB and the XNOR / ReAct baselines.

The forward is the one of ``ditq_compiler.binary`` (see its docstring for the math), with learnable

    fpb    tau_w (per output channel), k (a scalar for a linear, a kh x kw filter for a conv), tau_x, mu_min,
           mu_max (per input channel)
    react  tau_x
    xnor   nothing but the latent weights

and the latent float weights and bias trained as in the other trainable layers. ``sign`` passes gradients
straight through where its input lies in [-1, 1] (the clipped straight-through estimator of XNOR-Net and
BinaryConnect; BiDM+ trains with straight-through gradients and gives no other form): d sign(u) / du ~ 1{|u| <= 1}.
``clip`` passes the gradient to its bounds where it clips, which is how ``mu_min`` and ``mu_max`` learn.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ditq_compiler.binary import SCALE_MODES, activation_scale
from ditq_compiler.calibration.params import QuantParams
from ditq_compiler.trainable import LayerSource, TrainableLayer


class _SignSTE(torch.autograd.Function):
    """sign(u) (sign(0) = +1) forward; gradient 1{|u| <= 1} backward."""

    @staticmethod
    def forward(ctx, u: Tensor) -> Tensor:
        ctx.save_for_backward(u)
        return torch.where(u >= 0, 1.0, -1.0).to(u.dtype)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        (u,) = ctx.saved_tensors
        return grad * (u.abs() <= 1).to(grad.dtype)


def sign_ste(u: Tensor) -> Tensor:
    return _SignSTE.apply(u)


class BinaryLayer(TrainableLayer):
    """One W1A1 layer; ``binarizer`` is ``xnor``, ``react`` or ``fpb``."""

    def __init__(self, weight: Tensor, bias: Tensor | None, binarizer: str, conv_args: tuple | None = None):
        super().__init__()
        self.binarizer, self.conv_args = binarizer, conv_args
        self.weight = nn.Parameter(weight.detach().clone())
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone())
        out_channels, in_channels = weight.shape[0], weight.shape[1]
        kernel = tuple(weight.shape[2:]) if weight.dim() == 4 else ()
        learn = binarizer == "fpb"
        self.tau_w = nn.Parameter(torch.zeros(out_channels), requires_grad=learn)
        self.k = nn.Parameter(torch.full(kernel, 1.0 / max(1, torch.Size(kernel).numel())), requires_grad=learn)
        self.tau_x = nn.Parameter(torch.zeros(in_channels), requires_grad=binarizer in ("react", "fpb"))
        self.mu_min = nn.Parameter(torch.ones(in_channels), requires_grad=learn)
        self.mu_max = nn.Parameter(torch.ones(in_channels), requires_grad=learn)
        self.mode = SCALE_MODES["clipped" if learn else "mean_abs"]

    @classmethod
    def from_source(cls, source: LayerSource) -> BinaryLayer:
        return cls(source.weight, source.bias, source.annotation.weights.binarizer, source.conv_args)

    # ---- the parameters the trainer sees --------------------------------------------------------------
    def weight_parameters(self) -> list[nn.Parameter]:
        return [p for p in (self.weight, self.bias) if p is not None]

    def scale_parameters(self) -> list[nn.Parameter]:
        return [p for p in (self.tau_w, self.k, self.tau_x, self.mu_min, self.mu_max) if p.requires_grad]

    # ---- forward -----------------------------------------------------------------------------------------
    def _centred_weight(self) -> Tensor:
        return self.weight - self.tau_w.reshape(-1, *[1] * (self.weight.dim() - 1))

    def _sigma(self) -> Tensor:
        """mean |w - tau_w| per output channel (Eq. 12's sigma)."""
        return self._centred_weight().abs().flatten(1).mean(1)

    def forward(self, x: Tensor) -> Tensor:
        x_b = sign_ste(x - (self.tau_x.reshape(1, -1, 1, 1) if x.dim() == 4 else self.tau_x))
        w_b = sign_ste(self._centred_weight())
        mu = (self.mu_min, self.mu_max) if self.mode == SCALE_MODES["clipped"] else (None, None)
        scale = activation_scale(x, self.mode, *mu)
        if self.conv_args is None:
            acc = F.linear(x_b, w_b)
            y = acc * scale * (self._sigma() * self.k)
            return y if self.bias is None else y + self.bias
        stride, padding, dilation, groups = self.conv_args
        acc = F.conv2d(x_b, w_b, None, stride, padding, dilation, groups)
        a = F.conv2d(scale, self.k.reshape(1, 1, *self.k.shape), None, stride, padding, dilation)
        y = acc * a * self._sigma().reshape(1, -1, 1, 1)
        return y if self.bias is None else y + self.bias.reshape(1, -1, 1, 1)

    # ---- what training found -------------------------------------------------------------------------------
    def learned(self, node: str) -> QuantParams:
        """The stored form: weight bits with tau_w merged in, sigma (times k for a linear), the activation
        binarizer's offsets and bounds, the conv's k, the trained bias."""
        with torch.no_grad():
            bits = (self._centred_weight() < 0).to(torch.uint8)
            sigma = self._sigma()
            record = {"w_bits": bits, "w_scale": (sigma * self.k if self.conv_args is None else sigma).float(),
                      "tau": self.tau_x.detach().clone(), "mu_min": self.mu_min.detach().clone(),
                      "mu_max": self.mu_max.detach().clone(), "mode": torch.tensor(self.mode)}
            if self.conv_args is not None:
                record["k"] = self.k.detach().clone()
            params = QuantParams(binary={node: record})
            if self.bias is not None:
                params.biases[node] = self.bias.detach().clone()
        return params

    def quantized_input(self, x: Tensor) -> Tensor:   # the TrainableLayer protocol; forward is the whole layer
        return sign_ste(x - self.tau_x)

    def quantized_weight(self) -> Tensor:
        return sign_ste(self._centred_weight())


__all__ = ["BinaryLayer", "sign_ste"]
