"""1-bit (W1A1) linear and conv2d on the CPU: XNOR-popcount kernels, and the torch reference that defines them.

Signs. ``sign(v; t) = -1 if v < t else +1``: ``sign(0) := +1``, NaN gives +1 (it compares false),
and ``t`` is a per-feature threshold ``tau`` (0 when absent), so ``sign(x - tau)`` is taken without
forming ``x - tau``. The comparison is in float32 (x and tau cast to it; exact for float16 and
bfloat16), or in float64 when x is float64.

Packing. :func:`pack_signs` turns ``x (..., K)`` into ``(..., W)`` words, ``W = ceil(K / 64)``, in a
``torch.int64`` tensor holding the uint64 bit patterns: bit ``j`` (least significant first) of
word ``w`` is 1 where ``sign(x[..., 64 w + j]) = -1``. Bits past K are 0.

Linear. For packed rows ``a_m`` (activations) and ``w_n`` (weights),

    acc[m, n] = sum_k sign(x[m, k]) sign(w[n, k]) = K - 2 popcount(a_m xor w_n)      (int32)

exactly; the zero padding bits agree in both operands and never count.

Conv2d (zero padding, stride, dilation, groups). An input position inside the padding is 0 and
contributes 0. Output pixel ``m`` reads ``kh * kw`` positions of packed channel words with a mask
that is all ones inside the image and 0 in the padding, so

    acc[m, o] = valid[m] - 2 popcount((a_m xor w_o) and mask_m),   valid[m] = C_in/groups x (#positions inside)

which equals ``conv2d(sign(x), sign(w))`` with zero padding (:func:`reference_binary_conv2d`).

Epilogue (optional; the output is then float32, else int32), each step rounded to float32, in
this order, which is the order of the torch expression in the reference, so results are equal
bit for bit:

    y = ((float32(acc) * row_scale[m]) * col_scale[n]) + bias[n]

``row_scale`` has one value per output row (per token; per output pixel ``(b, oh, ow)`` for the
conv), ``col_scale`` and ``bias`` one per output feature or channel.

Paths (:func:`kernel_info`): ``avx512-vpopcntdq`` and ``popcount`` run ``binary_gemm.c``, compiled on
first use (``ditq_compiler.kernels.build``: ``cc -O3 -march=x86-64-v2 -ffp-contract=off -fopenmp``,
without OpenMP if that fails, cached by source and compiler), which picks the AVX-512 path at run
time when the CPU has VPOPCNTDQ. ``torch-reference`` is plain torch (unpacks the bits and
multiplies +-1 values, exact for K <= 2^24 in float32, float64 beyond): it runs when no library
can be built, after one warning. ``$DITQ_BINARY_IMPL`` (or ``impl=``) forces a path: ``auto``,
``avx512-vpopcntdq``, ``popcount``, ``torch-reference``. ``threads`` defaults to
``torch.get_num_threads()``; results do not depend on it.

``ditq_kernels::binary_linear`` and ``ditq_kernels::binary_conv2d`` wrap the two functions as
``torch.library`` custom ops with fake kernels, so graphs calling them trace with ``torch.export``.
"""

from __future__ import annotations

import ctypes
import math
import os
import platform
import threading
import time
import warnings
from pathlib import Path
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from ditq_compiler.kernels.build import BuildError, Built, build

SOURCE = Path(__file__).with_name("binary_gemm.c")
ENV_IMPL = "DITQ_BINARY_IMPL"
AVX512, POPCOUNT, TORCH = "avx512-vpopcntdq", "popcount", "torch-reference"
IMPLS = ("auto", AVX512, POPCOUNT, TORCH)
_ISA = {"auto": 0, POPCOUNT: 1, AVX512: 2}
ABI_VERSION = 1
BASE_FLAGS = ("-O3", "-std=gnu11", "-fPIC", "-shared", "-ffp-contract=off")
EXACT_FLOAT32_K = 2 ** 24   # +-1 sums of up to this many terms are exact in float32

