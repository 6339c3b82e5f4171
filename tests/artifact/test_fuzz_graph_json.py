"""Fuzzing graph.json: random mutations of a real artifact's graph (the manifest rewritten to match) never run
code, never allocate past a bound, and never fail with anything but ``ArtifactError``.

A mutation picks one to three places anywhere in the JSON (a node's name, op, target, an argument deep
in a tuple, a meta record, a tensor's kind or packing, the call signature) and replaces the value there
with another (numbers up to 2^63, payload strings that write a sentinel file if they are ever run, op
names of other namespaces, dunder names, nested containers), deletes it, or duplicates it. A mutated
artifact either loads (and then runs on its example call like any model, which may fail as a model may)
or is refused with an ``ArtifactError``. The per-node bound is lowered to 2^22 values so a mutation that
slips past it would show in the process's peak memory. Examples are derandomized and few, to keep the
suite fast; ``DITQ_FUZZ_EXAMPLES=2000`` runs more locally.
"""

import copy
import json
import os
import resource
import shutil
import tempfile
import warnings
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import ditq_compiler as dq
from ditq_compiler.artifact import ArtifactError, verify
from tests.artifact.tamper import rewrite_manifest

SENTINEL = Path(tempfile.mkdtemp(prefix="ditq-fuzz-")) / "payload-ran"
PAYLOAD = f"open({str(SENTINEL)!r}, 'w').write('ran')"
STRINGS = [PAYLOAD, f"x={PAYLOAD}", f"x': {PAYLOAD}, 'y", "__class__", "__globals__", "__builtins__", "__init__",
           "aten::empty.memory_format", "aten::ones.default", "ditq::quant_linear.default", "builtins.exec",
           "operator.getitem", "call_method", "call_module", "get_attr", "placeholder", "output", "x", "gelu",
           "fc1.bias", "ditq_linear_1_w_codes", "float32", "float64", "int8", "cpu", "inf", "nan", "parameter",
           "buffer", "constant", "POSITIONAL_OR_KEYWORD", "builtins.dict", "builtins.tuple", ""]
KEYS = ["node", "tuple", "dict", "float", "dtype", "device", "slice", "layout", "memory_format", "name", "op",
        "target", "args", "kwargs", "meta", "ditq", "bits", "shape", "offset", "kind", "type", "context"]
NUMBERS = st.one_of(st.integers(-3, 20), st.sampled_from([1 << 20, 1 << 31, 1 << 40, (1 << 63) - 1, -(1 << 63)]),
                    st.floats(allow_nan=True, allow_infinity=True))
VALUES = st.recursive(st.one_of(st.none(), st.booleans(), NUMBERS, st.sampled_from(STRINGS), st.text(max_size=6)),
                      lambda inner: st.one_of(st.lists(inner, max_size=4),
                                              st.dictionaries(st.sampled_from(KEYS), inner, max_size=2)),
                      max_leaves=8)
EXAMPLES = int(os.environ.get("DITQ_FUZZ_EXAMPLES", 40))


def places(value, path=()):
    """Every path into a JSON value (keys and indices), the value's own path first."""
    yield path
    if isinstance(value, dict):
        for key, item in value.items():
            yield from places(item, (*path, key))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from places(item, (*path, index))


def mutate(description, path, action, value):
    *parents, last = path
    container = description
    for key in parents:
        container = container[key]
    if action == "replace":
        container[last] = value
    elif action == "delete":
        del container[last]
    elif isinstance(container, list):
        container.insert(last, copy.deepcopy(container[last]))
    else:
        container[f"{last}_copy" if isinstance(last, str) else last] = copy.deepcopy(container[last])
    return description


@pytest.fixture(scope="module")
def original(tiny_artifact):
    return tiny_artifact, json.loads((tiny_artifact / "graph.json").read_text())


@pytest.fixture(scope="module")
def bounded():
    before = verify.MAX_ELEMENTS
    verify.MAX_ELEMENTS = 1 << 22
    yield
    verify.MAX_ELEMENTS = before


@settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                 HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_a_mutated_graph_json_loads_or_is_refused_and_never_runs_or_allocates(original, bounded, tmp_path, data):
    source, base = original
    description = copy.deepcopy(base)
    for _ in range(data.draw(st.integers(1, 3), label="mutations")):
        path = data.draw(st.sampled_from(list(places(description))[1:]), label="where")
        action = data.draw(st.sampled_from(["replace", "replace", "delete", "duplicate"]), label="action")
        description = mutate(description, path, action, data.draw(VALUES, label="value"))
    target = tmp_path / f"mutated-{data.draw(st.integers(0, 1 << 30), label='folder')}"
    shutil.copytree(source, target)
    (target / "graph.json").write_text(json.dumps(description))
    rewrite_manifest(target)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            loaded = dq.load(target)
        except ArtifactError:
            loaded = None
        if loaded is not None:
            try:
                with torch.no_grad():
                    loaded(**loaded.provenance.example_inputs)
            except Exception:  # a graph that verifies may still fail on data, as any model may
                pass
    assert not SENTINEL.exists(), "a mutation ran its payload"
    grown_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak
    assert grown_kib < 512 * 1024, f"loading a mutated artifact raised the peak memory by {grown_kib} KiB"
    shutil.rmtree(target)
