"""Resumable calibration: finished work is kept on disk until ``compile`` completes.

A compile that runs for an hour must not lose the hour to a Ctrl-C or a killed process. Each
piece of finished work (the calibration statistics; each reconstructed block, per phase) is
written as one safetensors file in a run directory

    <root>/<key>/<entry>.safetensors        root: cache_dir=, else $DITQ_CACHE_DIR,
                                                  else ~/.cache/ditq-compiler

where ``key`` is a BLAKE2b hash of everything the result depends on: the captured graph's code
and every tensor of its state, the recipe, every calibration tensor, and the versions of
ditq-compiler and torch. A later compile with the same key loads the finished entries instead
of recomputing them and carries on from the first missing one; any change to the model, the
recipe, the data or the libraries gives another key, so stale work is never reused. Entries
are written to a temporary file and renamed, so a kill mid-write leaves no half entry. When
``compile`` finishes, its run directory is deleted: the cache holds interrupted work only.

An entry is checked before it is reused, since a disk, a copy or a bug may have changed it: it
carries its name, the key of the compile that made it, the order of its tensors and a checksum of
all of them. An entry that is unreadable, belongs to another entry or key, fails its checksum or
holds a NaN or Inf is discarded with a ``CacheWarning`` naming it, and its work is redone.

Loaded tensors are the exact bytes that were saved, in the order they were saved (a dict built
from them iterates as the original did, so a pass that walks it names its nodes the same), so a
resumed compile gives bitwise the result, and the artifact, of an uninterrupted one (the
reconstruction also stores its random generator's state).

A compile over several processes (``ditq_compiler.distributed``) keeps one cache, rank 0's: rank 0
writes every entry, and what it finds on disk it sends to the other ranks, so they resume from the same
entries whether or not they share its file system. The key does not depend on the number of processes:
a compile interrupted with N processes resumes with any number.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import warnings
from pathlib import Path
from typing import Any, Iterable, Mapping

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor

from ditq_compiler.atomic import replacing
from ditq_compiler.calibration.params import QuantParams
from ditq_compiler.distributed import SINGLE, Distributed

ENV_VAR = "DITQ_CACHE_DIR"
RESERVED_METADATA = ("entry", "key", "order", "checksum")   # what every entry carries besides its own metadata


class CacheWarning(UserWarning):
    """A cache entry could not be trusted; it was discarded and its work is redone."""


def default_root() -> Path:
    return Path(os.environ.get(ENV_VAR) or Path.home() / ".cache" / "ditq-compiler")


def _feed_tensor(h: "hashlib._Hash", name: str, t: Tensor) -> None:
    t = t.detach().cpu().contiguous()
    h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
    h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")


def run_key(graph_code: str, state: Mapping[str, Tensor], recipe: Mapping[str, Any],
            batches: Iterable[Iterable[Any]], versions: Mapping[str, str]) -> str:
    """A hex digest of everything a compile's result depends on."""
    h = hashlib.blake2b(digest_size=16)
    h.update(graph_code.encode())
    for name in sorted(state):
        _feed_tensor(h, name, state[name])
    h.update(json.dumps(recipe, sort_keys=True, default=str).encode())
    for i, flat in enumerate(batches):
        for j, value in enumerate(flat):
            if isinstance(value, Tensor):
                _feed_tensor(h, f"batch{i}.{j}", value)
            else:
                h.update(f"batch{i}.{j}={value!r}".encode())
    h.update(json.dumps(dict(versions), sort_keys=True).encode())
    return h.hexdigest()


def entry_checksum(entry: str, key: str, tensors: Mapping[str, Tensor], metadata: Mapping[str, str]) -> str:
    """BLAKE2b of an entry's name, its compile's key, its metadata and every tensor (name, dtype, shape, bytes)."""
    h = hashlib.blake2b(digest_size=16)
    h.update(json.dumps({"entry": entry, "key": key, "metadata": dict(sorted(metadata.items())),
                         "order": list(tensors)}).encode())
    for name, tensor in tensors.items():
        _feed_tensor(h, name, tensor)
    return h.hexdigest()


