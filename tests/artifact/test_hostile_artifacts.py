"""Hostile artifacts: each tampered artifact (its manifest rewritten to match) fails to load with an
``ArtifactError`` naming the node or tensor, and a sentinel file its payload would write proves that
nothing of it ran. The canary test shows the payload does write the sentinel when torch.fx runs it
unchecked, so the sentinel checks can fail."""

import json

import pytest
import torch
from click.testing import CliRunner
from torch import fx

import ditq_compiler as dq
from ditq_compiler.artifact import ArtifactError
from tests.artifact.tamper import compile_tiny, insert_before_output, node, tampered


@pytest.fixture
def artifact(tiny_artifact):
    return tiny_artifact


@pytest.fixture
def sentinel(tmp_path):
    path = tmp_path / "payload-ran"
    yield path
    assert not path.exists(), "the artifact's payload ran"


def payload(sentinel) -> str:
    return f"open({str(sentinel)!r}, 'w').write('ran')"


def method_chain(sentinel, first: str = "x") -> list[dict]:
    """The attack of a graph.json that may call methods: x.__reduce_ex__.__func__.__globals__['__builtins__']
    ['exec'](payload), one call_method node per step."""
    steps = [("__getattribute__", "__reduce_ex__"), ("__getattribute__", "__func__"),
             ("__getattribute__", "__globals__"), ("get", "__builtins__"), ("get", "exec"),
             ("__call__", payload(sentinel))]
    nodes, previous = [], first
    for i, (method, arg) in enumerate(steps):
        nodes.append({"name": f"step{i}", "op": "call_method", "target": method,
                      "args": {"tuple": [{"node": previous}, arg]}, "kwargs": {"dict": []}, "meta": {}})
        previous = f"step{i}"
    return nodes


def load_fails(path, match: str) -> ArtifactError:
    with pytest.raises(ArtifactError, match=match) as info:
        dq.load(path)
    return info.value


def test_canary_the_method_chain_runs_its_payload_in_plain_fx(sentinel):
    graph, values = fx.Graph(), {}
    values["x"] = graph.placeholder("x")
    for entry in method_chain(sentinel):
        target, (source, arg) = entry["target"], entry["args"]["tuple"]
        values[entry["name"]] = graph.call_method(target, (values[source["node"]], arg))
    graph.output(values["step5"])
    fx.GraphModule(torch.nn.Module(), graph)(torch.zeros(1))
    assert sentinel.exists()
    sentinel.unlink()           # the fixture's check is for the tests below


def test_a_call_method_chain_is_refused(artifact, tmp_path, sentinel):
    path = tampered(artifact, tmp_path / "a", graph=lambda d: insert_before_output(d, *method_chain(sentinel)))
    load_fails(path, r"node 'step0': op 'call_method' is not one of placeholder, get_attr, call_function, output")


def test_the_cli_refuses_it_too_and_prints_nothing_else(artifact, tmp_path, sentinel):
    from ditq_compiler.cli import cli

    path = tampered(artifact, tmp_path / "a", graph=lambda d: insert_before_output(d, *method_chain(sentinel)))
    for command in (["inspect", str(path)], ["export", str(path), "--target", "ort"]):
        result = CliRunner().invoke(cli, command)
        assert result.exit_code != 0 and isinstance(result.exception, ArtifactError), command
        assert "step0" in str(result.exception) and "compiled with recipe" not in result.output
    assert not (path / "model-ort.onnx").exists()


@pytest.mark.parametrize("target, match", [
    ("aten::empty.memory_format", r"node 'big' calls 'aten::empty.memory_format', which a ditq artifact may not call"),
    ("ditq_test::ternary_linear.default", r"node 'big' calls 'ditq_test::ternary_linear.default', which a ditq"),
    ("builtins.exec", r"node 'big' calls 'builtins.exec', which a ditq artifact may not call"),
    ("os::system.default", r"node 'big' calls 'os::system.default'"),
], ids=["aten-empty", "other-namespace", "python-builtin", "unregistered"])
def test_an_op_off_the_list_is_refused_before_it_is_looked_up(artifact, tmp_path, sentinel, target, match):
    big = {"name": "big", "op": "call_function", "target": target, "args": {"tuple": [[1 << 40]]}}
    path = tampered(artifact, tmp_path / "a", graph=lambda d: insert_before_output(d, big))
    load_fails(path, match)


