"""Every diffusers denoiser family, end to end, on tiny random configs (``ditq_compiler.families``).

One compile per family (module-scoped, shared by the tests below) on random calls shaped as its
pipeline makes them; then roles by structure, W8A8 on a held-out call, drop-in calls, ONNX export run
by ONNX Runtime on integer kernels. A second compile per family goes through ``quantize_pipeline`` on
the family's diffusers pipeline, built from tiny random parts.
"""

import numpy as np
import pytest
import torch

import ditq_compiler as dq
from ditq_compiler.capture import auto_example_inputs
from ditq_compiler.families import FAMILIES

pytest.importorskip("transformers", reason="diffusers' text-conditioned pipelines import transformers")

KEYS = list(FAMILIES)


def sqnr_db(reference: torch.Tensor, other: torch.Tensor) -> float:
    return float(10 * torch.log10(reference.pow(2).sum() / (reference - other).pow(2).sum()))


@pytest.fixture(scope="module", params=KEYS)
def family(request):
    """(family, FP model, compiled W8A8 model, a held-out call): compiled once per family."""
    family = FAMILIES[request.param]
    model = family.model()
    calls = family.calls(count=3)
    compiled = dq.compile(model, "w8a8", calibration=calls[:2], progress=False)
    return family, model, compiled, calls[2]


def test_roles_are_assigned_by_structure_and_shown(family):
    spec, _, compiled, _ = family
    roles = {layer.role for layer in compiled.layers} | {layer.role for layer in compiled.reports.float_layers}
    assert set(spec.roles) <= roles, f"{spec.model_class}: roles {sorted(roles)}"
    head = compiled.summary().head
    assert f"{spec.model_class} compiled with recipe 'w8a8'" in head
    assert all(f"role {role}" in head for role in {layer.role for layer in compiled.reports.float_layers})
    if spec.key in ("sd3", "flux", "wan"):     # joint attention / rotary embeddings: every projection is qkv
        assert not [layer.name for layer in compiled.layers if layer.role == "linear"]


def test_w8a8_is_within_30_db_of_fp_on_a_held_out_call(family):
    _, model, compiled, (args, kwargs) = family
    with torch.no_grad():
        reference = model(*args, **kwargs, return_dict=False)[0]
    assert sqnr_db(reference, compiled(*args, **kwargs, return_dict=False)[0]) > 30


def test_drop_in_calls_return_what_the_original_returns(family):
    _, model, compiled, (args, kwargs) = family
    with torch.no_grad():
        original, as_tuple = model(*args, **kwargs), model(*args, **kwargs, return_dict=False)
    output, explicit = compiled(*args, **kwargs), compiled(*args, **kwargs, return_dict=True)
    output_tuple = compiled(*args, **kwargs, return_dict=False)
    assert type(output) is type(explicit) is type(original)
    assert isinstance(output_tuple, tuple) and len(output_tuple) == len(as_tuple)
    torch.testing.assert_close(output_tuple[0], output[0])


def test_automatic_example_inputs_call_the_model(family):
    spec, model, _, (_, kwargs) = family
    example = auto_example_inputs(model)
    assert set(example) == set(kwargs)
    with torch.no_grad():
        assert torch.isfinite(model(**example, return_dict=False)[0]).all()


def test_onnx_export_runs_on_integer_kernels_in_onnx_runtime(family, tmp_path, capfd):
    from ditq_compiler.backends.ort import OrtModel, profile

    spec, model, compiled, (args, kwargs) = family
    path = compiled.export_onnx(tmp_path / f"{spec.key}.onnx")
    assert "torchvision" not in capfd.readouterr().err          # torch.onnx's registration noise is not shown
    report = profile(path, args, kwargs, threads=1)
    assert set(report.layers) == {layer.name for layer in compiled.layers}
    assert not [name for name, kernel in report.layers.items() if not kernel.integer], report.table()
    ort = OrtModel(path, threads=1)(*args, **kwargs, return_dict=False)[0]
    with torch.no_grad():
        fp = model(*args, **kwargs, return_dict=False)[0]
    assert sqnr_db(compiled(*args, **kwargs, return_dict=False)[0], ort) > 35     # the kernels round their own way
    assert sqnr_db(fp, ort) > 30


@pytest.mark.parametrize("key", KEYS)
def test_quantize_pipeline_on_the_familys_pipeline(key):
    spec = FAMILIES[key]
    pipe = spec.pipeline()
    name = "transformer" if hasattr(pipe, "transformer") else "unet"
    assert type(pipe).__name__ == spec.pipeline_class and type(getattr(pipe, name)).__name__ == spec.model_class

    def generate():
        out = pipe(**spec.pipeline_call(), generator=torch.Generator().manual_seed(0))
        return np.asarray(out.images if hasattr(out, "images") else out.frames)

    fp = generate()
    dq.diffusers.quantize_pipeline(pipe, "w8a8", calibration=spec.pipeline_call(seed=1), steps=3, progress=False)
    assert isinstance(getattr(pipe, name), dq.diffusers.CompiledDenoiser)
    calibration = getattr(pipe, name).compiled.provenance.calibration
    assert calibration["source"] == "pipeline" and calibration["pipeline"] == spec.pipeline_class
    quantized = generate()
    assert quantized.shape == fp.shape and np.isfinite(quantized).all()
    assert np.abs(quantized - fp).mean() < 0.05


def test_a_model_without_diffusion_roles_warns_and_the_summary_says_what_stays_in_float():
    relu = torch.nn.ReLU()
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), relu, torch.nn.Linear(16, 16), relu, torch.nn.Linear(16, 8))
    with pytest.warns(UserWarning, match="no attention, MLP or conditioning layer found"):
        compiled = dq.compile(model, "w8a8", calibration=[((torch.randn(4, 8),), {})], progress=False)
    head = compiled.summary().head
    assert "1 of 3 linear/conv layers quantized" in head and "left in float by the recipe (2;" in head
    assert "role patch_embed (1): 0" in head and "role final (1): 4" in head and "quantize_roles" in head