_u64p = ctypes.c_void_p
_i64 = ctypes.c_int64
_SIGNATURES = {
    "ditq_binary_abi_version": ([], ctypes.c_int),
    "ditq_binary_threading": ([], ctypes.c_int),
    "ditq_binary_has_avx512_vpopcntdq": ([], ctypes.c_int),
    "ditq_pack_signs": ([_u64p, _i64, _i64, _u64p, _u64p, ctypes.c_int, ctypes.c_int], ctypes.c_int),
    "ditq_binary_gemm": ([_u64p, _u64p, _u64p, _u64p, _i64, _i64, _i64, _i64, _u64p, _u64p, _u64p, _u64p, _u64p,
                          ctypes.c_int, ctypes.c_int], ctypes.c_int),
    "ditq_binary_im2col": ([_u64p, *[_i64] * 15, _u64p, _u64p, _u64p, ctypes.c_int], ctypes.c_int),
    "ditq_popcount_probe": ([_i64, ctypes.c_int, ctypes.c_int], ctypes.c_int64),
    "ditq_cycle_probe": ([_i64], ctypes.c_int64),
}


# ------------------------------------------------------------------------------------------- building

class _State:
    lock = threading.Lock()
    loaded = False
    built: Built | None = None
    failure: str | None = None


def _flag_attempts() -> list[list[str]]:
    x86 = platform.machine().lower() in ("x86_64", "amd64")
    arches = [["-march=x86-64-v2"], []] if x86 else [[]]   # [] for compilers that predate x86-64-v2
    return [[*arch, threads] for arch in arches for threads in ("-fopenmp", "-pthread")]


def _library() -> ctypes.CDLL | None:
    """The compiled kernels, built on first use; None (after one warning) when they cannot be."""
    with _State.lock:
        if not _State.loaded:
            _State.loaded = True
            try:
                built = build(SOURCE, BASE_FLAGS, _flag_attempts())
                for name, (args, result) in _SIGNATURES.items():
                    fn = getattr(built.library, name)
                    fn.argtypes, fn.restype = args, result
                if built.library.ditq_binary_abi_version() != ABI_VERSION:
                    raise BuildError(f"{built.path} has ABI {built.library.ditq_binary_abi_version()}, "
                                     f"expected {ABI_VERSION}")
                _State.built = built
            except (BuildError, OSError, AttributeError) as e:
                _State.failure = str(e)
                warnings.warn(f"ditq binary kernels: could not build {SOURCE.name} ({e}); the pure-torch "
                              f"reference runs instead (same results, much slower)", RuntimeWarning, stacklevel=4)
    return None if _State.built is None else _State.built.library


def _reset() -> None:
    """Forget the loaded library, so the next call builds (or fails) again. For tests."""
    with _State.lock:
        _State.loaded, _State.built, _State.failure = False, None, None


def _impl(impl: str | None) -> str:
    """The path a call runs: ``avx512-vpopcntdq``, ``popcount`` or ``torch-reference``."""
    impl = impl or os.environ.get(ENV_IMPL) or "auto"
    if impl not in IMPLS:
        raise ValueError(f"binary kernel impl {impl!r} (from impl= or ${ENV_IMPL}) is not one of {IMPLS}")
    if impl == TORCH:
        return TORCH
    lib = _library()
    if lib is None:
        return TORCH
    has_avx512 = bool(lib.ditq_binary_has_avx512_vpopcntdq())
    if impl == AVX512 and not has_avx512:
        raise RuntimeError(f"binary kernel impl {AVX512!r} asked for, but this CPU lacks AVX-512 VPOPCNTDQ; "
                           f"use 'auto' or {POPCOUNT!r}")
    if impl == "auto":
        return AVX512 if has_avx512 else POPCOUNT
    return impl


