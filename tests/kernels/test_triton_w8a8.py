"""The cuda backend: Triton W8A8 and FP8 kernels, ``lower_cuda``, and the error without CUDA.

The kernels' numerics run in Triton's interpreter in a subprocess (``interpreter_cases.py`` says
why: ``TRITON_INTERPRET`` must be set before triton is first imported and then holds for the whole
process). This file checks the rest in process: the lowering's choices and graph, the FP8 math
(pure torch), the bf16 float parts, the clear error on a machine without CUDA; and on a GPU
(``@pytest.mark.gpu``) the compiled kernels against the interpreter, and ``torch.compile``.
"""

from __future__ import annotations

import copy
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ditq_compiler.backends.cuda import input_quantizer, lower_cuda
from ditq_compiler import meta
from ditq_compiler.kernels import fp8, triton_w8a8
from ditq_compiler.kernels.device import CudaBackendError
from ditq_compiler.quant import sqnr_db
from tests.kernels.cases import comparison_cases, int8_case, run_int8

ROOT = Path(__file__).resolve().parents[2]
HAS_TRITON = importlib.util.find_spec("triton") is not None
CUDA = torch.cuda.is_available()
QUANT_LINEAR = torch.ops.ditq.quant_linear.default
requires_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA device")


def _interpreter_env() -> dict[str, str]:
    return dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))


@pytest.mark.slow
@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
def test_kernels_in_the_interpreter():
    done = subprocess.run([sys.executable, "-m", "pytest", "tests/kernels/interpreter_cases.py", "-q",
                           "-p", "no:cacheprovider"], cwd=ROOT, env=_interpreter_env(), capture_output=True,
                          text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-3000:]
    assert " passed" in done.stdout and "skipped" not in done.stdout.splitlines()[-1]


# ---- the lowering ---------------------------------------------------------------------------------

def _quant_linears(gm):
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target is QUANT_LINEAR]


def test_lower_cuda_replaces_every_w8a8_linear_and_keeps_codes_and_scales(compiled_dit_w8a8):
    gm, kernels = lower_cuda(copy.deepcopy(compiled_dit_w8a8.graph_module))
    assert len(kernels) == 12 and set(kernels.values()) == {"triton w8a8 (producer quant, per-tensor)"}
    assert not _quant_linears(gm)
    calls = [n for n in gm.graph.nodes if n.target is triton_w8a8.w8a8_linear_producer]
    assert len(calls) == 12 and {meta.get(n).source_node for n in calls} == set(kernels)
    buffers = dict(gm.named_buffers())
    for name, value in buffers.items():
        if name.startswith("ditq_cuda_"):
            expected = torch.int8 if name.endswith("_w_codes") else torch.int32 if name.endswith("_w_colsum") \
                else torch.float32
            assert value.dtype == expected, name
    floats = [t for t in (*gm.parameters(), *buffers.values()) if t.is_floating_point() and t.dtype != torch.float32]
    assert floats and all(t.dtype == torch.bfloat16 for t in floats)    # the float parts


def test_lower_cuda_prologue_and_fp32_float_parts(compiled_dit_w8a8):
    gm, kernels = lower_cuda(copy.deepcopy(compiled_dit_w8a8.graph_module), act_quant="prologue",
                             float_dtype=None)
    assert set(kernels.values()) == {"triton w8a8 (prologue quant, per-tensor)"}
    assert sum(n.target is torch.ops.ditq_cuda.w8a8_linear.default for n in gm.graph.nodes) == 12
    assert all(t.dtype != torch.bfloat16 for t in (*gm.parameters(), *gm.buffers()))


def _edited(compiled, edit):
    """A copy of the compiled graph with ``edit(gm, node)`` applied to its first quant_linear."""
    gm = copy.deepcopy(compiled.graph_module)
    node = _quant_linears(gm)[0]
    edit(gm, node)
    return gm, meta.get(node).source_node


def _set_arg(index, value):
    def edit(gm, node):
        args = list(node.args)
        args[index] = value
        node.args = tuple(args)
    return edit


