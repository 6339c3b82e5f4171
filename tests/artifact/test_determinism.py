"""Two compiles of the same model, recipe, calibration and seed write the same artifact, byte for byte, in two
fresh processes with different hash seeds (so no set or dict order from hashing can reach a file).
A compile resumed from its cache writes the same bytes too: ``tests/calibration/test_cache.py``."""

import json
import subprocess
import sys

import torch

import ditq_compiler as dq
from ditq_compiler.toy import random_dit_batches, small_dit
from tests.child import child_env

# a recipe with every source of randomness the compiler has: observers, shift statistics,
# and reconstruction (QDrop draws, mini-batch sampling) seeded by reconstruction.seed
RECIPE = {"name": "taq-small", "weights": {"bits": 4, "symmetric": False, "granularity": "channel"},
          "activations": {"bits": 8, "symmetric": False, "observer": "mse"}, "shift": {},
          "migration": {"top_k": 0.05}, "reconstruction": {"iterations": 20, "batch_size": 4, "seed": 7}}

CHILD = f"""
import sys
import ditq_compiler as dq
from ditq_compiler.toy import random_dit_batches, small_dit

recipe = dq.Recipe.from_dict({RECIPE!r})
dq.compile(small_dit(), recipe, calibration=random_dit_batches(count=2), progress=False,
           cache_dir=False).save(sys.argv[1])
"""


def _compile_and_save(path, seed=7):
    recipe = dq.Recipe.from_dict({**RECIPE, "reconstruction": {**RECIPE["reconstruction"], "seed": seed}})
    compiled = dq.compile(small_dit(), recipe, calibration=random_dit_batches(count=2), progress=False,
                          cache_dir=False)
    return compiled.save(path)


def test_same_inputs_and_seed_give_bitwise_identical_artifacts_in_any_process(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    children = [subprocess.Popen([sys.executable, "-c", CHILD, str(path)], env=child_env(PYTHONHASHSEED=seed),
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                for path, seed in ((a, "1"), (b, "2"))]
    for child in children:                   # both at once: two cores
        _, err = child.communicate(timeout=600)
        assert child.returncode == 0, err[-3000:]
    manifest = json.loads((a / "manifest.json").read_text())
    assert manifest["reconstruction_seed"] == 7
    names = sorted(p.name for p in a.iterdir())
    assert names == sorted(p.name for p in b.iterdir())
    assert manifest["volatile"] == ["run.json"]
    for name in names:
        if name not in manifest["volatile"]:
            assert (a / name).read_bytes() == (b / name).read_bytes(), name
    # the one volatile file holds only when, how long and over how many processes
    assert set(json.loads((a / "run.json").read_text())) == {"created", "stage_seconds", "block_seconds",
                                                             "resumed_from_cache", "world_size"}
    # and another seed is another artifact (the check above can fail)
    c = _compile_and_save(tmp_path / "c", seed=8)
    assert (a / "tensors.safetensors").read_bytes() != (c / "tensors.safetensors").read_bytes()
    x = random_dit_batches(count=1, seed=5)[0][1]
    assert torch.equal(dq.load(a)(**x).sample, dq.load(b)(**x).sample)


def test_a_set_in_the_model_config_is_stored_in_a_fixed_order():
    from ditq_compiler.provenance import model_config

    class Configured(torch.nn.Module):
        config = {"_use_default_values": ["norm_eps", "act_fn", "dropout"], "tags": {"b", "a", "c"}}

    assert model_config(Configured()) == {"_use_default_values": ["act_fn", "dropout", "norm_eps"],
                                          "tags": ["a", "b", "c"]}
