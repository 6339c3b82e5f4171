"""W8A8 linear in Triton: int8 x int8 -> int32 ``tl.dot`` with the activation quantizer and the
dequantization fused around it.

Math. ``x`` is viewed as ``(M, K)``; the weight is stored as int8 codes ``q_w`` of shape ``(N, K)``
(the ``nn.Linear`` layout, K contiguous: the layout Hopper's 8-bit tensor-core instructions want
for the B operand) with symmetric per-output-channel scales ``s_w`` (fp32, ``(N,)``). The input
activation quantizer of row m has scale ``s_a[m]`` and zero point ``z_a[m]`` (one value for the
whole tensor, or one per time group, see ``ditq_compiler.kernels.rows``), on the signed
``a_bits`` grid ``[qmin, qmax] = [-2^(a-1), 2^(a-1) - 1]``:

    q_x[m, k] = clamp(rint(x[m, k] / s_a[m]) + z_a[m], qmin, qmax)        fp32, round half to even
    acc[m, n] = sum_k q_x[m, k] q_w[n, k]                                  int32, exact
    y[m, n]   = (acc[m, n] - z_a[m] colsum[n]) * s_a[m] * s_w[n] + b[n]    fp32, then cast to x's dtype

with ``colsum[n] = sum_k q_w[n, k]`` precomputed, so ``acc - z_a colsum = sum_k (q_x - z_a) q_w``,
the integer form of ``linear(x_hat, W_hat)`` in ``ditq::quant_linear``. The codes match the
reference's ``round(x / s) + z`` bit for bit (IEEE division ``div_rn``, round half to even), and
the int32 accumulator is exact while ``K * 255 * 128 < 2^31`` (K <= 65536); the epilogue rounds
like any fp32 arithmetic.

Where the activation is quantized (``QUANTIZE_X``):

* prologue (``ditq_cuda::w8a8_linear``): the kernel loads float ``x`` tiles and quantizes them in
  registers before each ``tl.dot``. One launch, ``x`` read in its own dtype; but each ``x`` tile is
  quantized again by every column block of the output (N / BLOCK_N times).
* producer (``ditq_cuda::w8a8_linear_codes``): the caller quantizes ``x`` with torch ops
  (``quantize_codes``) and the kernel reads int8 codes. Under ``torch.compile`` Inductor fuses those
  ops into the kernel that produces ``x`` (a LayerNorm + modulation, a GELU), so the quantization
  costs no extra pass and the GEMM reads 1 byte per element.

Both are ``torch.library.triton_op`` operators on a GPU build, so ``torch.compile`` sees the Triton
kernel (and launches it from Inductor's wrapper) rather than an opaque Python call. Under Triton's
interpreter (``TRITON_INTERPRET=1`` before triton is imported) they are plain ``custom_op``s that
run the interpreted kernel with one fixed small tile, on CPU tensors; without CUDA and without the
interpreter they raise ``CudaBackendError`` naming the layer.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ditq_compiler.activation_ops import select_rows
from ditq_compiler.kernels.device import CudaBackendError, needs_cuda
from ditq_compiler.kernels.rows import row_entries

try:
    import triton
    import triton.language as tl
except ImportError:      # the ops still register; calling them raises CudaBackendError
    triton = None

MAX_K = 65536            # K * 255 * 128 < 2^31: the int32 accumulator cannot overflow

# GPU tiles (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) autotuned per (M, N, K): H100-sized,
# int8 tiles of 128 along K fill the 8-bit tensor-core instructions; the small ones are for small M.
GPU_TILES = ((128, 256, 128, 8, 3), (128, 128, 128, 8, 4), (128, 128, 64, 4, 4), (64, 128, 128, 4, 4),
             (128, 64, 128, 4, 4), (64, 64, 128, 4, 3))
# the interpreter runs each program step in numpy (about 5 ms each, whatever the tile): tiles small enough
# that odd test shapes (33, 65) span several, large enough to keep a small model under a few seconds
INTERPRETER_TILE = dict(BLOCK_M=32, BLOCK_N=32, BLOCK_K=32, GROUP_M=2)


if triton is not None:
    # keep the names `tl` and `libdevice`: under torch.compile Inductor re-emits this kernel's source in a module
    # of its own whose header imports those two names (and nothing else of ours)
    try:
        from triton.language.extra import libdevice
    except ImportError:  # older layouts
        from triton.language.extra.cuda import libdevice

    @triton.jit
    def _w8a8_kernel(x_ptr, w_ptr, out_ptr, w_scale_ptr, w_colsum_ptr, bias_ptr, a_scale_ptr, a_zero_ptr,
                     M, N, K, rows_per_entry, stride_xm, stride_xk, stride_wn, stride_wk, stride_om, stride_on,
                     qmin, qmax, QUANTIZE_X: tl.constexpr, HAS_BIAS: tl.constexpr, LIBDEVICE_RINT: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
        # program -> output tile, GROUP_M row blocks at a time so neighbouring programs share W in L2
        pid = tl.program_id(0)
        blocks_m = tl.cdiv(M, BLOCK_M)
        blocks_n = tl.cdiv(N, BLOCK_N)
        per_group = GROUP_M * blocks_n
        first_m = (pid // per_group) * GROUP_M
        group_rows = tl.minimum(blocks_m - first_m, GROUP_M)
        pid_m = first_m + (pid % per_group) % group_rows
        pid_n = (pid % per_group) // group_rows

        rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        rk = tl.arange(0, BLOCK_K)
        m_mask = rm < M
        n_mask = rn < N
        # activation quantizer of each row: entry m // rows_per_entry of the per-sample tables
        s_a = tl.load(a_scale_ptr + rm // rows_per_entry, mask=m_mask, other=1.0)
        z_a = tl.load(a_zero_ptr + rm // rows_per_entry, mask=m_mask, other=0.0)

        x_ptrs = x_ptr + rm[:, None] * stride_xm + rk[None, :] * stride_xk
        w_ptrs = w_ptr + rn[None, :] * stride_wn + rk[:, None] * stride_wk      # a (BLOCK_K, BLOCK_N) view of W^T
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
        for k in range(0, tl.cdiv(K, BLOCK_K)):
            k_mask = rk < K - k * BLOCK_K
            x = tl.load(x_ptrs, mask=m_mask[:, None] & k_mask[None, :], other=0)
            if QUANTIZE_X:
                v = tl.math.div_rn(x.to(tl.float32), tl.broadcast_to(s_a[:, None], (BLOCK_M, BLOCK_K)))
                if LIBDEVICE_RINT:
                    r = libdevice.rint(v)
                else:            # round half to even from floor (the interpreter has no libdevice)
                    f = tl.floor(v)
                    d = v - f
                    odd = (f - 2.0 * tl.floor(0.5 * f)) != 0.0
                    r = tl.where((d > 0.5) | ((d == 0.5) & odd), f + 1.0, f)
                q = tl.minimum(tl.maximum(r + z_a[:, None], qmin), qmax).to(tl.int8)
            else:
                q = x
            # masked K columns: x's code is z_a there, but W is 0, so they add nothing
            w = tl.load(w_ptrs, mask=k_mask[:, None] & n_mask[None, :], other=0)
            acc = tl.dot(q, w, acc, out_dtype=tl.int32)
            x_ptrs += BLOCK_K * stride_xk
            w_ptrs += BLOCK_K * stride_wk

        colsum = tl.load(w_colsum_ptr + rn, mask=n_mask, other=0)
        s_w = tl.load(w_scale_ptr + rn, mask=n_mask, other=0.0)
        centered = acc - z_a.to(tl.int32)[:, None] * colsum[None, :]
        y = centered.to(tl.float32) * s_a[:, None] * s_w[None, :]
        if HAS_BIAS:
            y += tl.load(bias_ptr + rn, mask=n_mask, other=0.0)[None, :]
        out_ptrs = out_ptr + rm[:, None] * stride_om + rn[None, :] * stride_on
        tl.store(out_ptrs, y.to(out_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])

    from triton.runtime.interpreter import InterpretedFunction

    INTERPRETED = isinstance(_w8a8_kernel, InterpretedFunction)
    if not INTERPRETED:
        _w8a8_autotuned = triton.autotune(
            configs=[triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8},
                                   num_warps=warps, num_stages=stages)
                     for bm, bn, bk, warps, stages in GPU_TILES],
            key=["M", "N", "K", "QUANTIZE_X"])(_w8a8_kernel)
else:
    INTERPRETED = False


def _check_runnable(x: Tensor, layer: str) -> None:
    """Raise ``CudaBackendError`` unless the kernel can run on ``x``: a CUDA tensor, or the interpreter."""
    if triton is None and x.is_cuda:
        raise CudaBackendError(f"layer '{layer}' was compiled for the 'cuda' backend, whose kernels need triton: "
                               "pip install triton")
    if triton is None:
        raise needs_cuda(layer, x, "and triton is not installed")
    if not x.is_cuda and not INTERPRETED:
        raise needs_cuda(layer, x)


def _check_operands(layer: str, x: Tensor, w_codes: Tensor, w_scale: Tensor, w_colsum: Tensor,
                    bias: Optional[Tensor], a_bits: int) -> None:
    n, k = w_codes.shape if w_codes.dim() == 2 else (None, None)
    problems = []
    if w_codes.dtype != torch.int8 or w_codes.dim() != 2:
        problems.append(f"weight codes must be a 2-D int8 (N, K) tensor, got {w_codes.dtype} {tuple(w_codes.shape)}")
    elif x.shape[-1] != k:
        problems.append(f"input has {x.shape[-1]} features, the weight {k}")
    elif k > MAX_K:
        problems.append(f"K = {k} > {MAX_K} can overflow the int32 accumulator")
    if w_scale.shape != (n,) or w_scale.dtype != torch.float32:
        problems.append(f"weight scales must be fp32 of shape ({n},), got {w_scale.dtype} {tuple(w_scale.shape)}")
    if w_colsum.shape != (n,) or w_colsum.dtype != torch.int32:
        problems.append(f"weight column sums must be int32 of shape ({n},), got {w_colsum.dtype} "
                        f"{tuple(w_colsum.shape)}")
    if bias is not None and (bias.shape != (n,) or bias.dtype != torch.float32):
        problems.append(f"bias must be fp32 of shape ({n},), got {bias.dtype} {tuple(bias.shape)}")
    if not 2 <= a_bits <= 8:
        problems.append(f"activation bits must be 2..8, got {a_bits}")
    elsewhere = sorted({str(t.device) for t in (w_codes, w_scale, w_colsum, bias) if t is not None} - {str(x.device)})
    if elsewhere:
        problems.append(f"the input is on {x.device}, the layer's constants on {', '.join(elsewhere)}")
    if problems:
        raise ValueError(f"layer '{layer}': " + "; ".join(problems))


def _launch(x2d: Tensor, w_codes: Tensor, w_scale: Tensor, w_colsum: Tensor, bias: Optional[Tensor],
            a_scale_rows: Tensor, a_zero_rows: Tensor, rows_per_entry: int, a_bits: int, out: Tensor,
            quantize: bool) -> None:
    """Run the kernel on ``x2d`` (M, K), float (``quantize``) or int8 codes, into ``out`` (M, N)."""
    m, k = x2d.shape
    n = w_codes.shape[0]
    args = (x2d, w_codes, out, w_scale, w_colsum, w_scale if bias is None else bias, a_scale_rows, a_zero_rows,
            m, n, k, rows_per_entry, x2d.stride(0), x2d.stride(1), w_codes.stride(0), w_codes.stride(1),
            out.stride(0), out.stride(1), -(2 ** (a_bits - 1)), 2 ** (a_bits - 1) - 1)
    flags = dict(QUANTIZE_X=quantize, HAS_BIAS=bias is not None, LIBDEVICE_RINT=not INTERPRETED)
    if INTERPRETED:
        if torch._subclasses.fake_tensor.is_fake(x2d):   # shape propagation only (torch.compile's tracing)
            return
        tile = INTERPRETER_TILE
        grid = (triton.cdiv(m, tile["BLOCK_M"]) * triton.cdiv(n, tile["BLOCK_N"]),)
        _w8a8_kernel[grid](*args, **flags, **tile)
        return

    def grid(meta):
        return (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)

    torch.library.wrap_triton(_w8a8_autotuned)[grid](*args, **flags)


def _linear(x: Tensor, w_codes: Tensor, w_scale: Tensor, w_colsum: Tensor, bias: Optional[Tensor],
            a_scale: Tensor, a_zero_point: Tensor, group: Optional[Tensor], a_bits: int, out_dtype: torch.dtype,
            layer: str, quantize: bool) -> Tensor:
    _check_runnable(x, layer)
    _check_operands(layer, x, w_codes, w_scale, w_colsum, bias, a_bits)
    (scale_rows, zero_rows), rows_per_entry = row_entries((a_scale, a_zero_point), group, x)
    x2d = x.reshape(-1, x.shape[-1])
    out = torch.empty((x2d.shape[0], w_codes.shape[0]), dtype=out_dtype, device=x.device)
    if x2d.shape[0] > 0:
        _launch(x2d, w_codes, w_scale, w_colsum, bias, scale_rows, zero_rows, rows_per_entry, a_bits, out,
                quantize)
    return out.reshape(*x.shape[:-1], w_codes.shape[0])


def _register(name: str, fn, fake):
    """A ``triton_op`` on a GPU build (torch.compile sees the kernel); an opaque ``custom_op`` otherwise."""
    if triton is not None and not INTERPRETED:
        return torch.library.triton_op(name, fn, mutates_args=())
    op = torch.library.custom_op(name, fn, mutates_args=())
    op.register_fake(fake)
    return op


def _w8a8_linear(x: Tensor, w_codes: Tensor, w_scale: Tensor, w_colsum: Tensor, bias: Optional[Tensor],
                 a_scale: Tensor, a_zero_point: Tensor, group: Optional[Tensor], a_bits: int, layer: str) -> Tensor:
    return _linear(x, w_codes, w_scale, w_colsum, bias, a_scale, a_zero_point, group, a_bits, x.dtype, layer,
                   quantize=True)


def _w8a8_linear_fake(x, w_codes, w_scale, w_colsum, bias, a_scale, a_zero_point, group, a_bits, layer):
    return x.new_empty((*x.shape[:-1], w_codes.shape[0]))


def _w8a8_linear_codes(codes: Tensor, w_codes: Tensor, w_scale: Tensor, w_colsum: Tensor, bias: Optional[Tensor],
                       a_scale: Tensor, a_zero_point: Tensor, group: Optional[Tensor], a_bits: int,
                       out_dtype: torch.dtype, layer: str) -> Tensor:
    if codes.dtype != torch.int8:
        raise ValueError(f"layer '{layer}': ditq_cuda::w8a8_linear_codes takes int8 activation codes, "
                         f"got {codes.dtype}")
    return _linear(codes, w_codes, w_scale, w_colsum, bias, a_scale, a_zero_point, group, a_bits, out_dtype, layer,
                   quantize=False)


def _w8a8_linear_codes_fake(codes, w_codes, w_scale, w_colsum, bias, a_scale, a_zero_point, group, a_bits,
                            out_dtype, layer):
    return codes.new_empty((*codes.shape[:-1], w_codes.shape[0]), dtype=out_dtype)


w8a8_linear = _register("ditq_cuda::w8a8_linear", _w8a8_linear, _w8a8_linear_fake)
w8a8_linear_codes = _register("ditq_cuda::w8a8_linear_codes", _w8a8_linear_codes, _w8a8_linear_codes_fake)


def quantize_codes(x: Tensor, a_scale: Tensor, a_zero_point: Tensor, group: Optional[Tensor], a_bits: int) -> Tensor:
    """int8 ``clamp(round(x / s) + z, qmin, qmax)`` in fp32 with each sample's (s, z) (torch ops, fusable)."""
    qmin, qmax = -(2 ** (a_bits - 1)), 2 ** (a_bits - 1) - 1
    s = select_rows(a_scale, group, x).to(torch.float32)
    z = select_rows(a_zero_point, group, x).to(torch.float32)
    return torch.clamp(torch.round(x.to(torch.float32) / s) + z, qmin, qmax).to(torch.int8)


def w8a8_linear_producer(x: Tensor, w_codes: Tensor, w_scale: Tensor, w_colsum: Tensor, bias: Optional[Tensor],
                         a_scale: Tensor, a_zero_point: Tensor, group: Optional[Tensor], a_bits: int,
                         layer: str) -> Tensor:
    """``ditq_cuda::w8a8_linear`` with the activation quantized by torch ops before the kernel (see module doc)."""
    _check_runnable(x, layer)
    codes = quantize_codes(x, a_scale, a_zero_point, group, a_bits)
    return torch.ops.ditq_cuda.w8a8_linear_codes(codes, w_codes, w_scale, w_colsum, bias, a_scale, a_zero_point,
                                                 group, a_bits, x.dtype, layer)


__all__ = ["GPU_TILES", "INTERPRETED", "INTERPRETER_TILE", "MAX_K", "quantize_codes", "w8a8_linear",
           "w8a8_linear_codes", "w8a8_linear_producer"]