@pytest.mark.parametrize("target, args", [
    ("aten::ones.default", [[1 << 40]]),
    ("aten::arange.start", [0, 1 << 40]),
    ("aten::expand.default", [{"node": "x"}, [1 << 20, 1 << 20, 2, 5, 8]]),
], ids=["ones", "arange", "expand"])
def test_an_allowed_op_asked_for_a_huge_tensor_is_refused_before_anything_is_allocated(artifact, tmp_path, target,
                                                                                       args):
    big = {"name": "big", "op": "call_function", "target": target, "args": {"tuple": args}}
    path = tampered(artifact, tmp_path / "a", graph=lambda d: insert_before_output(d, big))
    load_fails(path, r"node 'big' would make a tensor of shape .*more than the \d+ an artifact's op may")


def test_a_packed_shape_bigger_than_its_bytes_is_refused_before_unpacking(artifact, tmp_path):
    def huge(description):
        zero_bits = next(n for n, info in description["packed"].items() if info["bits"] == 0)
        description["packed"][zero_bits]["shape"] = [1 << 40]
    path = tampered(artifact, tmp_path / "a", graph=huge)
    load_fails(path, r"tensor '\w+': a constant tensor of 1099511627776 values .* zero bits")
    path = tampered(artifact, tmp_path / "b", graph=lambda d: d["packed"]["ditq_linear_1_w_codes"].update(
        shape=[16, 8, 1 << 30]))
    load_fails(path, r"tensor 'ditq_linear_1_w_codes': 137438953472 values at \d bits need")


@pytest.mark.parametrize("name", ["__class__.__repr__", "fc1.__dict__", "training", "forward", "graph",
                                  "embed.register_buffer", "a b", "x;import os"])
def test_a_tensor_name_outside_the_module_s_own_namespace_is_refused(artifact, tmp_path, sentinel, name):
    def rename(description):
        description["constants"][name] = description["constants"].pop("fc1.bias")
        node(description, "fc1_bias")["target"] = name

    def rename_tensor(tensors):
        tensors[name] = tensors.pop("fc1.bias")

    path = tampered(artifact, tmp_path / "a", graph=rename, tensors=rename_tensor)
    repr_before = torch.nn.Module.__repr__
    shown = name.replace(".", "[.]")
    load_fails(path, rf"tensor name '{shown}'.*(not a plain attribute name|every module already has)")
    assert torch.nn.Module.__repr__ is repr_before


@pytest.mark.parametrize("field, value, match", [
    ("placeholder", "class_labels=print(1)", r"node 'class_labels': input name .class_labels=print\(1\). is not a"),
    ("name", "print", r"node 'print': the name is reserved in generated code"),
    ("name", "a; import os", r"node #\d+: name 'a; import os' is not a plain identifier"),
    ("orig_args", "class_labels=print(1)", r"graph input name 'class_labels=print\(1\)' is not a plain identifier"),
    ("keyword", "x': print(1), 'y", r"keyword input name .* is not a plain identifier"),
], ids=["placeholder-target", "reserved-name", "node-name", "signature", "keyword-key"])
def test_names_spelled_in_generated_code_are_plain_identifiers(artifact, tmp_path, sentinel, field, value, match):
    def edit(description):
        if field == "placeholder":
            node(description, "class_labels")["target"] = value.replace("print(1)", payload(sentinel)) \
                if "print" in value else value
        elif field == "name":
            entry = node(description, "gelu")
            entry["name"] = value
            for other in description["nodes"]:
                other["args"] = json.loads(json.dumps(other["args"]).replace('"gelu"', json.dumps(value)))
        elif field == "orig_args":
            description["pytree"]["orig_args"][-1] = value
        else:
            description["pytree"]["in_spec"]["children"][1]["context"][0] = value
    path = tampered(artifact, tmp_path / "a", graph=edit)
    load_fails(path, match.replace(r"print\(1\)", ".*"))


def test_values_nested_without_end_are_refused(artifact, tmp_path):
    deep = 5
    for _ in range(100):
        deep = [deep]
    path = tampered(artifact, tmp_path / "a", graph=lambda d: node(d, "gelu")["args"]["tuple"].append(deep))
    load_fails(path, r"node 'gelu': values nested more than 32 deep")


@pytest.mark.parametrize("edit, match", [
    (lambda t: t.update(ditq_linear_1_w_codes=t["ditq_linear_1_w_codes"].float()),
     r"node 'quant_linear_default' \(ditq::quant_linear.default\): w_codes \(tensor 'ditq_linear_1_w_codes'\) must "
     r"hold integers, got torch.float32"),
    (lambda t: t.update(ditq_linear_1_w_scale=t["ditq_linear_1_w_scale"].to(torch.int32)),
     r"w_scale \(tensor 'ditq_linear_1_w_scale'\) must be floating point"),
    (lambda t: t.update(**{"proj.weight": t["proj.weight"].double()}),
     r"tensor 'proj.weight' is torch.float64; artifacts hold float32"),
    (lambda t: t.update(**{"proj.weight": t["proj.weight"].to(torch.complex64)}),
     r"tensor 'proj.weight' is torch.complex64"),
], ids=["float-codes", "integer-scale", "float64-weight", "complex-weight"])
def test_a_tensor_of_the_wrong_dtype_is_named(artifact, tmp_path, edit, match):
    load_fails(tampered(artifact, tmp_path / "a", tensors=edit), match)


