"""Interrupted compiles resume from the last finished block and give the uninterrupted result bitwise, and the
same artifact bytes; a damaged or poisoned cache entry is reported, discarded and redone."""

import json
import shutil
import signal
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import ditq_compiler as dq
from ditq_compiler.calibration.cache import CacheWarning, WorkCache, run_key
from ditq_compiler.toy import random_dit_batches, small_dit
from tests.child import child_env

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
def uninterrupted_run(tmp_path_factory):
    """The uninterrupted compile, and a copy of the cache entries it made (taken just before it deleted them)."""
    root, kept = tmp_path_factory.mktemp("uninterrupted"), tmp_path_factory.mktemp("entries")
    finish = WorkCache.finish

    def keep_then_finish(self):
        shutil.copytree(self.directory, kept / self.directory.name)
        finish(self)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(WorkCache, "finish", keep_then_finish)
        compiled = _compile(root)
    assert _run_dirs(root) == [], "a finished compile leaves no interrupted work behind"
    return compiled, kept


@pytest.fixture(scope="module")
def uninterrupted(uninterrupted_run):
    return uninterrupted_run[0]


def assert_same_artifact(a: Path, b: Path) -> None:
    """Every file but the volatile run.json, byte for byte."""
    volatile = json.loads((a / "manifest.json").read_text())["volatile"]
    names = sorted(p.name for p in a.iterdir())
    assert names == sorted(p.name for p in b.iterdir())
    for name in names:
        if name not in volatile:
            assert (a / name).read_bytes() == (b / name).read_bytes(), name


@pytest.mark.parametrize("stop", [signal.SIGINT, signal.SIGKILL], ids=["ctrl-c", "killed"])
def test_interrupted_compile_resumes_from_the_last_finished_block(uninterrupted, tmp_path, stop):
    cache_dir = tmp_path / "cache"
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(cache_dir)], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, env=child_env())
    line = child.stdout.readline()
    assert line.strip() == "block 0 stored", f"the child failed before block 0: {child.stderr.read()[-3000:]}"
    child.send_signal(stop)
    child.wait(timeout=120)
    assert child.returncode != 0
    (run,) = _run_dirs(cache_dir)
    assert not (run / "reconstruct-joint-transformer_blocks.1.safetensors").exists()

    resumed = _compile(cache_dir)
    assert resumed.resumed_from_cache == ["transforms", "observers", "reconstruct-joint-transformer_blocks.0"]
    assert "resumed an interrupted compile" in resumed.summary()
    assert _run_dirs(cache_dir) == []
    # the artifact, too, is the uninterrupted one's (node names included: the cache gives its tensors back in
    # the order they were saved, so passes that walk them name their nodes as an uninterrupted compile does)
    assert_same_artifact(uninterrupted.save(tmp_path / "uninterrupted"), resumed.save(tmp_path / "resumed"))
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


def _flip_a_data_byte(path: Path, tensor: str) -> None:
    """Flip one byte inside ``tensor``'s data (the header stays readable: only a checksum can tell)."""
    data = bytearray(path.read_bytes())
    header = 8 + int.from_bytes(data[:8], "little")
    start, _ = json.loads(data[8:header])[tensor]["data_offsets"]
    data[header + start] ^= 0x01
    path.write_bytes(bytes(data))


def test_a_damaged_entry_is_redone_not_trusted(tmp_path):
    cache = WorkCache(tmp_path, "run")
    cache.save("entry", {"b": torch.arange(4.0), "a": torch.ones(2)}, {"note": "kept"})
    tensors, metadata = cache.load("entry")
    assert list(tensors) == ["b", "a"] and metadata == {"note": "kept"}       # saved order, own metadata
    assert torch.equal(tensors["b"], torch.arange(4.0))
    path = tmp_path / "run" / "entry.safetensors"
    saved = path.read_bytes()

    def truncated():
        path.write_bytes(saved[:20])

    def flipped():
        path.write_bytes(saved)
        _flip_a_data_byte(path, "b")

    def poisoned():
        cache.save("entry", {"b": torch.tensor([1.0, float("nan")])})

    def from_another_compile():
        WorkCache(tmp_path, "other").save("entry", {"b": torch.arange(4.0)})
        (tmp_path / "other" / "entry.safetensors").rename(path)

    for damage, reason in ((truncated, "is unreadable"), (flipped, "is damaged: its checksum does not match"),
                           (poisoned, "holds NaN or Inf in tensor 'b'"),
                           (from_another_compile, "was made by another compile")):
        damage()
        with pytest.warns(CacheWarning, match=rf"cache entry 'entry' \(.*entry.safetensors\) {reason}.*"
                                              r"discarded and that work is redone"):
            assert cache.load("entry") is None, damage.__name__
        assert not path.exists(), damage.__name__


def test_a_damaged_or_poisoned_entry_of_a_compile_is_reported_and_redone(uninterrupted_run, tmp_path):
    """A flipped byte in one reconstructed block and NaNs in the calibration: both are named, recomputed, and the
    result is the uninterrupted compile's."""
    uninterrupted, kept = uninterrupted_run
    shutil.copytree(kept, tmp_path, dirs_exist_ok=True)       # every entry of a finished compile
    (run,) = _run_dirs(tmp_path)
    _flip_a_data_byte(run / "reconstruct-joint-transformer_blocks.0.safetensors",
                      next(iter(load_file(run / "reconstruct-joint-transformer_blocks.0.safetensors"))))
    observers = WorkCache(tmp_path, run.name)
    tensors, metadata = observers.load("observers")
    observers.save("observers", {k: v.clone().fill_(float("nan")) if k.startswith("act_scale/") else v
                                 for k, v in tensors.items()}, metadata)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        redone = _compile(tmp_path)
    reported = [str(w.message) for w in caught if issubclass(w.category, CacheWarning)]
    assert len(reported) == 2
    assert "'observers'" in reported[0] and "holds NaN or Inf in tensor 'act_scale/" in reported[0]
    assert "'reconstruct-joint-transformer_blocks.0'" in reported[1] and "checksum does not match" in reported[1]
    assert redone.resumed_from_cache == ["transforms", "reconstruct-joint-transformer_blocks.1"]
    expected, got = uninterrupted.graph_module.state_dict(), redone.graph_module.state_dict()
    assert expected.keys() == got.keys() and all(torch.equal(expected[k], got[k]) for k in expected)


def test_cache_can_be_switched_off(tmp_path, monkeypatch):
    monkeypatch.setenv("DITQ_CACHE_DIR", str(tmp_path))
    compiled = dq.compile(small_dit(), "w8a8", calibration=random_dit_batches(count=2), progress=False,
                          cache_dir=False)
    assert compiled.resumed_from_cache == [] and list(tmp_path.iterdir()) == []
