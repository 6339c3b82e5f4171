"""The 1-bit XNOR-popcount kernels agree bit for bit with the torch reference that defines them.

Every compiled path this CPU can run is tested (the portable popcount path always, AVX-512
VPOPCNTDQ where the CPU has it), plus the pure-torch path that runs when nothing can be compiled.
"""

from __future__ import annotations

import itertools
import warnings

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from ditq_compiler.kernels import binary_cpu as bc
from ditq_compiler.kernels import build

COMPILED = [bc.POPCOUNT, bc.AVX512]
PATHS = [*COMPILED, bc.TORCH]


def runnable(path: str) -> str:
    """``path``, skipping the test when this CPU cannot run it (asked at run time: building the kernels at
    collection would put them in the user's cache, before conftest points $DITQ_CACHE_DIR elsewhere)."""
    if path == bc.AVX512 and not bc.kernel_info()["cpu_has_avx512_vpopcntdq"]:
        pytest.skip("this CPU lacks AVX-512 VPOPCNTDQ")
    return path


def runnable_or_portable(path: str) -> str:
    """For hypothesis tests, which cannot skip: the portable path stands in for one the CPU lacks."""
    return path if path != bc.AVX512 or bc.kernel_info()["cpu_has_avx512_vpopcntdq"] else bc.POPCOUNT


def randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def pm1(t: torch.Tensor) -> torch.Tensor:
    """+-1 values with sign(0) = +1, written out independently of the module under test."""
    return torch.where(t < 0, -1.0, 1.0).double()


@pytest.fixture
def fresh_kernels():
    """Each test that rebuilds starts and ends with nothing loaded, so later tests load the normal library."""
    bc._reset()
    yield
    bc._reset()


# ----------------------------------------------------------------------------------------- packing

