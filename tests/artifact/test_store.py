"""Artifacts: bitwise round trip, packing, generic ops, versions, corruption, atomic writes, no pickle."""

import json
import pickle
from pathlib import Path
from typing import Optional

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

import ditq_compiler as dq
from ditq_compiler.artifact import ArtifactError, ArtifactVersionWarning, read_manifest
from ditq_compiler.artifact import store


@torch.library.custom_op("ditq_test::ternary_linear", mutates_args=())
def ternary_linear(x: Tensor, codes: Tensor, scale: Tensor, bias: Optional[Tensor], groups: list[int],
                   alpha: float, per_token: bool, unused: Optional[Tensor]) -> Tensor:
    """A stand-in for an op another branch adds: ternary weights, a list, a float, a bool and None."""
    return F.linear(x, codes.to(x.dtype) * scale[:, None] * alpha, bias) + float(per_token) * 0.0 + sum(groups) * 0.0


@ternary_linear.register_fake
def _(x, codes, scale, bias, groups, alpha, per_token, unused):
    return x.new_empty((*x.shape[:-1], codes.shape[0]))


@pytest.fixture(scope="module")
def w4a8(dit, dit_batches):
    return dq.compile(dit, "w4a8-minmax", calibration=dit_batches, progress=False)


def outputs(model, batches):
    with torch.no_grad():
        return [model(*args, **kwargs).sample for args, kwargs in batches]


def assert_bitwise(a, b, batches):
    for x, y in zip(outputs(a, batches), outputs(b, batches), strict=True):
        assert torch.equal(x, y)


def test_round_trip_reproduces_outputs_bitwise(w4a8, dit_batches, tmp_path):
    path = w4a8.save(tmp_path / "dit")
    loaded = dq.load(path)
    assert_bitwise(w4a8, loaded, dit_batches)
    assert loaded.summary() == w4a8.summary()
    assert loaded.recipe == w4a8.recipe and loaded.layers == w4a8.layers
    assert loaded.provenance.calibration == {"source": "batches", "batches": 8}
    assert set(loaded.activation_stats) == set(w4a8.activation_stats)
    assert torch.equal(loaded.activation_stats["linear_3"].hist_after, w4a8.activation_stats["linear_3"].hist_after)


def test_4_bit_codes_are_stored_two_per_byte_and_the_size_is_reported(w4a8, dit, tmp_path):
    from safetensors import safe_open

    path = w4a8.save(tmp_path / "dit")
    graph = json.loads((path / "graph.json").read_text())
    codes = {name: info for name, info in graph["packed"].items() if name.endswith("_w_codes")}
    assert len(codes) == 12 and {info["bits"] for info in codes.values()} == {4}
    with safe_open(str(path / "tensors.safetensors"), framework="pt") as f:
        for name, info in codes.items():
            numel = torch.Size(info["shape"]).numel()
            assert f.get_slice(name).get_shape() == [numel // 2]
    manifest = read_manifest(path)
    assert manifest["packed_bits"]["4"] == 12
    sizes = manifest["sizes"]
    assert sizes["fp_checkpoint_bytes"] == sum(t.numel() * 4 for t in dit.state_dict().values())
    assert sizes["artifact_bytes"] == sum(p.stat().st_size for p in path.iterdir()
                                          if p.name not in ("manifest.json", "run.json"))
    assert sizes["artifact_bytes"] < sizes["fp_checkpoint_bytes"]


def test_a_new_op_with_ternary_codes_round_trips_once_its_module_allows_it(dit, dit_batches, tmp_path):
    """An op registered outside the package is saved and loaded with no change to the format code, once the
    code that registers it allows it (``allowed_ops.allow_op``); an artifact can never allow it itself."""
    from ditq_compiler.artifact import allowed_ops

    compiled = dq.compile(dit, "w8a8-minmax", calibration=dit_batches, progress=False)
    gm = compiled.graph_module
    node = next(n for n in gm.graph.nodes if n.target is torch.ops.ditq.quant_linear.default)
    x, _, _, _, bias = node.args[:5]
    out_features, in_features = gm.get_buffer(node.args[1].target).shape
    codes = torch.randint(-1, 2, (out_features, in_features), generator=torch.Generator().manual_seed(0))
    gm.register_buffer("ternary_codes", codes.to(torch.int8))
    gm.register_buffer("ternary_scale", torch.rand(out_features) * 0.01)
    with gm.graph.inserting_before(node):
        codes_node, scale_node = gm.graph.get_attr("ternary_codes"), gm.graph.get_attr("ternary_scale")
        args = (x, codes_node, scale_node, bias, [2, 3], 0.5, True, None)
        new = gm.graph.call_function(torch.ops.ditq_test.ternary_linear.default, args)
    new.meta.update(node.meta)
    node.replace_all_uses_with(new)
    gm.graph.erase_node(node)
    gm.graph.eliminate_dead_code()
    gm.recompile()

    with pytest.raises(ArtifactError, match=r"calls ditq_test::ternary_linear.default, which a ditq artifact may "
                                            r"not call .*would not load"):
        compiled.save(tmp_path / "ternary")
    allowed_ops.allow_op(torch.ops.ditq_test.ternary_linear.default)
    try:
        path = compiled.save(tmp_path / "ternary")
        assert json.loads((path / "graph.json").read_text())["packed"]["ternary_codes"]["bits"] == 2
        loaded = dq.load(path)
    finally:
        allowed_ops.disallow_op(torch.ops.ditq_test.ternary_linear.default)
    assert "ditq_test.ternary_linear" in loaded.print_readable(print_output=False)
    assert_bitwise(compiled, loaded, dit_batches)
    with pytest.raises(ArtifactError, match=r"node 'ternary_linear_default' calls 'ditq_test::ternary_linear"):
        dq.load(path)


def test_int8_backend_is_lowered_again_on_load(dit, dit_batches, tmp_path):
    compiled = dq.compile(dit, "w4a8-minmax", calibration=dit_batches[:2], progress=False, backend="torch-int8")
    loaded = dq.load(compiled.save(tmp_path / "int8"))
    assert loaded.backend == "torch-int8"
    assert [r.kernel for r in loaded.layers] == [r.kernel for r in compiled.layers]
    assert_bitwise(compiled, loaded, dit_batches)


def test_the_loaded_graph_re_exports(w4a8, tmp_path):
    loaded = dq.load(w4a8.save(tmp_path / "dit"))
    inputs = loaded.provenance.example_inputs
    assert inputs["hidden_states"].shape == (2, 4, 8, 8)
    program = torch.export.export(loaded.graph_module, (), inputs)
    ops = [str(n.target) for n in program.graph.nodes if n.op == "call_function"]
    assert ops.count("ditq.quant_linear.default") == 12
    assert torch.equal(program.module()(**inputs).sample, w4a8(**inputs).sample)


def test_loading_unpickles_nothing(w4a8, tmp_path, monkeypatch):
    path = w4a8.save(tmp_path / "dit")

    def refuse(*args, **kwargs):
        raise AssertionError("artifact loading must not unpickle")

    for name in ("load", "loads", "Unpickler"):
        monkeypatch.setattr(pickle, name, refuse)
    monkeypatch.setattr(torch, "load", refuse)
    dq.load(path)
    assert {p.suffix for p in path.iterdir()} == {".json", ".safetensors", ".yaml"}


def test_a_corrupted_tensor_file_is_a_clear_error(w4a8, tmp_path):
    path = w4a8.save(tmp_path / "dit")
    tensors = path / "tensors.safetensors"
    data = bytearray(tensors.read_bytes())
    data[len(data) // 2] ^= 0xFF
    tensors.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match=r"tensors.safetensors is corrupted: its checksum does not match"):
        dq.load(path)


def test_an_unreadable_tensor_file_is_a_clear_error_even_with_a_matching_checksum(w4a8, tmp_path):
    path = w4a8.save(tmp_path / "dit")
    tensors = path / "tensors.safetensors"
    tensors.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}")
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["files"]["tensors.safetensors"] = {"sha256": store._sha256(tensors), "bytes": tensors.stat().st_size}
    (path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match="tensors.safetensors is not a readable safetensors file"):
        dq.load(path)


