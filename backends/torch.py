"""Torch backend: the fake-quant reference, and real int8 GEMMs for W8A8-style linears.

The reference is the quantized graph itself (``ditq::quant_linear`` runs in float on the
integer grid). ``lower_int8`` replaces eligible linears by an :class:`Int8Linear` module that
multiplies integer codes with integer accumulation:

    y = s_a s_w * (sum_k (q_x - z_a) q_w) + b,     q_x = clamp(round(x / s_a) + z_a, qmin, qmax)

Eligible: symmetric weights (``z_w = 0``) per channel or per tensor with at most 8 bits, and
a static per-tensor activation quantizer with at most 8 bits. Kernels:

* CUDA: ``torch._int_mm`` (int8 x int8 -> int32).
* CPU: FBGEMM's u8 x s8 GEMM with fp32 output. Our signed activation codes map to its
  unsigned ones by ``u = q + 128`` (zero point ``z_a + 128``). We measured
  (``bench/int8_gemm.py``) that ``torch._int_mm`` has no fast CPU kernel in torch 2.13 (about
  100x slower than fp32 at DiT-XL sizes), while FBGEMM is about 1.6x faster than fp32. torch has
  deprecated the quantized-tensor API this entry point needs (it still works in 2.13).

FBGEMM is exact only where it cannot overflow. With AVX512-VNNI it accumulates u8 x s8 products
straight into int32. Without it (AVX2), ``vpmaddubsw`` first adds two neighbouring products
into a saturating int16, so a layer is lowered only if no pair can overflow for any input:

    u_max * (|q_w|_(1) + |q_w|_(2)) <= 32767        per output row, the two largest weight codes

(W8A8 breaks it; W7A8 and W4A8 satisfy it.) As a second guard the lowered kernel is probed
against exact integer arithmetic on codes spread over the whole grid. A layer that fails
either check keeps the reference op and the reason is reported.

The kernel quantizes activations as ``round(x * (1 / s_a))`` where the reference divides, so at
an exact rounding tie one activation code may differ by one step; everything else is exact.
"""

from __future__ import annotations

import itertools
import warnings
import weakref

import torch
from torch import Tensor, fx

import ditq_compiler.ops  # noqa: F401  (registers the ditq:: ops)
from ditq_compiler.backends.registry import register_backend
from ditq_compiler.pipeline import copy_graph, fetch_attr
from ditq_compiler import meta

PROBE_TOLERANCE_STEPS = 0.5

# FBGEMM's packed weights, by key: the op below takes the key, since torch.compile cannot trace a call that
# passes the packed ScriptObject itself. Each Int8Linear registers its own and removes it when collected.
_PACKED: dict[int, object] = {}
_KEYS = itertools.count()


@torch.library.custom_op("ditq_kernels::fbgemm_int8_linear", mutates_args=())
def fbgemm_int8_linear(x: Tensor, a_scale: float, a_zero_point: int, packed: int, out_features: int) -> Tensor:
    """FBGEMM's u8 x s8 linear with fp32 output on the weights packed under ``packed`` (module docs)."""
    return torch.ops.quantized.linear_with_input_q_dq_qweight_dq_output_fp32(x.contiguous(), a_scale, a_zero_point,
                                                                            _PACKED[packed])


@fbgemm_int8_linear.register_fake
def _(x: Tensor, a_scale: float, a_zero_point: int, packed: int, out_features: int) -> Tensor:
    return x.new_empty((*x.shape[:-1], out_features))


class Int8Linear(torch.nn.Module):
    """A linear with int8 weight codes and a static per-tensor int8 activation quantizer."""

    def __init__(self, w_codes: Tensor, w_scale: Tensor, bias: Tensor | None, a_scale: Tensor,
                 a_zero_point: Tensor, a_bits: int):
        super().__init__()
        self.out_features, self.in_features = w_codes.shape
        self.a_scale = float(a_scale)
        self.a_zero_point = int(a_zero_point)
        self.qmin, self.qmax = -(2 ** (a_bits - 1)), 2 ** (a_bits - 1) - 1
        w_scale = w_scale.expand(self.out_features) if w_scale.dim() == 0 else w_scale
        self.register_buffer("w_codes_t", w_codes.t().contiguous())               # (K, N) for _int_mm
        self.register_buffer("w_scale", w_scale.float())
        self.register_buffer("bias", None if bias is None else bias.detach().float())
        self.register_buffer("w_colsum", w_codes.int().sum(1))                     # for the zero point
        with warnings.catch_warnings():  # torch deprecates quantized tensors (the FBGEMM entry point)
            warnings.filterwarnings("ignore", message=".*quantized tensor creation functions.*")
            weight = torch._make_per_channel_quantized_tensor(
                w_codes.to(torch.int8), w_scale.double(), torch.zeros(self.out_features, dtype=torch.long), 0)
            self._packed = torch.ops.quantized.linear_prepack(weight, self.bias)
        self._register_packed()

    def _register_packed(self) -> None:
        self._key = next(_KEYS)
        _PACKED[self._key] = self._packed
        weakref.finalize(self, _PACKED.pop, self._key, None)

    def __setstate__(self, state: dict) -> None:   # a copy gets its own key
        super().__setstate__(state)
        self._register_packed()

    def _clamp(self, x: Tensor) -> Tensor:
        """Clamp to the representable range so the kernel's own rounding stays on our grid."""
        lo = (self.qmin - self.a_zero_point) * self.a_scale
        hi = (self.qmax - self.a_zero_point) * self.a_scale
        return x.clamp(lo, hi)

    def forward(self, x: Tensor) -> Tensor:
        x = self._clamp(x.float())
        if x.is_cuda:
            return self._forward_int_mm(x)
        return fbgemm_int8_linear(x, self.a_scale, self.a_zero_point + 128, self._key, self.out_features)

    def _forward_int_mm(self, x: Tensor) -> Tensor:
        lead = x.shape[:-1]
        codes = (torch.round(x.reshape(-1, self.in_features) / self.a_scale) + self.a_zero_point).to(torch.int8)
        acc = torch._int_mm(codes, self.w_codes_t) - self.a_zero_point * self.w_colsum
        y = acc.float() * (self.a_scale * self.w_scale)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*lead, self.out_features)


