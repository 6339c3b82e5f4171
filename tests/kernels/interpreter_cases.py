"""The cuda backend's kernels in Triton's interpreter, on the CPU.

Not collected on its own (the name does not match test_*.py): ``test_triton_w8a8.py`` runs this file
in a subprocess with ``TRITON_INTERPRET=1``, because Triton reads the variable once, when it is
first imported, and then interprets every Triton kernel of the process, its own library functions
included. Setting it inside the main test process would either come too late (another test imported
triton first) or leak into every later test that compiles for a GPU. To run it directly:

    TRITON_INTERPRET=1 OMP_NUM_THREADS=1 python -m pytest tests/kernels/interpreter_cases.py -q
"""

from __future__ import annotations

import copy
import os

import pytest
import torch

if os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("run with TRITON_INTERPRET=1 (tests/kernels/test_triton_w8a8.py does)", allow_module_level=True)
pytest.importorskip("triton", reason="triton is not installed")

import ditq_compiler as dq  # noqa: E402
from ditq_compiler.backends.cuda import lower_cuda  # noqa: E402
from ditq_compiler.kernels import fp8, triton_w8a8  # noqa: E402
from ditq_compiler.quant import sqnr_db  # noqa: E402
from ditq_compiler.toy import random_dit_batches, small_dit  # noqa: E402
from tests.kernels.cases import SHAPES, int8_case, run_int8  # noqa: E402

TQ_DIT = {"name": "tq-dit-small", "weights": {"bits": 8, "granularity": "channel"},
          "activations": {"bits": 8, "symmetric": False}, "attention": {"matmuls": True},
          "scale_search": {"metric": "mse", "rounds": 1, "eq_n": 4},
          "multi_region": {"post_softmax": True, "post_gelu": True},
          "time_groups": {"groups": 2, "sites": ["post_softmax", "post_gelu", "linear_inputs", "attention_operands"]}}


def test_the_kernels_run_in_the_interpreter():
    assert triton_w8a8.INTERPRETED


# ---- the int8 kernel against exact integer arithmetic ------------------------------------------