class WorkCache:
    """The run directory of one compile; a disabled cache (``root=None``) stores nothing. Over several
    processes, rank 0's directory is the cache (module docstring)."""

    def __init__(self, root: Path | None, key: str, dist: Distributed = SINGLE):
        self.directory = None if root is None else Path(root) / key
        self.key = key
        self.dist = dist
        self.loaded: list[str] = []      # entries this run took from disk, for the progress report

    @property
    def enabled(self) -> bool:
        return self.directory is not None

    def _path(self, entry: str) -> Path:
        safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in entry)
        return self.directory / f"{safe}.safetensors"

    def load(self, entry: str) -> tuple[dict[str, Tensor], dict[str, str]] | None:
        """(tensors in their saved order, metadata) of a finished entry, or None. An entry that cannot be
        trusted (module doc) is discarded with a ``CacheWarning`` and None is returned, so it is redone.
        Over several processes rank 0 reads and checks it and sends the result to the others."""
        if not self.enabled:
            return None
        found = self.dist.broadcast(self._read(entry) if self.dist.is_main else None)
        if found is not None:
            self.loaded.append(entry)
        return found

    def _read(self, entry: str) -> tuple[dict[str, Tensor], dict[str, str]] | None:
        if not self._path(entry).is_file():
            return None
        path = self._path(entry)
        try:
            tensors = load_file(path)
            with safe_open(path, framework="pt") as f:
                metadata = dict(f.metadata() or {})
        except (SafetensorError, OSError, ValueError) as e:
            return self._discard(entry, path, f"is unreadable ({e})")
        problem, ordered = self._check(entry, tensors, metadata)
        if problem:
            return self._discard(entry, path, problem)
        return ordered, {k: v for k, v in metadata.items() if k not in RESERVED_METADATA}

    def _check(self, entry: str, tensors: dict[str, Tensor],
               metadata: dict[str, str]) -> tuple[str | None, dict[str, Tensor]]:
        """(what is wrong with the entry or None, its tensors in their saved order)."""
        if metadata.get("entry") != entry:
            return f"holds entry {metadata.get('entry')!r}, not this one", {}
        if metadata.get("key") != self.key:
            return f"was made by another compile (key {metadata.get('key')!r}, this one is {self.key!r})", {}
        try:
            order = json.loads(metadata.get("order", ""))
        except json.JSONDecodeError:
            order = None
        if not isinstance(order, list) or sorted(order) != sorted(tensors):
            return "does not list its tensors", {}
        ordered = {name: tensors[name] for name in order}
        own = {k: v for k, v in metadata.items() if k not in RESERVED_METADATA}
        if metadata.get("checksum") != entry_checksum(entry, self.key, ordered, own):
            return "is damaged: its checksum does not match its contents", {}
        for name, tensor in ordered.items():
            if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                return f"holds NaN or Inf in tensor '{name}'", {}
        return None, ordered

    def _discard(self, entry: str, path: Path, reason: str) -> None:
        warnings.warn(f"cache entry '{entry}' ({path}) {reason}; it is discarded and that work is redone",
                      CacheWarning, stacklevel=3)
        path.unlink(missing_ok=True)
        return None

    def save(self, entry: str, tensors: Mapping[str, Tensor], metadata: Mapping[str, str] | None = None) -> None:
        """Store ``tensors`` (their order kept) and ``metadata`` as ``entry``, with its key and checksum."""
        if not self.enabled or not self.dist.is_main:
            return
        own = dict(metadata or {})
        clash = sorted(set(own) & set(RESERVED_METADATA))
        if clash:
            raise ValueError(f"cache entry '{entry}': metadata keys {clash} are reserved")
        contiguous = {k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()}
        stamped = {**own, "entry": entry, "key": self.key, "order": json.dumps(list(contiguous)),
                   "checksum": entry_checksum(entry, self.key, contiguous, own)}
        with replacing(self._path(entry)) as tmp:
            save_file(contiguous, tmp, metadata=stamped)

    def finish(self) -> None:
        """The compile completed: its interrupted-work directory is no longer needed."""
        if self.enabled and self.dist.is_main and self.directory.is_dir():
            shutil.rmtree(self.directory, ignore_errors=True)


def open_cache(cache_dir: str | Path | bool | None, key_parts: dict[str, Any], dist: Distributed = SINGLE,
               key: str | None = None) -> WorkCache:
    """``cache_dir``: a folder, None for the default root, False to keep nothing on disk. ``key``: the
    ``run_key`` of ``key_parts``, when it is known already."""
    if cache_dir is False:
        return WorkCache(None, "", dist)
    root = default_root() if cache_dir is None or cache_dir is True else Path(cache_dir)
    return WorkCache(root, key or run_key(**key_parts), dist)


def save_params(cache: WorkCache, entry: str, params: QuantParams) -> None:
    """Store a ``QuantParams``' activation quantizers, smoothing factors, shifts, migration factors and trace as
    one entry (the trace as JSON metadata, its floats exact through ``repr``)."""
    tensors = {**pack("smoothing", params.smoothing), **pack("shifts", params.shifts),
               **pack("factors", params.factors), **pack("act_scale", {n: q[0] for n, q in params.activations.items()}),
               **pack("act_zero_point", {n: q[1] for n, q in params.activations.items()})}
    cache.save(entry, tensors, {"trace": json.dumps(params.trace)})


def load_params(cache: WorkCache, entry: str) -> QuantParams | None:
    """The ``QuantParams`` ``save_params`` stored under ``entry``, or None."""
    finished = cache.load(entry)
    if finished is None:
        return None
    tensors, metadata = finished
    scales, zero_points = unpack("act_scale", tensors), unpack("act_zero_point", tensors)
    return QuantParams(activations={n: (scales[n], zero_points[n]) for n in scales},
                       smoothing=unpack("smoothing", tensors), shifts=unpack("shifts", tensors),
                       factors=unpack("factors", tensors), trace=json.loads(metadata.get("trace", "{}")))


def pack(prefix: str, tensors: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Name tensors ``prefix/name`` so several groups share one entry."""
    return {f"{prefix}/{k}": v for k, v in tensors.items()}


def unpack(prefix: str, tensors: Mapping[str, Tensor]) -> dict[str, Tensor]:
    start = f"{prefix}/"
    return {k[len(start):]: v for k, v in tensors.items() if k.startswith(start)}
