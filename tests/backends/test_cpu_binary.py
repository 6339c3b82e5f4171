"""Backend ``cpu-binary``: W1A1 layers on the XNOR-popcount kernels give the torch backend's outputs bit for bit.

The small DiT (binary linears) and U-Net (binary convs of every stride and padding it has, one binary linear,
channels-last inputs after its attention) are compiled with ``bidm-w1a1-fpb`` (learned thresholds, clipped
scale) and ``w1a1-xnor`` (mean |x| scale), distillation cut to 2 iterations. The toy calibration batches
carry no noise for the diffusion loss, so distillation mimics the FP output instead (``dm_weight 0``); it
changes what is learned, not the ops.
"""

import dataclasses
import json
import math
import warnings

import pytest
import torch
from torch import fx

import ditq_compiler as dq
from ditq_compiler import meta, toy
from ditq_compiler.artifact import read_manifest
from ditq_compiler.backends.cpu_binary import lower_cpu_binary, xnor_linear
from ditq_compiler.compiled import CompiledModel
from ditq_compiler.kernels import binary_cpu

MODELS = {"dit": (toy.small_dit, toy.random_dit_batches), "unet": (toy.small_unet, toy.random_unet_batches)}
CASES = [(model, preset) for model in MODELS for preset in ("bidm-w1a1-fpb", "w1a1-xnor")]
BINARY_OPS = (torch.ops.ditq.binary_linear.default, torch.ops.ditq.binary_conv2d.default)


def fast(preset: str) -> dq.Recipe:
    recipe = dq.Recipe.load(preset)
    return dataclasses.replace(recipe, distillation=dataclasses.replace(
        recipe.distillation, iterations=2, batch_size=2, dm_weight=0.0, output_weight=1.0))


@pytest.fixture(scope="module")
def compiled():
    """(model, preset, backend) -> the compiled model, each compiled once for the module."""
    done = {}

    def get(model: str, preset: str, backend: str):
        if (model, preset, backend) not in done:
            factory, batches = MODELS[model]
            done[model, preset, backend] = dq.compile(factory(), fast(preset), calibration=batches(count=1),
                                                      backend=backend, progress=False, cache_dir=False)
        return done[model, preset, backend]
    return get


def held_out(model: str) -> dict:
    return MODELS[model][1](count=1, batch_size=3, seed=7)[0][1]


def run(compiled_model, model: str) -> torch.Tensor:
    with torch.no_grad():
        return compiled_model(**held_out(model)).sample


def kernel_label() -> str:
    return f"xnor-popcount ({binary_cpu.kernel_info()['path']})"


def binary_layers(gm: fx.GraphModule) -> set[str]:
    return {meta.get(n).source_node for n in gm.graph.nodes if n.op == "call_function" and n.target in BINARY_OPS}


def with_graph(compiled_model, gm: fx.GraphModule) -> CompiledModel:
    """The compiled model running ``gm`` instead (the reference graph, or another lowering of it)."""
    return CompiledModel(dataclasses.replace(compiled_model.record, graph_module=gm))


@pytest.mark.parametrize("model, preset", CASES, ids=[f"{m}-{p}" for m, p in CASES])
def test_whole_model_equals_the_torch_backend_bit_for_bit(compiled, model, preset):
    reference, fast_model = compiled(model, preset, "torch"), compiled(model, preset, "cpu-binary")
    assert torch.equal(run(fast_model, model), run(reference, model))
    layers = binary_layers(fast_model.reference_graph_module)
    assert len(layers) == len(fast_model.layers) and not binary_layers(fast_model.graph_module)
    assert {layer.kernel for layer in fast_model.layers} == {kernel_label()}
    assert str(fast_model.summary()).count(kernel_label()) == len(layers)


class Outputs(fx.Interpreter):
    """Each binary layer's output, by its source node (the lowered call keeps the reference node's meta)."""

    def __init__(self, gm: fx.GraphModule):
        super().__init__(gm)
        self.layers: dict[str, torch.Tensor] = {}

    def run_node(self, node: fx.Node):
        out = super().run_node(node)
        if node.op == "call_function" and meta.get(node).annotation is not None:
            self.layers[meta.get(node).source_node] = out
        return out


@pytest.mark.parametrize("model, preset", CASES, ids=[f"{m}-{p}" for m, p in CASES])
def test_every_layer_equals_its_reference_op_in_value_and_memory_layout(compiled, model, preset):
    """The layout matters: group norm after a channels-last conv output rounds differently on a contiguous one."""
    fast_model = compiled(model, preset, "cpu-binary")
    captured = fast_model.captured
    inputs = captured.graph_inputs(captured.call_plan.arguments((), held_out(model)))
    reference, lowered = Outputs(fast_model.reference_graph_module), Outputs(fast_model.graph_module)
    with torch.no_grad():
        for interpreter in (reference, lowered):
            interpreter.run(*[inputs[n.name] for n in interpreter.graph.nodes if n.op == "placeholder"])
    assert reference.layers.keys() == lowered.layers.keys() == binary_layers(fast_model.reference_graph_module)
    for name, expected in reference.layers.items():
        got = lowered.layers[name]
        assert torch.equal(got, expected), f"{name}: off by {float((got - expected).abs().max())}"
        assert got.stride() == expected.stride(), name
    if model == "unet":    # the case the layout rule is for
        assert any(t.dim() == 4 and not t.is_contiguous() for t in reference.layers.values())


@pytest.fixture(scope="module")
def saved(compiled, tmp_path_factory):
    path = tmp_path_factory.mktemp("cpu-binary") / "dit-fpb"
    return compiled("dit", "bidm-w1a1-fpb", "cpu-binary").save(path)