def test_a_newer_format_is_an_error_and_another_torch_a_warning(w4a8, tmp_path):
    path = w4a8.save(tmp_path / "dit")
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["library_versions"]["torch"] = "2.99.0"
    (path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.warns(ArtifactVersionWarning, match="written with torch 2.99.0"):
        dq.load(path)
    manifest["format_version"] = store.FORMAT_VERSION + 1
    (path / "manifest.json").write_text(json.dumps(manifest))
    newer = store.FORMAT_VERSION + 1
    with pytest.raises(ArtifactError, match=f"uses artifact format {newer}, newer than this ditq-compiler reads"):
        dq.load(path)
    with pytest.raises(ArtifactError, match="is not a ditq artifact: it has no manifest.json"):
        dq.load(tmp_path)


def test_writes_are_atomic(w4a8, tmp_path, monkeypatch):
    path = w4a8.save(tmp_path / "dit")
    before = {p.name: p.read_bytes() for p in path.iterdir()}

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(w4a8.recipe.__class__, "save", fail)
    with pytest.raises(OSError, match="disk full"):
        w4a8.save(path)
    assert {p.name: p.read_bytes() for p in path.iterdir()} == before      # the old artifact is untouched
    assert [p.name for p in tmp_path.iterdir()] == ["dit"]                   # and no temporary directory is left
    monkeypatch.undo()
    w4a8.save(path)                                                          # replacing an artifact works
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dit"]
    dq.load(path)


def test_a_directory_that_is_not_an_artifact_is_never_replaced(w4a8, tmp_path):
    (tmp_path / "precious.txt").write_text("keep me")
    with pytest.raises(ArtifactError, match="not a ditq artifact .* refusing to replace it"):
        w4a8.save(tmp_path)
    assert (tmp_path / "precious.txt").read_text() == "keep me"
    Path(tmp_path / "file").write_text("x")
    with pytest.raises(ArtifactError, match="is not a directory"):
        w4a8.save(tmp_path / "file")


@pytest.mark.parametrize("factory", ["small_pixart", "small_unet_condition"])
def test_other_denoisers_round_trip_bitwise(factory, tmp_path):
    """Nested inputs (PixArt's added_cond_kwargs with None values), cross-attention, convs and GEGLU."""
    from ditq_compiler import toy
    from ditq_compiler.capture import auto_example_inputs

    model = getattr(toy, factory)()
    batches = [((), auto_example_inputs(model, batch_size=2))]
    compiled = dq.compile(model, "w8a8-minmax", calibration=batches, progress=False)
    assert_bitwise(compiled, dq.load(compiled.save(tmp_path / factory)), batches)