def _asymmetric(gm, node):
    zero_point = getattr(gm, node.args[3].target)
    setattr(gm, node.args[3].target, zero_point + 1)


@pytest.mark.parametrize("edit, int8_reason, fp8_kernel", [
    (_set_arg(8, True), "per-token activations", "fp8 _scaled_mm (per-token dynamic)"),
    (_set_arg(7, 0), "weight-only (activations in float)", "reference (weight-only (activations in float))"),
    (_asymmetric, "asymmetric weights", "fp8 _scaled_mm (per-token dynamic)"),
], ids=["per-token", "weight-only", "asymmetric"])
def test_ineligible_layers_keep_the_reference_with_the_reason(compiled_dit_w8a8, edit, int8_reason, fp8_kernel):
    gm, source = _edited(compiled_dit_w8a8, edit)
    lowered, kernels = lower_cuda(copy.deepcopy(gm), float_dtype=None)
    assert kernels[source] == f"reference ({int8_reason})" and len(_quant_linears(lowered)) == 1
    assert sum(v.startswith("triton") for v in kernels.values()) == 11
    _, kernels = lower_cuda(gm, precision="fp8", float_dtype=None)
    assert kernels[source] == fp8_kernel


def test_static_fp8_scales_cover_the_calibrated_range(compiled_dit_w8a8):
    gm = compiled_dit_w8a8.graph_module
    act = input_quantizer(gm, _quant_linears(gm)[0])
    lo = (-128 - act.zero_point) * act.scale
    hi = (127 - act.zero_point) * act.scale
    assert torch.equal(act.amax(), torch.maximum(lo.abs(), hi.abs())) and act.kind == "per-tensor"


def test_bad_options_are_named():
    with pytest.raises(ValueError, match="precision must be one of"):
        lower_cuda(torch.fx.GraphModule(torch.nn.Module(), torch.fx.Graph()), precision="int4")


def test_bf16_float_parts_run_on_the_cpu_with_reference_layers(compiled_dit_w8a8, dit_batches):
    # every layer made weight-only keeps the reference op, so the cast graph runs here: bf16 float parts
    # cost what diffusers' own bf16 model does (about 44 dB from fp32), and the output is fp32 again
    gm = copy.deepcopy(compiled_dit_w8a8.graph_module)
    for node in _quant_linears(gm):
        _set_arg(7, 0)(gm, node)
    inputs = compiled_dit_w8a8.captured.bind((), dit_batches[0][1])
    reference = gm(**inputs).sample
    lowered, kernels = lower_cuda(copy.deepcopy(gm))
    assert all(v.startswith("reference") for v in kernels.values())
    out = lowered(**inputs).sample
    assert out.dtype == torch.float32 and 35 < sqnr_db(reference, out) < 60


# ---- FP8 math (pure torch) ------------------------------------------------------------------------

def test_fp8_weight_codes_use_the_whole_e4m3_range_per_channel():
    weight = torch.randn(32, 64) * torch.logspace(-3, 1, 32)[:, None]
    w8, scale = fp8.quantize_weight(weight)
    assert w8.dtype == torch.float8_e4m3fn and scale.shape == (32,)
    assert torch.equal(w8.float().abs().amax(1), torch.full((32,), 448.0))
    dequantized = w8.float() * scale[:, None]
    assert bool(((dequantized - weight).abs() <= weight.abs() * 2 ** -4 + scale[:, None] * 2 ** -9).all())


def test_emulated_scaled_mm_is_exact_on_the_codes():
    g = torch.Generator().manual_seed(0)
    x8 = (torch.randn(9, 48, generator=g) * 40).clamp(-448, 448).to(fp8.FP8)
    w8 = (torch.randn(16, 48, generator=g) * 40).clamp(-448, 448).to(fp8.FP8)
    scale_a, scale_b, bias = torch.rand(9, 1) + 0.5, torch.rand(1, 16) + 0.5, torch.randn(16)
    out = fp8.emulated_scaled_mm(x8, w8, scale_a, scale_b, bias)
    exact = (x8.double() @ w8.double().t()) * scale_a.double() * scale_b.double() + bias.double()
    torch.testing.assert_close(out.double(), exact, rtol=1e-6, atol=1e-4)