def _threads(threads: int | None) -> int:
    threads = torch.get_num_threads() if threads is None or threads == 0 else threads
    if threads < 1:
        raise ValueError(f"threads must be positive, got {threads}")
    return int(threads)


def kernel_info(impl: str | None = None) -> dict:
    """Which path runs (``avx512-vpopcntdq`` / ``popcount`` / ``torch-reference``), threads, and how it was built."""
    path = _impl(impl)
    lib = _library()
    built = _State.built
    return {
        "path": path,
        "threads": _threads(None),
        "threading": None if lib is None else {1: "openmp", 2: "pthreads"}[lib.ditq_binary_threading()],
        "cpu_has_avx512_vpopcntdq": None if lib is None else bool(lib.ditq_binary_has_avx512_vpopcntdq()),
        "library": None if built is None else str(built.path),
        "compiler": None if built is None else f"{built.compiler} ({built.compiler_version})",
        "flags": None if built is None else " ".join([*BASE_FLAGS, *built.flags]),
        "build_failure": _State.failure,
    }


def _check(code: int, what: str) -> None:
    if code == 0:
        return
    if code == -1:
        raise RuntimeError(f"{what}: the CPU cannot run the requested instruction set")
    if code == -2:
        raise MemoryError(f"{what}: out of memory for the kernel's scratch buffers")
    raise ValueError(f"{what}: the kernel rejected its arguments (code {code}); this is a bug in binary_cpu.py")


def _require_cpu(what: str, *tensors: Tensor | None) -> None:
    for t in tensors:
        if t is not None and t.device.type != "cpu":
            raise ValueError(f"{what}: these are CPU kernels, got a tensor on {t.device}")