@pytest.mark.parametrize("edit, match", [
    (lambda t: t.update(ditq_linear_1_w_codes=torch.zeros(16, 9, dtype=torch.int8)),
     r"node 'quant_linear_default' \(ditq::quant_linear.default\): w_codes \(tensor 'ditq_linear_1_w_codes'\) has "
     r"shape \(16, 9\): it takes 9 input features, x has shape \(2, 5, 8\)"),
    (lambda t: t.update(ditq_linear_1_w_scale=torch.ones(15)),
     r"w_scale \(tensor 'ditq_linear_1_w_scale'\) has shape \(15,\), which is no weight granularity"),
    (lambda t: t.update(ditq_linear_1_w_zero_point=torch.zeros(3, dtype=torch.int32)),
     r"w_zero_point \(tensor 'ditq_linear_1_w_zero_point'\) has shape \(3,\), w_scale .* has \(16,\)"),
    (lambda t: t.update(**{"fc1.bias": torch.zeros(17)}), r"bias \(tensor 'fc1.bias'\) has 17 values for 16 output"),
    (lambda t: t.update(**{"proj.weight": torch.zeros(8, 9)}),
     r"node 'linear' \(aten::linear.default\) on x \(2, 5, 8\) float32, tensor 'proj.weight' \(8, 9\) float32, "
     r"tensor 'proj.bias' \(8,\) float32 cannot run: a and b must have same reduction dim"),
], ids=["codes", "scale", "zero-point", "bias", "float-weight"])
def test_a_tensor_of_the_wrong_shape_is_named_with_what_its_op_expects(artifact, tmp_path, edit, match):
    load_fails(tampered(artifact, tmp_path / "a", tensors=edit), match)


@pytest.mark.parametrize("edit, match", [
    (lambda t: t["ditq_linear_1_w_scale"].__setitem__(3, float("nan")),
     r"tensor 'ditq_linear_1_w_scale' \(shape \(16,\)\) holds 1 NaN or Inf value\(s\)"),
    (lambda t: t["ditq_linear_2_a_scale"].zero_(),
     r"node 'quant_linear_default_1' .*a_scale \(tensor 'ditq_linear_2_a_scale'\) holds 1 value\(s\) that are not "
     r"finite and positive \(e.g. 0.0\)"),
    (lambda t: t["ditq_linear_1_w_scale"].__setitem__(0, -1.0), r"ditq_linear_1_w_scale.*\(e.g. -1.0\)"),
    (lambda t: t["proj.weight"].__setitem__((0, 0), float("inf")), r"tensor 'proj.weight' .* holds 1 NaN or Inf"),
], ids=["nan-weight-scale", "zero-activation-scale", "negative-scale", "inf-weight"])
def test_non_finite_weights_and_non_positive_scales_are_named(artifact, tmp_path, edit, match):
    load_fails(tampered(artifact, tmp_path / "a", tensors=edit), match)


def test_a_manifest_naming_files_outside_the_artifact_is_refused(artifact, tmp_path):
    path = tampered(artifact, tmp_path / "a")
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["files"]["../../outside"] = manifest["files"].pop("recipe.yaml")
    (path / "manifest.json").write_text(json.dumps(manifest))
    load_fails(path, r"manifest.json: malformed file list")


def test_a_signed_artifact_refuses_any_rewrite(tmp_path):
    compiled = compile_tiny()
    key = b"shared secret between the two machines"
    path = compiled.save(tmp_path / "signed", sign_key=key)
    dq.load(path, verify_key=key)
    with pytest.raises(ArtifactError, match="signature does not match"):
        dq.load(path, verify_key=b"another key")
    forged = tampered(path, tmp_path / "forged", tensors=lambda t: t["fc1.bias"].add_(1.0))
    dq.load(forged)                                       # a rewritten manifest passes the checksums...
    with pytest.raises(ArtifactError, match="the signature does not match the manifest"):
        dq.load(forged, verify_key=key)                   # ...but not the signature
    unsigned = compiled.save(tmp_path / "unsigned")
    with pytest.raises(ArtifactError, match=r"is not signed \(no signature.json\)"):
        dq.load(unsigned, verify_key=key)