def test_an_artifact_loads_on_the_kernels_with_the_same_outputs(compiled, saved):
    original = compiled("dit", "bidm-w1a1-fpb", "cpu-binary")
    loaded = dq.load(saved)
    assert loaded.backend == "cpu-binary"
    assert [layer.kernel for layer in loaded.layers] == [layer.kernel for layer in original.layers]
    assert not binary_layers(loaded.graph_module) and binary_layers(loaded.reference_graph_module)
    assert torch.equal(run(loaded, "dit"), run(original, "dit"))


def test_the_artifact_stores_each_binary_weight_in_one_bit(saved):
    from safetensors import safe_open

    graph = json.loads((saved / "graph.json").read_text())
    bits = {name: info for name, info in graph["packed"].items() if name.endswith("_w_bits")}
    assert len(bits) == 12 and {info["bits"] for info in bits.values()} == {1}
    with safe_open(str(saved / "tensors.safetensors"), framework="pt") as f:
        assert not [name for name in f.keys() if "xnor" in name]     # the kernels' packing is redone at load
        for name, info in bits.items():
            assert f.get_slice(name).get_shape() == [math.ceil(math.prod(info["shape"]) / 8)]
    assert read_manifest(saved)["packed_bits"]["1"] >= 12


@pytest.mark.parametrize("path", [binary_cpu.TORCH, binary_cpu.POPCOUNT])
def test_a_forced_kernel_path_is_named_and_exact(compiled, saved, monkeypatch, path):
    monkeypatch.setenv(binary_cpu.ENV_IMPL, path)
    loaded = dq.load(saved)
    assert {layer.kernel for layer in loaded.layers} == {f"xnor-popcount ({path})"}
    assert torch.equal(run(loaded, "dit"), run(compiled("dit", "bidm-w1a1-fpb", "torch"), "dit"))


@pytest.fixture
def no_compiler(monkeypatch, tmp_path):
    """No C compiler and nothing cached: the kernels cannot be built (reloaded normally afterwards)."""
    monkeypatch.setenv("DITQ_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("CC", "/nonexistent/cc")
    binary_cpu._reset()
    yield
    binary_cpu._reset()


def test_without_a_compiler_every_layer_keeps_the_reference_after_one_warning(compiled, no_compiler):
    model = compiled("unet", "bidm-w1a1-fpb", "cpu-binary")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        gm, kernels = lower_cpu_binary(model.reference_graph_module)
        lower_cpu_binary(model.reference_graph_module)
    assert [str(w.message)[:36] for w in caught] == ["ditq binary kernels: could not build"]
    assert kernels.keys() == binary_layers(model.reference_graph_module)
    assert all(k.startswith("reference (XNOR-popcount kernels not built: ") for k in kernels.values())
    assert torch.equal(run(with_graph(model, gm), "unet"), run(compiled("unet", "bidm-w1a1-fpb", "torch"), "unet"))


def one_binary_linear(dtype: torch.dtype, features: int = 128) -> fx.GraphModule:
    root, graph = torch.nn.Module(), fx.Graph()
    root.register_buffer("w_bits", torch.randint(0, 2, (4, features), dtype=torch.uint8))
    root.register_buffer("w_scale", torch.ones(4))
    x = graph.placeholder("x")
    x.meta["val"] = torch.empty(2, features, dtype=dtype)
    args = (x, graph.get_attr("w_bits"), graph.get_attr("w_scale"), None, None, None, 1, None)
    node = graph.call_function(torch.ops.ditq.binary_linear.default, args)
    meta.update(node, source_node="linear_0")
    graph.output(node)
    return fx.GraphModule(root, graph)


def test_a_layer_the_kernels_cannot_run_keeps_the_reference_with_the_reason(monkeypatch):
    _, kernels = lower_cpu_binary(one_binary_linear(torch.float64))
    assert kernels == {"linear_0": "reference (input is torch.float64: the kernel's epilogue is float32)"}
    monkeypatch.setattr("ditq_compiler.backends.cpu_binary.MAX_TERMS", 100)
    _, kernels = lower_cpu_binary(one_binary_linear(torch.float32))
    assert kernels == {"linear_0": "reference (128 terms per output > 2^24: the float32 reference is not exact there)"}
    reference = one_binary_linear(torch.float32, features=64)
    lowered, kernels = lower_cpu_binary(reference)
    assert kernels == {"linear_0": kernel_label()}
    x = torch.randn(2, 64)
    assert torch.equal(lowered(x), reference(x))


def test_a_layer_called_off_the_cpu_is_an_error_naming_it():
    with pytest.raises(RuntimeError, match=r"layer blocks\.0\.ff: backend 'cpu-binary' runs W1A1 layers on CPU "
                                           r"kernels, got x on meta"):
        xnor_linear(torch.empty(2, 64, device="meta"), torch.zeros(4, 1, dtype=torch.int64), 64, torch.ones(4),
                    None, None, None, 1, None, "blocks.0.ff")


@pytest.mark.parametrize("model", ["dit", "unet"])
def test_a_loaded_w1a1_artifact_exports_to_onnx_runtime(compiled, model, tmp_path):
    """A loaded artifact's graph carries only the shapes its loader propagated: the ONNX lowering of its binary
    layers must not need more (a U-Net's binary convs once asked for the input's rank and failed)."""
    from ditq_compiler.backends.ort import OrtModel
    from ditq_compiler.quant import sqnr_db

    loaded = dq.load(compiled(model, "bidm-w1a1-fpb", "torch").save(tmp_path / "artifact"))
    ort = OrtModel(loaded.export_onnx(tmp_path / "model.onnx"), threads=1)
    inputs = held_out(model)
    assert sqnr_db(run(loaded, model), ort(**inputs).sample) >= 35