@pytest.mark.parametrize("mode", ["prologue", "codes"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_int8_is_exact_where_the_epilogue_is(shape, mode):
    # power-of-two scales: every epilogue step is exact but the bias add, rounded once as the fp32 cast of
    # the exact value is, so the output equals it bit for bit; x sits on rounding ties (x / s = n + 1/2)
    case = int8_case(*shape, power_of_two=True)
    out = run_int8(case, mode)
    assert out.dtype == torch.float32 and out.shape == (*case.x.shape[:-1], shape[1])
    assert torch.equal(out, case.expected().float())


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_int8_matches_the_exact_result_within_fp32_rounding(shape, bias):
    case = int8_case(*shape, seed=1, bias=bias)
    expected = case.expected()
    out = run_int8(case, "prologue")
    torch.testing.assert_close(out.double(), expected, rtol=4e-7, atol=4e-7 * float(expected.abs().max()))


def test_prologue_codes_equal_the_reference_codes_at_ties_and_beyond_the_grid():
    # the prologue quantizes in the kernel; the codes path is given the reference's own codes: same output
    case = int8_case(33, 40, 65, power_of_two=True)
    case.x[0, :3, :3] = torch.tensor([1e6, -1e6, 0.0])      # clamped to qmax, qmin, and z
    assert torch.equal(run_int8(case, "prologue"), run_int8(case, "codes"))


@pytest.mark.parametrize("group_shape", ["per-sample", "scalar", "one"])
def test_int8_time_grouped_rows_use_their_samples_table_entry(group_shape):
    case = int8_case(30, 24, 40, groups=4, batch=3, seed=3)
    case.group = {"per-sample": torch.tensor([2, 0, 3]), "scalar": torch.tensor(1),
                  "one": torch.tensor([3])}[group_shape]
    out = run_int8(case, "prologue")
    torch.testing.assert_close(out.double(), case.expected(), rtol=4e-7, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_int8_half_inputs_give_half_outputs(dtype):
    case = int8_case(20, 33, 48, groups=2, batch=2, dtype=dtype)
    out = run_int8(case, "prologue")
    assert out.dtype == dtype
    torch.testing.assert_close(out.float(), case.expected().to(dtype).float(), rtol=2 ** -7, atol=1e-2)


@pytest.mark.parametrize("bits", [2, 4])
def test_int8_narrow_activation_grids_clamp_to_their_range(bits):
    case = int8_case(16, 17, 33, a_bits=bits, seed=4)
    torch.testing.assert_close(run_int8(case, "prologue").double(), case.expected(), rtol=4e-7, atol=1e-5)


def test_int8_empty_input():
    case = int8_case(1, 8, 16)
    case.x = case.x[:, :0]
    assert run_int8(case, "prologue").shape == (1, 0, 8)


def test_int8_rejects_bad_operands_naming_the_layer():
    case = int8_case(4, 8, 16)
    case.w_scale = case.w_scale.double()
    with pytest.raises(ValueError, match="layer 'test.layer': weight scales must be fp32"):
        run_int8(case, "prologue")


# ---- FP8 through the emulation ------------------------------------------------------------------

@pytest.mark.parametrize("activations", ["dynamic", "static", "time-grouped"])
def test_fp8_linear_runs_its_emulation_in_interpreter_mode(activations):
    g = torch.Generator().manual_seed(0)
    x, weight, bias = torch.randn(3, 5, 64, generator=g), torch.randn(48, 64, generator=g) / 8, torch.randn(48)
    w8, w_scale = fp8.quantize_weight(weight)
    a_scale = {"dynamic": None, "static": fp8.scale_from_amax(x.abs().amax().reshape(1)),
               "time-grouped": fp8.scale_from_amax(torch.tensor([4.0, 8.0]))}[activations]
    group = torch.tensor([0, 1, 1]) if activations == "time-grouped" else None
    out = fp8.fp8_linear(x, w8, w_scale, bias.to(torch.bfloat16), a_scale, group, "test.fp8")
    assert out.shape == (3, 5, 48) and out.dtype == torch.float32
    assert sqnr_db(torch.nn.functional.linear(x, weight, bias), out) > 25   # two e4m3 roundings: ~30 dB


# ---- a lowered model against the ditq::quant_linear reference -----------------------------------

@pytest.fixture(scope="module")
def dit_batches():
    return random_dit_batches(count=2, batch_size=2)


@pytest.fixture(scope="module")
def w8a8(dit_batches):
    return dq.compile(small_dit(), "w8a8", calibration=dit_batches, progress=False)


@pytest.fixture(scope="module")
def tq_dit(dit_batches):
    return dq.compile(small_dit(), dq.Recipe.from_dict(TQ_DIT), calibration=dit_batches, progress=False)


def _outputs(compiled, dit_batches, **options):
    inputs = compiled.captured.bind((), dit_batches[0][1])
    gm, kernels = lower_cuda(copy.deepcopy(compiled.graph_module), **options)
    return compiled.graph_module(**inputs).sample, gm(**inputs).sample, kernels


@pytest.mark.parametrize("act_quant", ["prologue", "producer"])
def test_lowered_w8a8_dit_matches_the_reference(w8a8, dit_batches, act_quant):
    reference, out, kernels = _outputs(w8a8, dit_batches, act_quant=act_quant, float_dtype=None)
    assert set(kernels.values()) == {f"triton w8a8 ({act_quant} quant, per-tensor)"} and len(kernels) == 12
    assert sqnr_db(reference, out) > 65      # same codes; the reference's float GEMM rounds differently


def test_lowered_time_grouped_dit_matches_the_reference(tq_dit, dit_batches):
    reference, out, kernels = _outputs(tq_dit, dit_batches, float_dtype=None)
    grouped = [k for k, v in kernels.items() if v == "triton w8a8 (producer quant, time-grouped)"]
    assert len(grouped) == 10 and all("two-region" in kernels[k] for k in set(kernels) - set(grouped))
    assert sqnr_db(reference, out) > 65


def test_bf16_float_parts_cost_what_a_bf16_model_does(w8a8, dit_batches):
    reference, out, _ = _outputs(w8a8, dit_batches)
    assert out.dtype == torch.float32
    assert 35 < sqnr_db(reference, out) < 60    # the diffusers bf16 model itself is ~44 dB from fp32


@pytest.mark.parametrize("activations", ["dynamic", "static"])
def test_lowered_fp8_dit_is_close_to_the_reference(tq_dit, dit_batches, activations):
    reference, out, kernels = _outputs(tq_dit, dit_batches, precision="fp8", fp8_activations=activations)
    assert sum(v.startswith("fp8 _scaled_mm") for v in kernels.values()) == 10
    assert sqnr_db(reference, out) > 30


@pytest.mark.slow
def test_lowered_model_traces_as_one_graph(w8a8, dit_batches):
    # dynamo captures the lowered graph without a break (the backend 'eager' then runs it in the interpreter);
    # the Inductor build is the GPU test's
    inputs = w8a8.captured.bind((), dit_batches[0][1])
    for options in ({"act_quant": "prologue"}, {"act_quant": "producer"}, {"precision": "fp8"}):
        gm, _ = lower_cuda(copy.deepcopy(w8a8.graph_module), **options)
        torch._dynamo.reset()
        compiled = torch.compile(gm, backend="eager", fullgraph=True)
        assert torch.equal(compiled(**inputs).sample, gm(**inputs).sample)