def test_fp8_activations_saturate_instead_of_overflowing():
    assert torch.equal(fp8.to_fp8(torch.tensor([1e9, -1e9, 1.0]), torch.tensor(1.0)).float(),
                       torch.tensor([448.0, -448.0, 1.0]))


# ---- the clear error without CUDA -----------------------------------------------------------------

no_device = pytest.mark.skipif(CUDA or triton_w8a8.INTERPRETED,
                               reason="this process has a CUDA device or runs Triton's interpreter")


@no_device
@pytest.mark.parametrize("mode", ["prologue", "codes"])
def test_kernels_without_cuda_raise_a_clear_error(mode):
    with pytest.raises(CudaBackendError, match=r"layer 'test.layer' was compiled for the 'cuda' backend and needs a "
                                               r"CUDA device.*backend='torch'"):
        run_int8(int8_case(4, 8, 16), mode)


@no_device
@pytest.mark.parametrize("precision", ["int8", "fp8"])
def test_a_lowered_model_without_cuda_raises_a_clear_error(compiled_dit_w8a8, dit_batches, precision):
    gm, _ = lower_cuda(copy.deepcopy(compiled_dit_w8a8.graph_module), precision=precision)
    with pytest.raises(CudaBackendError, match=r"layer '[\w.]+' was compiled for the 'cuda' backend"):
        gm(**compiled_dit_w8a8.captured.bind((), dit_batches[0][1]))


# ---- on a GPU -------------------------------------------------------------------------------------

@pytest.mark.gpu
@requires_cuda
@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
def test_cuda_kernel_matches_the_interpreter(tmp_path):
    code = ("import sys, torch; from tests.kernels.cases import run_comparison_cases; "
            "torch.save(run_comparison_cases('cpu'), sys.argv[1])")
    done = subprocess.run([sys.executable, "-c", code, str(tmp_path / "cpu.pt")], cwd=ROOT,
                          env=_interpreter_env(), capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    interpreted = torch.load(tmp_path / "cpu.pt")
    for name, (case, mode) in comparison_cases().items():
        out, expected = run_int8(case.to("cuda"), mode).cpu(), interpreted[name]
        if name.endswith("-exact"):     # same codes, same accumulators, an exact epilogue: equal bits
            assert torch.equal(out, expected), name
        else:                           # the GPU may fuse the epilogue's multiply-add (FMA): 1 ulp
            torch.testing.assert_close(out.float(), expected.float(), rtol=2e-6 if out.dtype == torch.float32
                                       else 2 ** -7, atol=1e-5, msg=name)


def _on_cuda(compiled, batches):
    moved = copy.deepcopy(compiled).cuda()
    inputs = {k: v.cuda() if isinstance(v, torch.Tensor) else v
              for k, v in moved.captured.bind((), batches[0][1]).items()}
    return moved, inputs


@pytest.mark.slow
@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("options", [{"act_quant": "producer"}, {"act_quant": "prologue"}, {"precision": "fp8"}],
                         ids=["int8-producer", "int8-prologue", "fp8"])
def test_lowered_model_under_torch_compile_fullgraph_on_cuda(compiled_dit_w8a8, dit_batches, options):
    if options.get("precision") == "fp8" and torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("FP8 _scaled_mm needs SM 8.9+")
    moved, inputs = _on_cuda(compiled_dit_w8a8, dit_batches)
    reference = moved.graph_module(**inputs).sample
    gm, _ = lower_cuda(copy.deepcopy(moved.graph_module), **options)
    eager = gm(**inputs).sample
    torch._dynamo.reset()
    compiled = torch.compile(gm, fullgraph=True)
    out = compiled(**inputs).sample
    floor = 30 if options.get("precision") == "fp8" else 35
    assert sqnr_db(reference, eager) > floor and sqnr_db(reference, out) > floor
    assert sqnr_db(eager, out) > 30     # Inductor fuses and rounds the bf16 parts its own way