def _ptr(t: Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


# ------------------------------------------------------------------------------------------ reference

def _compute_dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def reference_signs(x: Tensor, tau: Tensor | None = None) -> Tensor:
    """``-1`` where ``x < tau`` (``tau`` per last-dim feature, 0 when None), else ``+1``; in x's compute dtype."""
    dtype = _compute_dtype(x)
    x = x.to(dtype)
    threshold = torch.zeros((), dtype=dtype) if tau is None else tau.to(dtype)
    return torch.where(x < threshold, -1.0, 1.0).to(dtype)


def _reference_epilogue(acc: Tensor, row_scale: Tensor | None, col_scale: Tensor | None, bias: Tensor | None,
                        row_shape: Sequence[int], col_shape: Sequence[int]) -> Tensor:
    if row_scale is None and col_scale is None and bias is None:
        return acc
    y = acc.to(torch.float32)
    if row_scale is not None:
        y = y * row_scale.to(torch.float32).reshape(row_shape)
    if col_scale is not None:
        y = y * col_scale.to(torch.float32).reshape(col_shape)
    if bias is not None:
        y = y + bias.to(torch.float32).reshape(col_shape)
    return y


def reference_binary_linear(x: Tensor, w_sign: Tensor, tau_x: Tensor | None = None, row_scale: Tensor | None = None,
                            col_scale: Tensor | None = None, bias: Tensor | None = None) -> Tensor:
    """``sign(x - tau_x) @ sign(w_sign).T`` exactly (int32), then the float32 epilogue when any of its terms is given.

    ``x (..., K)``, ``w_sign (N, K)`` (its sign is taken, threshold 0), ``row_scale`` with ``x``'s
    leading shape (one per row), ``col_scale``/``bias`` ``(N,)``.
    """
    sx = reference_signs(x, tau_x).to(torch.float64)
    sw = reference_signs(w_sign).to(torch.float64)
    acc = (sx @ sw.T).round().to(torch.int32)   # +-1 products, integer sums far below 2^53: exact
    return _reference_epilogue(acc, row_scale, col_scale, bias, (*x.shape[:-1], 1), (-1,))


def reference_binary_conv2d(x: Tensor, w_sign: Tensor, tau_x: Tensor | None = None, stride=1, padding=0, dilation=1,
                            groups: int = 1, row_scale: Tensor | None = None, col_scale: Tensor | None = None,
                            bias: Tensor | None = None) -> Tensor:
    """``conv2d(sign(x - tau_x), sign(w_sign))``, zero padding contributing 0, exact (int32); then the epilogue.

    ``x (B, C, H, W)``, ``tau_x (C,)``, ``w_sign (O, C / groups, kh, kw)``, ``row_scale`` one per output
    pixel ``(B, OH, OW)``, ``col_scale``/``bias`` ``(O,)``.
    """
    tau = None if tau_x is None else tau_x.reshape(-1, 1, 1)
    sx = reference_signs(x, tau).to(torch.float64)
    sw = reference_signs(w_sign).to(torch.float64)
    acc = F.conv2d(sx, sw, None, stride, padding, dilation, groups).round().to(torch.int32)
    b, _, oh, ow = acc.shape
    return _reference_epilogue(acc, row_scale, col_scale, bias, (b, 1, oh, ow), (1, -1, 1, 1))


def _pack_torch(x: Tensor, tau: Tensor | None) -> Tensor:
    k = x.shape[-1]
    words = -(-k // 64)
    bits = (reference_signs(x, tau) < 0).to(torch.int64)
    bits = F.pad(bits, (0, words * 64 - k)).reshape(*x.shape[:-1], words, 64)
    return (bits << torch.arange(64, dtype=torch.int64)).sum(-1)   # distinct powers of 2: the sum is the OR


def _unpack_signs(packed: Tensor, k: int, dtype: torch.dtype) -> Tensor:
    """+-1 values (``dtype``) of the first ``k`` bits of each row of words."""
    bits = (packed.unsqueeze(-1) >> torch.arange(64, dtype=torch.int64)) & 1
    bits = bits.reshape(*packed.shape[:-1], -1)[..., :k]
    return (1 - 2 * bits).to(dtype)


def _exact_dtype(k: int) -> torch.dtype:
    return torch.float32 if k <= EXACT_FLOAT32_K else torch.float64


# ------------------------------------------------------------------------------------------- packing

def _words(k: int) -> int:
    return -(-k // 64)


def _tail_mask(k: int) -> int:
    """The bits of the last word that hold features, as a signed int64 (all ones when K is a multiple of 64)."""
    r = k % 64
    return -1 if r == 0 else (1 << r) - 1


def _check_packed(packed: Tensor, k: int, what: str) -> None:
    if packed.dtype != torch.int64:
        raise TypeError(f"{what}: packed signs are torch.int64 words (from pack_signs), got {packed.dtype}")
    if packed.shape[-1] != _words(k):
        raise ValueError(f"{what}: K = {k} needs {_words(k)} words per row, got {packed.shape[-1]}")
    tail = _tail_mask(k)
    if tail != -1 and packed.numel() and bool((packed[..., -1] & ~tail).ne(0).any()):
        raise ValueError(f"{what}: bits past K = {k} must be 0 (pack with pack_signs)")


def pack_signs(x: Tensor, tau: Tensor | None = None, *, threads: int | None = None,
               impl: str | None = None) -> tuple[Tensor, int]:
    """``(packed, K)``: the signs of ``x (..., K)`` (``-1`` where ``x < tau``) as ``(..., ceil(K / 64))`` int64 words.

    See the module docstring for the bit layout. ``tau`` is ``(K,)`` or None (threshold 0).
    """
    if not x.is_floating_point():
        raise TypeError(f"pack_signs: x must be a floating tensor, got {x.dtype}")
    if x.dim() < 1 or x.shape[-1] < 1:
        raise ValueError(f"pack_signs: x needs a last dimension of at least 1 feature, got shape {tuple(x.shape)}")
    k = x.shape[-1]
    if tau is not None and tuple(tau.shape) != (k,):
        raise ValueError(f"pack_signs: tau must have shape ({k},), got {tuple(tau.shape)}")
    path = _impl(impl)
    if path == TORCH or x.dtype == torch.float64 or x.device.type != "cpu":
        return _pack_torch(x, tau), k
    lead = x.shape[:-1]
    x2 = x.detach().to(torch.float32).reshape(-1, k).contiguous()
    t = None if tau is None else tau.detach().to(device="cpu", dtype=torch.float32).contiguous()
    out = torch.empty(x2.shape[0], _words(k), dtype=torch.int64)
    if x2.shape[0]:
        _check(_library().ditq_pack_signs(_ptr(x2), x2.shape[0], k, _ptr(t), _ptr(out), _ISA[path],
                                          _threads(threads)), "pack_signs")
    return out.reshape(*lead, _words(k)), k


def pack_conv_weight(weight: Tensor) -> Tensor:
    """Conv weights ``(O, C, kh, kw)`` as ``(O, kh, kw, ceil(C / 64))`` words: signs (threshold 0) packed along C."""
    if weight.dim() != 4:
        raise ValueError(f"pack_conv_weight: weight must be (O, C, kh, kw), got shape {tuple(weight.shape)}")
    packed, _ = pack_signs(weight.permute(0, 2, 3, 1))
    return packed.contiguous()


# --------------------------------------------------------------------------------------------- GEMM

def _as_vector(t: Tensor | None, n: int, what: str) -> Tensor | None:
    if t is None:
        return None
    if t.numel() != n:
        raise ValueError(f"{what} must have {n} values, got shape {tuple(t.shape)}")
    return t.detach().to(device="cpu", dtype=torch.float32).reshape(n).contiguous()


def _gemm(a: Tensor, b: Tensor, k: int, path: str, threads: int, mask: Tensor | None = None,
          valid: Tensor | None = None, row_scale: Tensor | None = None, col_scale: Tensor | None = None,
          bias: Tensor | None = None) -> Tensor:
    """``(M, N)``: ``valid - 2 popcount((a xor b) and mask)`` (``valid = k`` without a mask), then the epilogue."""
    m, n = a.shape[0], b.shape[0]
    epilogue = row_scale is not None or col_scale is not None or bias is not None
    if path == TORCH:   # linears only: the conv's reference path is _conv_torch
        assert mask is None
        dtype = _exact_dtype(k)
        acc = (_unpack_signs(a, k, dtype) @ _unpack_signs(b, k, dtype).T).round().to(torch.int32)
        return _reference_epilogue(acc, row_scale, col_scale, bias, (-1, 1), (-1,))
    out = torch.empty(m, n, dtype=torch.float32 if epilogue else torch.int32)
    code = _library().ditq_binary_gemm(
        _ptr(a), _ptr(mask), _ptr(valid), _ptr(b), m, n, a.shape[1], k, None if epilogue else _ptr(out),
        _ptr(out) if epilogue else None, _ptr(row_scale), _ptr(col_scale), _ptr(bias), _ISA[path], threads)
    _check(code, "binary_gemm")
    return out


def binary_linear(x: Tensor, w_packed: Tensor, k: int, *, tau: Tensor | None = None, row_scale: Tensor | None = None,
                  col_scale: Tensor | None = None, bias: Tensor | None = None, threads: int | None = None,
                  impl: str | None = None) -> Tensor:
    """``sign(x - tau) @ sign(w).T`` on packed signs: int32 ``(..., N)``, or float32 through the epilogue.

    ``x``: float ``(..., K)`` (packed here, with ``tau``), or int64 words ``(..., W)`` from
    :func:`pack_signs` (then ``tau`` must be None). ``w_packed``: ``(N, W)`` from ``pack_signs(w)``.
    ``row_scale``: one per row of ``x`` (``x``'s leading shape); ``col_scale``, ``bias``: ``(N,)``.
    """
    if w_packed.dim() != 2:
        raise ValueError(f"binary_linear: w_packed must be (N, words), got shape {tuple(w_packed.shape)}")
    _require_cpu("binary_linear", x, w_packed, tau, row_scale, col_scale, bias)
    _check_packed(w_packed, k, "binary_linear weights")
    path = _impl(impl)
    threads = _threads(threads)
    if x.dtype == torch.int64:
        if tau is not None:
            raise ValueError("binary_linear: tau applies when packing; x is already packed")
        _check_packed(x, k, "binary_linear input")
        packed = x
    else:
        if x.shape[-1] != k:
            raise ValueError(f"binary_linear: x has {x.shape[-1]} features, the weights {k}")
        packed, _ = pack_signs(x, tau, threads=threads, impl=path)
    lead = packed.shape[:-1]
    a = packed.reshape(-1, packed.shape[-1]).contiguous()
    n = w_packed.shape[0]
    out = _gemm(a, w_packed.contiguous(), k, path, threads, row_scale=_as_vector(row_scale, a.shape[0], "row_scale"),
                col_scale=_as_vector(col_scale, n, "col_scale"), bias=_as_vector(bias, n, "bias"))
    return out.reshape(*lead, n)


# --------------------------------------------------------------------------------------------- conv

def _pair(v, what: str) -> tuple[int, int]:
    if isinstance(v, str):
        raise ValueError(f"binary_conv2d: {what}={v!r} is not supported; give integers")
    pair = (v, v) if isinstance(v, int) else tuple(int(i) for i in v)
    if len(pair) != 2:
        raise ValueError(f"binary_conv2d: {what} must be an int or a pair, got {v!r}")
    return pair


def conv_output_size(size: int, kernel: int, stride: int, padding: int, dilation: int) -> int:
    return (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1


def binary_conv2d(x: Tensor, w_packed: Tensor, *, stride=1, padding=0, dilation=1, groups: int = 1,
                  tau: Tensor | None = None, row_scale: Tensor | None = None, col_scale: Tensor | None = None,
                  bias: Tensor | None = None, threads: int | None = None, impl: str | None = None) -> Tensor:
    """``conv2d(sign(x - tau), sign(w))``, zero padding contributing 0: int32 ``(B, O, OH, OW)``, or float32 (epilogue).

    ``x``: float ``(B, C, H, W)``; ``w_packed``: ``(O, kh, kw, ceil(C / groups / 64))`` from
    :func:`pack_conv_weight`; ``tau``: ``(C,)``; ``row_scale``: one per output pixel, ``(B, OH, OW)``
    order; ``col_scale``, ``bias``: ``(O,)``. Groups run one GEMM each.
    """
    if x.dim() != 4 or not x.is_floating_point():
        raise ValueError(f"binary_conv2d: x must be a float (B, C, H, W) tensor, got {x.dtype} {tuple(x.shape)}")
    if w_packed.dim() != 4 or w_packed.dtype != torch.int64:
        raise ValueError(f"binary_conv2d: w_packed must be int64 (O, kh, kw, words) from pack_conv_weight, got "
                         f"{w_packed.dtype} {tuple(w_packed.shape)}")
    _require_cpu("binary_conv2d", x, w_packed, tau, row_scale, col_scale, bias)
    (sh, sw), (ph, pw), (dh, dw) = _pair(stride, "stride"), _pair(padding, "padding"), _pair(dilation, "dilation")
    if min(sh, sw, dh, dw) < 1 or min(ph, pw) < 0 or groups < 1:
        raise ValueError(f"binary_conv2d: stride {stride}, dilation {dilation} must be >= 1, padding {padding} "
                         f">= 0, groups {groups} >= 1")
    batch, channels, h, w = x.shape
    out_ch, kh, kw, wc = w_packed.shape
    if channels % groups or out_ch % groups:
        raise ValueError(f"binary_conv2d: groups={groups} must divide C_in={channels} and C_out={out_ch}")
    cg, og = channels // groups, out_ch // groups
    _check_packed(w_packed, cg, "binary_conv2d weights")
    if tau is not None and tuple(tau.shape) != (channels,):
        raise ValueError(f"binary_conv2d: tau must have shape ({channels},), got {tuple(tau.shape)}")
    oh, ow = conv_output_size(h, kh, sh, ph, dh), conv_output_size(w, kw, sw, pw, dw)
    if oh < 1 or ow < 1:
        raise ValueError(f"binary_conv2d: a {kh}x{kw} kernel (dilation {dilation}, padding {padding}) does not fit "
                         f"a {h}x{w} input")
    path = _impl(impl)
    threads = _threads(threads)
    rows = batch * oh * ow
    row_scale = _as_vector(row_scale, rows, "row_scale (one per output pixel)")
    col_scale, bias = _as_vector(col_scale, out_ch, "col_scale"), _as_vector(bias, out_ch, "bias")
    nhwc = x.detach().permute(0, 2, 3, 1)
    outs = []
    for g in range(groups):
        xg = nhwc[..., g * cg:(g + 1) * cg]
        tg = None if tau is None else tau[g * cg:(g + 1) * cg]
        a, _ = pack_signs(xg, tg, threads=threads, impl=path)   # (B, H, W, wc)
        wg = w_packed[g * og:(g + 1) * og].reshape(og, -1).contiguous()
        part = slice(g * og, (g + 1) * og)
        epilogue = dict(row_scale=row_scale, col_scale=None if col_scale is None else col_scale[part].contiguous(),
                        bias=None if bias is None else bias[part].contiguous())
        if path == TORCH:
            outs.append(_conv_torch(a, wg, cg, (kh, kw, wc), (sh, sw), (ph, pw), (dh, dw), **epilogue))
            continue
        words = kh * kw * wc
        cols = torch.empty(rows, words, dtype=torch.int64)
        padded = ph > 0 or pw > 0
        mask = torch.empty(rows, words, dtype=torch.int64) if padded else None
        valid = torch.empty(rows, dtype=torch.int32)
        a = a.contiguous()
        _check(_library().ditq_binary_im2col(_ptr(a), batch, h, w, wc, cg, kh, kw, sh, sw, ph, pw, dh, dw, oh, ow,
                                             _ptr(cols), _ptr(mask), _ptr(valid), threads), "binary_im2col")
        outs.append(_gemm(cols, wg, kh * kw * cg, path, threads, mask, valid if padded else None, **epilogue))
    out = outs[0] if groups == 1 else torch.cat(outs, dim=1)
    return out.reshape(batch, oh, ow, out_ch).permute(0, 3, 1, 2).contiguous()


def _conv_torch(a: Tensor, wg: Tensor, cg: int, kernel: tuple[int, int, int], stride, padding, dilation,
                row_scale, col_scale, bias) -> Tensor:
    """The reference path on packed operands: unpack to +-1 and run F.conv2d (zero padding counts 0)."""
    kh, kw, wc = kernel
    dtype = _exact_dtype(kh * kw * cg)
    sx = _unpack_signs(a, cg, dtype).permute(0, 3, 1, 2)                                  # (B, Cg, H, W)
    sw = _unpack_signs(wg.reshape(-1, kh, kw, wc), cg, dtype).permute(0, 3, 1, 2)         # (Og, Cg, kh, kw)
    acc = F.conv2d(sx, sw, None, stride, padding, dilation).round().to(torch.int32)
    acc = acc.permute(0, 2, 3, 1).reshape(-1, sw.shape[0])                                # (B OH OW, Og)
    return _reference_epilogue(acc, row_scale, col_scale, bias, (-1, 1), (-1,))


# ------------------------------------------------------------------------------------- custom ops

def _has_epilogue(*terms: Tensor | None) -> bool:
    return any(t is not None for t in terms)


@torch.library.custom_op("ditq_kernels::binary_linear", mutates_args=())
def binary_linear_op(x: Tensor, w_packed: Tensor, k: int, tau: Optional[Tensor], row_scale: Optional[Tensor],
                     col_scale: Optional[Tensor], bias: Optional[Tensor], threads: int) -> Tensor:
    """:func:`binary_linear` as a graph op; ``threads = 0``: ``torch.get_num_threads()`` at run time."""
    return binary_linear(x, w_packed, k, tau=tau, row_scale=row_scale, col_scale=col_scale, bias=bias,
                         threads=threads or None)


@binary_linear_op.register_fake
def _(x, w_packed, k, tau, row_scale, col_scale, bias, threads):
    dtype = torch.float32 if _has_epilogue(row_scale, col_scale, bias) else torch.int32
    return x.new_empty((*x.shape[:-1], w_packed.shape[0]), dtype=dtype)


@torch.library.custom_op("ditq_kernels::binary_conv2d", mutates_args=())
def binary_conv2d_op(x: Tensor, w_packed: Tensor, tau: Optional[Tensor], row_scale: Optional[Tensor],
                     col_scale: Optional[Tensor], bias: Optional[Tensor], stride: list[int], padding: list[int],
                     dilation: list[int], groups: int, threads: int) -> Tensor:
    """:func:`binary_conv2d` as a graph op; ``threads = 0``: ``torch.get_num_threads()`` at run time."""
    return binary_conv2d(x, w_packed, stride=stride, padding=padding, dilation=dilation, groups=groups, tau=tau,
                         row_scale=row_scale, col_scale=col_scale, bias=bias, threads=threads or None)


@binary_conv2d_op.register_fake
def _(x, w_packed, tau, row_scale, col_scale, bias, stride, padding, dilation, groups, threads):
    _, kh, kw, _ = w_packed.shape
    oh = conv_output_size(x.shape[2], kh, stride[0], padding[0], dilation[0])
    ow = conv_output_size(x.shape[3], kw, stride[1], padding[1], dilation[1])
    dtype = torch.float32 if _has_epilogue(row_scale, col_scale, bias) else torch.int32
    return x.new_empty((x.shape[0], w_packed.shape[0], oh, ow), dtype=dtype)


# --------------------------------------------------------------------------------------- the probe

def popcount_probe(iters: int, threads: int = 1, impl: str | None = None) -> tuple[int, int]:
    """Runs the register-only popcount loop; returns ``(popcount instructions per thread, bits per instruction)``.

    Time the call to get the CPU's popcount peak (see ``bench/binary_gemm.py``).
    """
    path = _impl(impl)
    if path == TORCH:
        raise RuntimeError("popcount_probe needs the compiled kernels")
    count = _library().ditq_popcount_probe(iters, _ISA[path], threads)
    _check(0 if count >= 0 else int(count), "popcount_probe")
    return int(count), 512 if path == AVX512 else 64


def measure_clock_ghz(iters: int = 2_000_000, repeats: int = 20) -> float:
    """The clock one core runs at (boost included), from the fastest of ``repeats`` timed chains of dependent adds.

    Each chain is short (16M cycles, ~5 ms) so that on a shared machine some run without being preempted.
    """
    lib = _library()
    if lib is None:
        raise RuntimeError("measure_clock_ghz needs the compiled kernels")
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        lib.ditq_cycle_probe(iters)
        best = min(best, time.perf_counter() - start)
    return 8 * iters / best / 1e9


__all__ = ["AVX512", "POPCOUNT", "TORCH", "binary_conv2d", "binary_linear", "kernel_info", "pack_conv_weight",
           "pack_signs", "popcount_probe", "reference_binary_conv2d", "reference_binary_linear", "reference_signs"]