INT16_MAX = 32767


def cpu_has_vnni() -> bool:
    """Whether FBGEMM can accumulate u8 x s8 in int32 directly (AVX512-VNNI)."""
    try:
        with open("/proc/cpuinfo") as f:
            return any(line.startswith("flags") and "avx512_vnni" in line.split() for line in f)
    except OSError:
        return False


def pair_sum_bound(w_codes: Tensor, a_qmax: int) -> int:
    """Largest |u1 w1 + u2 w2| any input can produce, u = activation code + 128 in [0, a_qmax + 128]."""
    top2 = w_codes.int().abs().topk(min(2, w_codes.shape[1]), dim=1).values.sum(1)
    return int(top2.max()) * (a_qmax + 128)


def _ineligible(node: fx.Node, gm: fx.GraphModule) -> str | None:
    x, w_codes, w_scale, w_zp, bias, a_scale, a_zp, a_bits, a_per_token = node.args
    if a_bits == 0 or a_per_token:
        return "activations not static per-tensor"
    if fetch_attr(gm, w_scale.target).dim() > 1:
        return "per-group weights"
    if bool(fetch_attr(gm, w_zp.target).ne(0).any()):
        return "asymmetric weights"
    return None


def _probe(module: Int8Linear, generator: torch.Generator) -> float:
    """Largest kernel error, in output steps, against the exact integer result (float64).

    The activations are codes spread uniformly over the whole grid: the worst case for
    saturation. Exact arithmetic is off by at most fp32 rounding of the output (far below
    half a step); a saturating kernel is off by thousands of steps.
    """
    codes = torch.randint(module.qmin, module.qmax + 1, (64, module.in_features), generator=generator)
    x = (codes - module.a_zero_point).float() * module.a_scale
    integer = (codes - module.a_zero_point).double() @ module.w_codes_t.double()
    exact = integer * module.a_scale * module.w_scale.double()
    if module.bias is not None:
        exact = exact + module.bias.double()
    step = module.a_scale * float(module.w_scale.max())
    return float((module(x).double() - exact).abs().max()) / step


def lower_int8(gm: fx.GraphModule, vnni: bool | None = None) -> tuple[fx.GraphModule, dict[str, str]]:
    """Replace eligible ``ditq::quant_linear`` nodes by int8 kernels; report each layer's kernel.

    ``vnni``: whether the CPU has AVX512-VNNI (None: read it from the CPU).
    """
    vnni = cpu_has_vnni() if vnni is None else vnni
    kernels: dict[str, str] = {}
    generator = torch.Generator().manual_seed(0)
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target is not torch.ops.ditq.quant_linear.default:
            continue
        source = meta.get(node).source_node
        reason = _ineligible(node, gm)
        if reason:
            kernels[source] = f"reference ({reason})"
            continue
        values = [fetch_attr(gm, a.target).detach() if isinstance(a, fx.Node) and a.op == "get_attr" else a
                  for a in node.args]
        _, w_codes, w_scale, _, bias, a_scale, a_zp, a_bits, _ = values
        module = Int8Linear(w_codes, w_scale, bias, a_scale, a_zp, a_bits)
        bound = pair_sum_bound(w_codes, module.qmax)
        if not (vnni or w_codes.is_cuda) and bound > INT16_MAX:
            kernels[source] = f"reference (no VNNI: int16 pair sums reach {bound} > {INT16_MAX})"
            continue
        error = _probe(module, generator)
        if error > PROBE_TOLERANCE_STEPS:
            kernels[source] = f"reference (int8 kernel off by {error:.3g} steps on this CPU)"
            continue
        name = f"ditq_int8_{node.name}"
        gm.add_submodule(name, module)
        with gm.graph.inserting_after(node):
            new = gm.graph.call_module(name, (node.args[0],))
        new.meta.update(node.meta)
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)
        kernels[source] = "int8 (cuda _int_mm)" if w_codes.is_cuda else "int8 (fbgemm)"
    gm.graph.eliminate_dead_code()
    gm.recompile()
    return gm, kernels


@register_backend("torch", "the fake-quant reference: every quantized op in float on the integer grid")
def lower_reference(gm: fx.GraphModule) -> tuple[fx.GraphModule, dict[str, str]]:
    return gm, {}


@register_backend("torch-int8", "real int8 GEMMs where they are exact (FBGEMM on CPU, torch._int_mm on CUDA)")
def lower_torch_int8(gm: fx.GraphModule) -> tuple[fx.GraphModule, dict[str, str]]:
    return lower_int8(copy_graph(gm))