def test_packing_layout_and_sign_of_zero():
    x = torch.zeros(1, 70)
    x[0, 0] = -1.0     # word 0, bit 0
    x[0, 1] = 0.0      # sign(0) = +1: bit 0
    x[0, 2] = -0.0     # -0 is not < 0: +1
    x[0, 3] = float("nan")   # compares false: +1
    x[0, 63] = -2.0    # word 0, bit 63 (the int64 sign bit)
    x[0, 65] = -3.0    # word 1, bit 1
    for path in map(runnable_or_portable, PATHS):
        packed, k = bc.pack_signs(x, impl=path)
        assert k == 70 and packed.dtype == torch.int64 and packed.shape == (1, 2)
        assert packed[0, 0].item() == 1 - 2 ** 63   # bits 0 and 63, as a signed int64
        assert packed[0, 1].item() == 2


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("k", [1, 63, 64, 65, 127, 1000])
def test_pack_signs_matches_reference(path, k):
    path = runnable(path)
    x = randn(5, 3, k, seed=k)
    tau = randn(k, seed=k + 1) * 0.3
    x[0, 0, : min(k, 8)] = tau[: min(k, 8)]   # exactly at the threshold: +1
    for t in (None, tau):
        packed, kk = bc.pack_signs(x, t, impl=path)
        assert kk == k and packed.shape == (5, 3, -(-k // 64))
        assert torch.equal(packed, bc._pack_torch(x, t))
        signs = bc._unpack_signs(packed, k, torch.float64)
        assert torch.equal(signs, pm1(x - (0 if t is None else t)))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_pack_signs_other_dtypes(dtype):
    x = randn(4, 100, seed=3).to(dtype)
    packed, _ = bc.pack_signs(x)
    assert torch.equal(bc._unpack_signs(packed, 100, torch.float64), pm1(x.double()))


def test_pack_signs_threads_agree():
    x = randn(2100, 1000, seed=4)   # 2.1M values: enough work for two threads
    one, _ = bc.pack_signs(x, threads=1)
    assert torch.equal(one, bc.pack_signs(x, threads=2)[0])
    assert torch.equal(one, bc._pack_torch(x, None))


# ------------------------------------------------------------------------------------------ linear

SHAPES = [(1, 1, 1), (1, 63, 7), (3, 64, 1), (5, 65, 33), (17, 1000, 31), (4, 129, 64), (9, 200, 100),
          (7, 64 * 3, 65)]


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("m,k,n", SHAPES)
def test_linear_accumulators_exact(path, m, k, n):
    path = runnable(path)
    x, w, tau = randn(m, k, seed=1), randn(n, k, seed=2), randn(k, seed=3) * 0.2
    w_packed, _ = bc.pack_signs(w)
    acc = bc.binary_linear(x, w_packed, k, tau=tau, impl=path)
    assert acc.dtype == torch.int32 and acc.shape == (m, n)
    assert torch.equal(acc, bc.reference_binary_linear(x, w, tau))
    assert torch.equal(acc.double(), pm1(x - tau) @ pm1(w).T)   # the definition, written out


@settings(max_examples=40, deadline=None)
@given(m=st.integers(1, 40), k=st.integers(1, 300), n=st.integers(1, 70), seed=st.integers(0, 2 ** 16),
       path=st.sampled_from(COMPILED), tau=st.booleans())
def test_linear_random_shapes(m, k, n, seed, path, tau):
    path = runnable_or_portable(path)
    x, w = randn(m, k, seed=seed), randn(n, k, seed=seed + 1)
    t = randn(k, seed=seed + 2) if tau else None
    w_packed, _ = bc.pack_signs(w)
    assert torch.equal(bc.binary_linear(x, w_packed, k, tau=t, impl=path), bc.reference_binary_linear(x, w, t))


def test_linear_takes_packed_input_and_leading_dims():
    x, w = randn(2, 3, 130, seed=5), randn(9, 130, seed=6)
    w_packed, _ = bc.pack_signs(w)
    x_packed, _ = bc.pack_signs(x)
    row_scale = torch.rand(2, 3)
    y = bc.binary_linear(x, w_packed, 130, row_scale=row_scale)
    assert y.shape == (2, 3, 9) and y.dtype == torch.float32
    assert torch.equal(y, bc.binary_linear(x_packed, w_packed, 130, row_scale=row_scale))
    assert torch.equal(y, bc.reference_binary_linear(x, w, row_scale=row_scale))


TERMS = ["row_scale", "col_scale", "bias"]


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("terms", [c for r in range(1, 4) for c in itertools.combinations(TERMS, r)])
def test_linear_epilogue_bit_for_bit(path, terms):
    path = runnable(path)
    m, k, n = 37, 300, 45   # N = 45: a full 32-column panel and a partial one
    x, w = randn(m, k, seed=7), randn(n, k, seed=8)
    values = {"row_scale": torch.rand(m) * 0.1, "col_scale": randn(n, seed=9).abs() + 1e-3,
              "bias": randn(n, seed=10)}
    kwargs = {t: values[t] for t in terms}
    w_packed, _ = bc.pack_signs(w)
    y = bc.binary_linear(x, w_packed, k, impl=path, **kwargs)
    assert y.dtype == torch.float32
    assert torch.equal(y, bc.reference_binary_linear(x, w, **kwargs))   # same fp32 steps, same order


@pytest.mark.parametrize("path", COMPILED)
def test_linear_threads_agree(path):
    path = runnable(path)
    m, k, n = 200, 1000, 520   # 1.7M word pairs: three threads' worth (the kernel gives each >= 2^19)
    x, w = randn(m, k, seed=11), randn(n, k, seed=12)
    w_packed, _ = bc.pack_signs(w)
    one = bc.binary_linear(x, w_packed, k, threads=1, impl=path)
    assert torch.equal(one, bc.reference_binary_linear(x, w))
    for threads in (2, 3):
        assert torch.equal(one, bc.binary_linear(x, w_packed, k, threads=threads, impl=path))


def test_linear_errors():
    w_packed, _ = bc.pack_signs(randn(4, 70))
    with pytest.raises(ValueError, match="features"):
        bc.binary_linear(randn(2, 71), w_packed, 70)
    with pytest.raises(ValueError, match="words per row"):
        bc.binary_linear(randn(2, 130), w_packed, 130)
    bad = w_packed.clone()
    bad[0, -1] |= 1 << 40   # a bit past K = 70
    with pytest.raises(ValueError, match="past K"):
        bc.binary_linear(randn(2, 70), bad, 70)
    with pytest.raises(ValueError, match="already packed"):
        bc.binary_linear(bc.pack_signs(randn(2, 70))[0], w_packed, 70, tau=torch.zeros(70))
    with pytest.raises(ValueError, match="col_scale"):
        bc.binary_linear(randn(2, 70), w_packed, 70, col_scale=torch.ones(5))
    with pytest.raises(ValueError, match="not one of"):
        bc.binary_linear(randn(2, 70), w_packed, 70, impl="avx2")


def test_forcing_avx512_without_it_is_an_error():
    if bc.AVX512 in COMPILED:
        pytest.skip("this CPU has AVX-512 VPOPCNTDQ")
    with pytest.raises(RuntimeError, match="lacks AVX-512"):
        bc.kernel_info(bc.AVX512)


def test_env_var_forces_a_path(monkeypatch):
    monkeypatch.setenv(bc.ENV_IMPL, bc.POPCOUNT)
    assert bc.kernel_info()["path"] == bc.POPCOUNT
    monkeypatch.setenv(bc.ENV_IMPL, bc.TORCH)
    assert bc.kernel_info()["path"] == bc.TORCH


# -------------------------------------------------------------------------------------------- conv

CONVS = [  # C, O, (kh, kw), stride, padding, dilation, groups, (H, W)
    (3, 4, (3, 3), 1, 1, 1, 1, (9, 8)),
    (1, 5, (3, 3), 1, 1, 1, 1, (5, 5)),
    (64, 16, (3, 3), 1, 1, 1, 1, (4, 4)),     # the zoo U-Net's 4x4 maps: mostly border pixels
    (70, 9, (3, 3), 2, 1, 1, 1, (9, 7)),
    (130, 33, (3, 3), 1, 2, 2, 1, (6, 6)),
    (16, 8, (1, 1), 1, 0, 1, 1, (5, 6)),      # no padding: the unmasked kernel
    (8, 6, (3, 5), (2, 1), (1, 2), (1, 2), 1, (7, 9)),
    (12, 6, (3, 3), 1, 3, 1, 1, (4, 4)),      # padding wider than the kernel reaches: all-padding rows
    (6, 4, (3, 3), 1, 1, 1, 2, (6, 6)),
    (4, 8, (3, 3), 1, 1, 1, 4, (5, 5)),       # depthwise (x2)
]


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("c,o,kernel,stride,padding,dilation,groups,hw", CONVS)
def test_conv_accumulators_exact(path, c, o, kernel, stride, padding, dilation, groups, hw):
    path = runnable(path)
    x, w = randn(2, c, *hw, seed=c), randn(o, c // groups, *kernel, seed=o)
    tau = randn(c, seed=1) * 0.2
    acc = bc.binary_conv2d(x, bc.pack_conv_weight(w), stride=stride, padding=padding, dilation=dilation,
                           groups=groups, tau=tau, impl=path)
    expected = F.conv2d(pm1(x - tau.reshape(-1, 1, 1)), pm1(w), None, stride, padding, dilation, groups)
    assert acc.dtype == torch.int32 and acc.is_contiguous()
    assert torch.equal(acc.double(), expected)   # zero padding counts 0, like F.conv2d's


@settings(max_examples=25, deadline=None)
@given(c=st.integers(1, 140), o=st.integers(1, 40), kh=st.integers(1, 4), kw=st.integers(1, 4),
       stride=st.integers(1, 3), padding=st.integers(0, 3), dilation=st.integers(1, 2), h=st.integers(1, 9),
       w=st.integers(1, 9), seed=st.integers(0, 2 ** 16), path=st.sampled_from(COMPILED))
def test_conv_random_shapes(c, o, kh, kw, stride, padding, dilation, h, w, seed, path):
    path = runnable_or_portable(path)
    if h + 2 * padding < dilation * (kh - 1) + 1 or w + 2 * padding < dilation * (kw - 1) + 1:
        return   # the kernel does not fit
    x, weight = randn(2, c, h, w, seed=seed), randn(o, c, kh, kw, seed=seed + 1)
    acc = bc.binary_conv2d(x, bc.pack_conv_weight(weight), stride=stride, padding=padding, dilation=dilation,
                           impl=path)
    assert torch.equal(acc, bc.reference_binary_conv2d(x, weight, None, stride, padding, dilation))


@pytest.mark.parametrize("path", PATHS)
def test_conv_epilogue_bit_for_bit(path):
    path = runnable(path)
    x, w = randn(3, 40, 5, 6, seed=13), randn(37, 40, 3, 3, seed=14)
    row_scale, col_scale, bias = torch.rand(3, 5, 6), torch.rand(37) + 0.5, randn(37, seed=15)
    y = bc.binary_conv2d(x, bc.pack_conv_weight(w), padding=1, row_scale=row_scale, col_scale=col_scale, bias=bias,
                         impl=path)
    assert y.dtype == torch.float32
    assert torch.equal(y, bc.reference_binary_conv2d(x, w, padding=1, row_scale=row_scale, col_scale=col_scale,
                                                     bias=bias))


@pytest.mark.parametrize("path", COMPILED)
def test_conv_threads_agree(path):
    path = runnable(path)
    x, w = randn(16, 128, 8, 8, seed=16), randn(64, 128, 3, 3, seed=17)   # 1.2M word pairs: two threads
    w_packed = bc.pack_conv_weight(w)
    one = bc.binary_conv2d(x, w_packed, padding=1, threads=1, impl=path)
    assert torch.equal(one, bc.reference_binary_conv2d(x, w, padding=1))
    assert torch.equal(one, bc.binary_conv2d(x, w_packed, padding=1, threads=2, impl=path))


def test_conv_errors():
    x, w_packed = randn(1, 6, 5, 5), bc.pack_conv_weight(randn(4, 6, 3, 3))
    with pytest.raises(ValueError, match="groups=4 must divide"):
        bc.binary_conv2d(x, w_packed, groups=4)
    with pytest.raises(ValueError, match="'same' is not supported"):
        bc.binary_conv2d(x, w_packed, padding="same")
    with pytest.raises(ValueError, match="does not fit"):
        bc.binary_conv2d(randn(1, 6, 2, 2), w_packed)
    with pytest.raises(ValueError, match="int64"):
        bc.binary_conv2d(x, w_packed.int())
    with pytest.raises(ValueError, match="one per output pixel"):
        bc.binary_conv2d(x, w_packed, row_scale=torch.ones(3))


# ------------------------------------------------------------------------------------ build, fallback

def _linear_and_conv_are_exact():
    x, w = randn(5, 100, seed=20), randn(7, 100, seed=21)
    assert torch.equal(bc.binary_linear(x, bc.pack_signs(w)[0], 100, threads=2), bc.reference_binary_linear(x, w))
    xc, wc = randn(2, 8, 5, 5, seed=22), randn(3, 8, 3, 3, seed=23)
    assert torch.equal(bc.binary_conv2d(xc, bc.pack_conv_weight(wc), padding=1, threads=2),
                       bc.reference_binary_conv2d(xc, wc, padding=1))


@pytest.mark.parametrize("break_it", ["missing CC", "no compiler on the PATH", "broken flags"])
def test_no_compiler_falls_back_with_one_warning(monkeypatch, tmp_path, fresh_kernels, break_it):
    monkeypatch.setenv("DITQ_CACHE_DIR", str(tmp_path))   # nothing cached
    if break_it == "missing CC":
        monkeypatch.setenv("CC", "/nonexistent/cc")
    elif break_it == "no compiler on the PATH":
        monkeypatch.setattr(build, "find_compiler", lambda: None)
    else:
        monkeypatch.setattr(bc, "BASE_FLAGS", ("-shared", "--no-such-flag"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _linear_and_conv_are_exact()
        _linear_and_conv_are_exact()
        info = bc.kernel_info()
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(messages) == 1, messages
    assert "could not build binary_gemm.c" in messages[0] and "pure-torch reference runs instead" in messages[0]
    assert info["path"] == bc.TORCH and info["build_failure"]


def test_library_is_cached_atomically(monkeypatch, tmp_path, fresh_kernels):
    monkeypatch.setenv("DITQ_CACHE_DIR", str(tmp_path))
    assert bc.kernel_info()["path"] != bc.TORCH
    assert bc._State.built.compiled
    files = list((tmp_path / "kernels").iterdir())
    assert [f.name for f in files] == [bc._State.built.path.name]   # no temporary file left behind
    assert files[0].name.startswith("binary_gemm-") and files[0].suffix == ".so"
    bc._reset()
    assert bc.kernel_info()["library"] == str(files[0])
    assert not bc._State.built.compiled   # loaded, not compiled again


def test_pthreads_build_without_openmp(monkeypatch, tmp_path, fresh_kernels):
    monkeypatch.setenv("DITQ_CACHE_DIR", str(tmp_path))
    attempts = [a for a in bc._flag_attempts() if "-fopenmp" not in a]
    monkeypatch.setattr(bc, "_flag_attempts", lambda: attempts)
    assert bc.kernel_info()["threading"] == "pthreads"
    _linear_and_conv_are_exact()
    x, w = randn(200, 1000, seed=24), randn(520, 1000, seed=25)
    w_packed = bc.pack_signs(w)[0]
    assert torch.equal(bc.binary_linear(x, w_packed, 1000, threads=3), bc.reference_binary_linear(x, w))


# --------------------------------------------------------------------------------------- custom ops

class TinyBinaryNet(torch.nn.Module):
    """A binary conv then a binary linear, through the ditq_kernels:: custom ops."""

    def __init__(self):
        super().__init__()
        self.register_buffer("conv_w", bc.pack_conv_weight(randn(6, 4, 3, 3, seed=30)))
        self.register_buffer("conv_scale", torch.rand(6) + 0.5)
        self.register_buffer("fc_w", bc.pack_signs(randn(5, 6 * 4 * 4, seed=31))[0])
        self.register_buffer("fc_bias", randn(5, seed=32))

    def forward(self, x):
        h = torch.ops.ditq_kernels.binary_conv2d(x, self.conv_w, None, None, self.conv_scale, None, [1, 1], [1, 1],
                                                 [1, 1], 1, 0)
        h = torch.relu(h).flatten(1) - 0.5
        return torch.ops.ditq_kernels.binary_linear(h, self.fc_w, 96, None, None, None, self.fc_bias, 0)


def test_custom_ops_export_and_run():
    model, x = TinyBinaryNet(), randn(2, 4, 4, 4, seed=33)
    eager = model(x)
    program = torch.export.export(model, (x,))
    targets = {str(n.target) for n in program.graph.nodes if n.op == "call_function"}
    assert {"ditq_kernels.binary_conv2d.default", "ditq_kernels.binary_linear.default"} <= targets
    assert torch.equal(program.module()(x), eager)
    assert eager.shape == (2, 5) and eager.dtype == torch.float32


def test_custom_ops_opcheck():
    x, w = randn(3, 70, seed=34), bc.pack_signs(randn(4, 70, seed=35))[0]
    torch.library.opcheck(torch.ops.ditq_kernels.binary_linear.default, (x, w, 70, None, None, None, None, 1))
    torch.library.opcheck(torch.ops.ditq_kernels.binary_linear.default,
                          (x, w, 70, torch.zeros(70), torch.rand(3), torch.rand(4), torch.rand(4), 0))
    xc, wc = randn(2, 5, 4, 4, seed=36), bc.pack_conv_weight(randn(3, 5, 3, 3, seed=37))
    torch.library.opcheck(torch.ops.ditq_kernels.binary_conv2d.default,
                          (xc, wc, None, None, torch.rand(3), None, [2, 1], [1, 0], [1, 1], 1, 0))
