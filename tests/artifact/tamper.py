"""A tiny compiled model's artifact, and edits of it as an attacker would make them: any file changed, the
manifest's checksums rewritten to match (they are no defence on their own)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors.torch import load_file, save_file

import ditq_compiler as dq
from ditq_compiler.artifact import store


class TinyDenoiser(torch.nn.Module):
    """A timestep- and class-conditioned MLP: two quantized linears, one float linear, an embedding."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embed = torch.nn.Embedding(10, 8)
        self.proj = torch.nn.Linear(8, 8)
        self.fc1, self.fc2 = torch.nn.Linear(8, 16), torch.nn.Linear(16, 8)

    def forward(self, x, timestep, class_labels):
        h = self.proj(x) + torch.sin(timestep.float())[:, None, None] + self.embed(class_labels)[:, None]
        return self.fc2(torch.nn.functional.gelu(self.fc1(h)))


RECIPE = dq.Recipe.from_dict({"name": "tiny-w4a8", "quantize_roles": list(dq.recipe.ROLES),
                              "weights": {"bits": 4, "symmetric": True, "granularity": "channel"},
                              "activations": {"bits": 8, "symmetric": False},
                              "overrides": [{"name": "proj", "quantize": False}]})


def tiny_batches(count: int = 1, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return [((), {"x": torch.randn(3, 5, 8, generator=g), "timestep": torch.tensor([900, 500, 10]),
                  "class_labels": torch.tensor([1, 2, 9])}) for _ in range(count)]


def compile_tiny():
    return dq.compile(TinyDenoiser(), RECIPE, calibration=tiny_batches(), progress=False, cache_dir=False)


def rewrite_manifest(path: Path) -> None:
    """Make the manifest list every file's current checksum and size, as an attacker would."""
    manifest = json.loads((path / "manifest.json").read_text())
    for name in manifest["files"]:
        file = path / name
        manifest["files"][name] = {"sha256": store._sha256(file), "bytes": file.stat().st_size}
    (path / "manifest.json").write_text(json.dumps(manifest, indent=1))


def tampered(source: Path, target: Path, graph: Callable[[dict], Any] | None = None,
             tensors: Callable[[dict], Any] | None = None) -> Path:
    """A copy of the artifact at ``source`` with ``graph(description)`` / ``tensors(dict)`` applied in place
    (the packing of an edited tensor dropped, so it is stored as given), the manifest rewritten to match."""
    shutil.copytree(source, target)
    description = json.loads((target / "graph.json").read_text())
    if tensors is not None:
        stored = load_file(str(target / "tensors.safetensors"))
        unpacked = {name: store.unpack(data, store.verify.packed_info(name, description["packed"][name], data))
                    if name in description["packed"] else data for name, data in stored.items()}
        before = {name: t.clone() for name, t in unpacked.items()}
        tensors(unpacked)
        for name in set(before) - set(unpacked):
            del stored[name]
            description["packed"].pop(name, None)
        for name, t in unpacked.items():
            if name not in before or t.dtype != before[name].dtype or t.shape != before[name].shape \
                    or not torch.equal(t, before[name]):
                description["packed"].pop(name, None)
                stored[name] = t.contiguous()
        save_file(stored, str(target / "tensors.safetensors"))
    if graph is not None:
        graph(description)
    (target / "graph.json").write_text(json.dumps(description))
    rewrite_manifest(target)
    return target


def node(description: dict, name: str) -> dict:
    return next(n for n in description["nodes"] if n["name"] == name)


def insert_before_output(description: dict, *entries: dict) -> None:
    description["nodes"][-1:-1] = list(entries)
