"""A quantized layer with learnable rounding, activation scale and migration factors.

Used by block reconstruction (``reconstruct.py``) in place of one ``aten.linear``/``conv2d``.

Weights, AdaRound (Nagel et al. 2020, as in BRECQ / QDrop): with the weight scale ``s`` and zero
point ``z`` fixed from the recipe's observer,

    h(V)   = clamp(sigmoid(V) (zeta - gamma) + gamma, 0, 1)          zeta = 1.1, gamma = -0.1
    W_soft = (clamp(floor(W / s) + h(V) + z, qmin, qmax) - z) s       while learning
    W_hard = same with h replaced by [V >= 0]                          after learning
    round loss = sum(1 - |2 h(V) - 1|^b)                               b annealed 20 -> 2

``V`` starts so that ``h(V) = W/s - floor(W/s)`` (W_soft == W inside the range).

Activations, LSQ (Esser et al. 2020): the static input quantizer's scale ``s_a`` is a parameter;
``fake_quantize`` passes gradients to it. QDrop (Wei et al. 2022): while learning, each element
keeps its float value with probability ``drop_prob`` instead of the quantized one.

Over several processes each computes some rows of a step's minibatch (``share``: the minibatch's
``m`` rows, this process's rows ``[a, b)``): QDrop's mask is drawn for the whole minibatch, so the
processes' generators stay in step and each row gets the mask it gets in one process, and the rows
``[a, b)`` are kept (``keep_float_mask``).

TaQ-DiT migration: for a layer behind a shift/migration affine, the layer takes the raw input
``x`` and computes ``(x - d) / a`` itself, with weight ``W0 diag(a)``. Only the migrated
(outlier) channels' factors are learned, as ``a_j = exp(log_a_j)`` so they stay positive;
the normal channels keep ``a_j = 1``. The gradient reaches ``a`` through both sides (``floor``
passes gradients straight through).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ditq_compiler.calibration.params import QuantParams
from ditq_compiler.trainable import LayerSource, TrainableLayer
from ditq_compiler.quant import (
    QuantSpec,
    broadcast_qparams,
    fake_quantize,
    fake_quantize_per_token,
    weight_qparams,
)

ZETA, GAMMA = 1.1, -0.1
SCALE_FLOOR = torch.finfo(torch.float32).eps   # a learned scale never reaches zero


def floor_ste(v: Tensor) -> Tensor:
    return v + (v.floor() - v).detach()


def keep_float_mask(shape: torch.Size, drop_prob: float, generator: torch.Generator | None,
                    share: tuple[int, int, int] | None = None) -> Tensor:
    """QDrop: True where an element keeps its float value (probability ``drop_prob``).

    ``share = (m, a, b)``: the tensor holds rows [a, b) of a minibatch of m rows (batch-major): the mask
    of all m rows is drawn and rows [a, b) of it are returned."""
    if share is None:
        return torch.rand(shape, generator=generator) < drop_prob
    m, a, b = share
    per_row = math.prod(shape) // (b - a)
    drawn = torch.rand(m * per_row, generator=generator)
    return (drawn[a * per_row:b * per_row] < drop_prob).reshape(shape)


def rectified_sigmoid(v: Tensor) -> Tensor:
    return (torch.sigmoid(v) * (ZETA - GAMMA) + GAMMA).clamp(0, 1)


class ReconLayer(TrainableLayer):
    """One layer under reconstruction. Modes: ``weight_mode`` fp | soft | hard; ``act_quant`` on/off."""

    def __init__(self, weight: Tensor, bias: Tensor | None, weight_spec: QuantSpec, act_spec: QuantSpec | None,
                 act_qparams: tuple[Tensor, Tensor] | None, conv_args: tuple | None = None,
                 shift: Tensor | None = None, factors: Tensor | None = None):
        super().__init__()
        self.weight_spec, self.act_spec, self.conv_args = weight_spec, act_spec, conv_args
        self.register_buffer("bias", None if bias is None else bias.detach().clone())
        self.register_buffer("shift", None if shift is None else shift.detach().clone())
        if factors is not None:
            factors = factors.detach().clone()
            self.log_factors = nn.Parameter(factors.log())
            self.register_buffer("outliers", factors != 1)
            base = weight.detach() / self._column(factors)
        else:
            self.log_factors = None
            base = weight.detach()      # shared with the graph's weight: it is only read
        self.register_buffer("base_weight", base)
        w = self.effective_weight().detach()
        scale, zero_point = weight_qparams(w, weight_spec)
        self.register_buffer("w_scale", scale)
        self.register_buffer("w_zero_point", zero_point)
        s, _ = broadcast_qparams(w, scale, zero_point, weight_spec)
        rest = (w / s - (w / s).floor()).clamp(1e-4, 1 - 1e-4)
        self.rounding = nn.Parameter(-torch.log((ZETA - GAMMA) / (rest - GAMMA) - 1))
        static = act_spec is not None and act_spec.granularity != "token"
        if static and act_qparams is None:
            raise ValueError("a layer with a static activation quantizer needs its calibrated (scale, zero_point)")
        self.act_scale = nn.Parameter(act_qparams[0].detach().clone().reshape(())) if static else None
        self.register_buffer("act_zero_point", act_qparams[1].detach().clone().reshape(()) if static else None)
        self.weight_mode, self.act_quant, self.drop_prob = "fp", False, 0.0
        self.generator: torch.Generator | None = None   # QDrop's draws, seeded by the reconstruction
        self.share: tuple[int, int, int] | None = None   # this process's rows of the minibatch (module doc)
        self.weight_override: Tensor | None = None      # W_hat computed by the rank that owns this layer

    @classmethod
    def from_source(cls, source: LayerSource) -> ReconLayer:
        a = source.annotation
        return cls(source.weight, source.bias, a.weights, a.activations, source.act_qparams, source.conv_args,
                   source.shift, source.factors)

    def learned(self, node: str) -> QuantParams:
        """The learned rounding as codes, the activation scale and the migration factors."""
        qparams = self.activation_qparams()
        return QuantParams(weights={node: self.weight_codes()},
                           activations={} if qparams is None else {node: qparams},
                           factors={} if self.log_factors is None else {node: self.factors.detach().clone()})

    @property
    def factors(self) -> Tensor | None:
        """Migration factors: learned on the outlier channels, 1 elsewhere (no gradient there)."""
        if self.log_factors is None:
            return None
        return torch.where(self.outliers, self.log_factors.exp(), torch.ones_like(self.log_factors))

    @staticmethod
    def _column(factors: Tensor) -> Tensor:
        return factors.reshape(1, -1)  # migration is defined for linears: (out, in) weights

    def effective_weight(self) -> Tensor:
        return self.base_weight if self.factors is None else self.base_weight * self._column(self.factors)

    def soft_rounding(self) -> Tensor:
        return rectified_sigmoid(self.rounding)

    def round_loss(self, b: float) -> Tensor:
        return (1 - (2 * self.soft_rounding() - 1).abs().pow(b)).sum()

    def quantized_weight(self) -> Tensor:
        if self.weight_override is not None:
            return self.weight_override
        w = self.effective_weight()
        if self.weight_mode == "fp":
            return w
        spec = self.weight_spec
        s, z = broadcast_qparams(w, self.w_scale, self.w_zero_point, spec)
        s, z = s.to(w.dtype), z.to(w.dtype)
        up = self.soft_rounding() if self.weight_mode == "soft" else (self.rounding >= 0).to(w.dtype)
        q = torch.clamp(floor_ste(w / s) + up + z, spec.qmin, spec.qmax)
        return (q - z) * s

    def quantized_input(self, x: Tensor) -> Tensor:
        if self.shift is not None:
            x = x - self.shift if self.factors is None else (x - self.shift) / self.factors
        if not self.act_quant or self.act_spec is None:
            return x
        if self.act_scale is None:
            xq = fake_quantize_per_token(x, self.act_spec)
        else:
            xq = fake_quantize(x, self.act_scale.abs().clamp_min(SCALE_FLOOR), self.act_zero_point, self.act_spec)
        if self.training and self.drop_prob > 0:
            keep_float = keep_float_mask(x.shape, self.drop_prob, self.generator, self.share)
            xq = torch.where(keep_float, x, xq)
        return xq

    def forward_state(self) -> tuple:
        """What the output depends on besides the input: modes and every tensor's in-place version.

        Equal states give bitwise equal outputs; a learning step or a loaded state changes it.
        """
        tensors = (*self.parameters(), *self.buffers())
        return (self.weight_mode, self.act_quant, self.drop_prob if self.training else 0.0,
                tuple((id(t), t._version) for t in tensors))

    def weight_codes(self) -> tuple[Tensor, Tensor, Tensor]:
        """Integer codes of the learned (hard) rounding, with the weight's scale and zero point."""
        with torch.no_grad():
            w = self.effective_weight()
            s, z = broadcast_qparams(w, self.w_scale, self.w_zero_point, self.weight_spec)
            q = torch.clamp((w / s).floor() + (self.rounding >= 0).to(w.dtype) + z,
                            self.weight_spec.qmin, self.weight_spec.qmax)
        return q.to(torch.int8), self.w_scale.clone(), self.w_zero_point.clone()

    def activation_qparams(self) -> tuple[Tensor, Tensor] | None:
        if self.act_scale is None:
            return None
        return self.act_scale.detach().abs().clamp_min(SCALE_FLOOR).clone(), self.act_zero_point.clone()
