"""Interrupted compiles resume from the last finished block and give the uninterrupted result bitwise."""

import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import ditq_compiler as dq
from ditq_compiler.calibration.cache import WorkCache, run_key
from ditq_compiler.toy import random_dit_batches, small_dit

RECIPE = {"name": "taq-small", "weights": {"bits": 4, "symmetric": False, "granularity": "channel"},
          "activations": {"bits": 8, "symmetric": False}, "shift": {}, "migration": {"top_k": 0.05},
          "reconstruction": {"iterations": 40, "batch_size": 4}}

# The child compiles the same model, recipe and data as the parent, with the cache folder it is given.
# So that the parent interrupts it at a known point, the child (test code, not the library) holds
# still once the library has stored block 0, while block 1 is still to be learned.
CHILD = f"""
import sys, time
import ditq_compiler as dq
from ditq_compiler.calibration import cache
from ditq_compiler.toy import random_dit_batches, small_dit

store = cache.WorkCache.save
def store_then_hold(self, entry, tensors, metadata=None):
    store(self, entry, tensors, metadata)
    if entry == "reconstruct-joint-transformer_blocks.0":
        print("block 0 stored", flush=True)
        time.sleep(600)
cache.WorkCache.save = store_then_hold
dq.compile(small_dit(), dq.Recipe.from_dict({RECIPE!r}), calibration=random_dit_batches(count=2),
           progress=False, cache_dir=sys.argv[1])
"""


def _compile(cache_dir):
    return dq.compile(small_dit(), dq.Recipe.from_dict(RECIPE), calibration=random_dit_batches(count=2),
                      progress=False, cache_dir=cache_dir)


def _run_dirs(root: Path) -> list[Path]:
    return [p for p in root.iterdir() if p.is_dir()] if root.exists() else []


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    root = tmp_path_factory.mktemp("uninterrupted")
    compiled = _compile(root)
    assert _run_dirs(root) == [], "a finished compile leaves no interrupted work behind"
    return compiled


@pytest.mark.parametrize("stop", [signal.SIGINT, signal.SIGKILL], ids=["ctrl-c", "killed"])
def test_interrupted_compile_resumes_from_the_last_finished_block(uninterrupted, tmp_path, stop):
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(tmp_path)], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    line = child.stdout.readline()
    assert line.strip() == "block 0 stored", f"the child failed before block 0: {child.stderr.read()[-3000:]}"
    child.send_signal(stop)
    child.wait(timeout=120)
    assert child.returncode != 0
    (run,) = _run_dirs(tmp_path)
    assert not (run / "reconstruct-joint-transformer_blocks.1.safetensors").exists()

    resumed = _compile(tmp_path)
    assert resumed.resumed_from_cache == ["transforms", "observers", "reconstruct-joint-transformer_blocks.0"]
    assert "resumed an interrupted compile" in resumed.summary()
    assert _run_dirs(tmp_path) == []
    expected = uninterrupted.graph_module.state_dict()
    got = resumed.graph_module.state_dict()
    assert expected.keys() == got.keys()
    for name in expected:
        assert torch.equal(expected[name], got[name]), name
    x = random_dit_batches(count=1, seed=7)[0][1]
    assert torch.equal(uninterrupted(**x).sample, resumed(**x).sample)


def test_run_key_changes_with_weights_recipe_data_and_versions():
    state = {"w": torch.ones(3)}
    batches = [[torch.zeros(2), 5]]
    base = dict(graph_code="graph", state=state, recipe={"a": 1}, batches=batches, versions={"torch": "1"})
    key = run_key(**base)
    assert run_key(**base) == key
    assert run_key(**{**base, "state": {"w": torch.tensor([1.0, 1.0, 1.0 + 1e-6])}}) != key
    assert run_key(**{**base, "recipe": {"a": 2}}) != key
    assert run_key(**{**base, "batches": [[torch.zeros(2), 6]]}) != key
    assert run_key(**{**base, "versions": {"torch": "2"}}) != key
    assert run_key(**{**base, "graph_code": "other graph"}) != key


def test_a_damaged_entry_is_redone_not_trusted(tmp_path):
    cache = WorkCache(tmp_path, "run")
    cache.save("entry", {"x": torch.arange(4.0)})
    tensors, _ = cache.load("entry")
    assert torch.equal(tensors["x"], torch.arange(4.0))
    path = next((tmp_path / "run").glob("entry*"))
    path.write_bytes(path.read_bytes()[:20])
    assert cache.load("entry") is None and not path.exists()


def test_cache_can_be_switched_off(tmp_path, monkeypatch):
    monkeypatch.setenv("DITQ_CACHE_DIR", str(tmp_path))
    compiled = dq.compile(small_dit(), "w8a8", calibration=random_dit_batches(count=2), progress=False,
                          cache_dir=False)
    assert compiled.resumed_from_cache == [] and list(tmp_path.iterdir()) == []
