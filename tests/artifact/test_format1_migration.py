"""Artifacts written by format 1 (before node meta became one typed record) load and give the same bits."""

import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import ditq_compiler as dq
from ditq_compiler import meta

FIXTURES = Path(__file__).parents[1] / "fixtures" / "artifacts-format1"
NAMES = sorted(p.name for p in FIXTURES.iterdir() if p.is_dir())


@pytest.fixture(autouse=True)
def one_thread():
    """The fixtures' outputs were recorded on one thread; FBGEMM's int8 GEMM (unet-w8a8-int8) sums in
    another order on two, which moves the last bit (the format-1 loader does the same)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_the_fixtures_cover_every_kind_of_record():
    assert NAMES == ["dit-robuq-w1.58a3", "dit-taq-dit-w4a8", "dit-tq-dit-w6a6", "dit-w8a8", "unet-w8a8-int8"]


@pytest.mark.parametrize("name", NAMES)
def test_a_format1_artifact_loads_and_reproduces_its_outputs_bit_for_bit(name):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")          # the fixtures' torch version may differ from this one
        loaded = dq.load(FIXTURES / name)
    stored = load_file(str(FIXTURES / f"{name}.expected.safetensors"))
    inputs = {key.removeprefix("input."): value for key, value in stored.items() if key.startswith("input.")}
    with torch.no_grad():
        out = loaded(**inputs).sample
    assert torch.equal(out, stored["output"])
    records = [meta.get(n) for n in loaded.reference_graph_module.graph.nodes]
    layers = [r for r in records if r.source_node is not None]
    assert layers and all(r.annotation is not None and r.applied for r in layers)
    assert any(r.role is not None for r in records)


def test_the_migrated_records_keep_each_method_s_marks():
    def records(name):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return [meta.get(n) for n in dq.load(FIXTURES / name).reference_graph_module.graph.nodes]
    assert any(r.time_grouped for r in records("dit-tq-dit-w6a6"))
    assert any(r.activation_site is not None and r.activation_site.quantizer == "softmax_mrq"
               for r in records("dit-tq-dit-w6a6"))
    assert any(r.shift for r in records("dit-taq-dit-w4a8"))
    assert any(r.rotation for r in records("dit-robuq-w1.58a3"))


def test_a_resaved_artifact_is_format_2_and_loads_to_the_same_outputs(tmp_path):
    from ditq_compiler.artifact import FORMAT_VERSION, read_manifest
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = dq.load(FIXTURES / "dit-tq-dit-w6a6")
        loaded.save(tmp_path / "again")
        again = dq.load(tmp_path / "again")
    assert read_manifest(tmp_path / "again")["format_version"] == FORMAT_VERSION == 2
    stored = load_file(str(FIXTURES / "dit-tq-dit-w6a6.expected.safetensors"))
    inputs = {key.removeprefix("input."): value for key, value in stored.items() if key.startswith("input.")}
    with torch.no_grad():
        assert torch.equal(again(**inputs).sample, stored["output"])
