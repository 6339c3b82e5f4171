"""``compiled.save(dir)`` / ``dq.load(dir)``: a versioned artifact directory, written atomically.

    manifest.json               format name and version, library versions, sha256 and size of every
                                other file, sizes (artifact vs FP checkpoint), recipe, backend,
                                calibration (seed included)
    graph.json                  the rewritten reference graph (``graph_json``), how its integer
                                tensors are packed, and how to call it (signature, input names)
    tensors.safetensors         every tensor the graph reads; integer tensors (weight codes, zero
                                points) packed at the bits their values need (``bitpack``)
    recipe.yaml                 the recipe, as ``Recipe.save`` writes it
    report.json                 per-layer report, output SQNR, provenance, and what the summary
                                shows besides: TQ-DiT's activation sites and time groups, RobuQ's
                                rotations and AMPN allocation, the layers left in float
    run.json                    when it was made, how long each stage took and how many processes
                                calibrated it (``world_size``): the one file that differs between
                                two compiles of the same inputs, so it is listed in the manifest
                                as volatile and has no checksum
    inspection.safetensors      per-layer activation statistics (``inspection.activations``)
    example_inputs.safetensors  one call of the model (two rows), for re-export and checks

Loading reads JSON, YAML (``safe_load``) and safetensors only: nothing is unpickled. It checks the
format version (newer: an error), the torch version (different: a warning) and every file's
sha256 (a corrupted or truncated file is an error naming it), then rebuilds the graph and, for
backend ``torch-int8``, lowers it again. The loaded model's outputs equal the saved model's bit
for bit (same ops in the same order on the same values).

Artifacts are deterministic: the same model, recipe, calibration and seeds give the same bytes in
every file but ``run.json`` (the manifest included: it holds no time stamp).

Writes go to a temporary directory next to the target, which is then swapped in place: with
Linux's ``renameat2(RENAME_EXCHANGE)`` in one atomic step, elsewhere by two renames. An existing
directory is only replaced if it is a ditq artifact (has a manifest) or empty.

A model compiled by several processes (``ditq_compiler.distributed``) is saved by every one of them:
rank 0 writes the artifact and the others wait until it has (and fail with its error if it failed).
"""

from __future__ import annotations

import ctypes
import dataclasses
import datetime
import hashlib
import inspect
import json
import os
import platform
import shutil
import tempfile
import warnings
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.utils._pytree as pytree
from tqdm.auto import tqdm

from ditq_compiler.artifact.bitpack import PackedInfo, bits_needed, pack, unpack
from ditq_compiler.artifact.graph_json import (GraphFormatError, decode_spec, decode_value, encode_spec,
                                               encode_value, graph_from_json, graph_to_json)
from ditq_compiler import meta
from ditq_compiler.backends.registry import lower
from ditq_compiler.calibration.data import flat_inputs
from ditq_compiler.capture import CapturedModel
from ditq_compiler.distributed import default_group
from ditq_compiler.inspection.activations import LayerActivations
from ditq_compiler.provenance import Provenance
from ditq_compiler.recipe import Recipe
from ditq_compiler.records import CompileRecord, LayerReport, Reports

FORMAT = "ditq-artifact"
FORMAT_VERSION = 2      # 2: graph.json node meta as one typed record (format 1 is read and migrated)
MANIFEST = "manifest.json"
GRAPH, TENSORS, RECIPE, REPORT = "graph.json", "tensors.safetensors", "recipe.yaml", "report.json"
RUN = "run.json"
INSPECTION, EXAMPLE = "inspection.safetensors", "example_inputs.safetensors"
LIBRARIES = ("ditq-compiler", "torch", "diffusers", "safetensors", "numpy")


class ArtifactError(RuntimeError):
    """An artifact cannot be written or read; the message names the file and what is wrong."""


class ArtifactVersionWarning(UserWarning):
    """The artifact was written with another torch version than the one loading it."""


def library_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    versions["torch"] = torch.__version__
    return versions


# ---- writing -------------------------------------------------------------------------------------
def write_artifact(record: CompileRecord, reference: torch.fx.GraphModule, path: str | os.PathLike,
                   progress: bool = False) -> Path:
    """Write ``record`` (its fake-quant ``reference`` graph) as an artifact directory at ``path``; returns it.

    For a record calibrated by several processes, called by each of them: rank 0 writes, the others wait."""
    group = default_group() if record.world_size > 1 else None
    if group is None or not group.active:
        return _write_artifact(record, reference, path, progress)
    failure = None
    if group.is_main:
        try:
            _write_artifact(record, reference, path, progress)
        except Exception as error:   # the others are told before it is raised here
            failure = f"{type(error).__name__}: {error}"
            group.broadcast(failure)
            raise
    failure = group.broadcast(failure)
    if failure is not None:
        raise ArtifactError(f"rank 0 could not write the artifact {path}: {failure}")
    return Path(path)


def _write_artifact(record: CompileRecord, reference: torch.fx.GraphModule, path: str | os.PathLike,
                    progress: bool) -> Path:
    path = Path(path)
    _check_replaceable(path)
    captured, reports = record.captured, record.reports
    try:
        description, tensors = graph_to_json(reference)
    except GraphFormatError as e:
        raise ArtifactError(f"cannot save {captured.model_class}: {e}") from None
    stored, packed = _pack_tensors(tensors, progress)
    description["packed"] = packed
    description["captured"] = _captured_to_json(captured)
    provenance: Provenance = record.provenance
    example = _example_to_files(provenance.example_inputs)
    report = {
        "layers": [dataclasses.asdict(layer) for layer in reports.layers],
        "output_sqnr_db": reports.output_sqnr_db,
        "backend": record.backend,
        "provenance": {"fp_checkpoint_bytes": provenance.fp_checkpoint_bytes, "model_config": provenance.model_config,
                       "calibration": provenance.calibration},
        "example_inputs": example[0],
        **reports.extras_to_json(),
    }
    inspection = {key: value for name, stats in reports.activation_stats.items()
                  for key, value in stats.tensors(f"{name}/").items()}
    from safetensors.torch import save_file

    with _atomic_directory(path) as tmp:
        (tmp / GRAPH).write_text(json.dumps(description))
        save_file(stored, str(tmp / TENSORS))
        record.recipe.save(tmp / RECIPE)
        (tmp / REPORT).write_text(json.dumps(report, indent=1))
        save_file(inspection, str(tmp / INSPECTION))
        save_file(example[1], str(tmp / EXAMPLE))
        files = {p.name: {"sha256": _sha256(p), "bytes": p.stat().st_size} for p in sorted(tmp.iterdir())}
        run = {"created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
               "stage_seconds": record.stage_seconds, "block_seconds": reports.unit_seconds,
               "resumed_from_cache": record.resumed_from_cache, "world_size": record.world_size}
        (tmp / RUN).write_text(json.dumps(run, indent=1))
        manifest = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "volatile": [RUN],
            "library_versions": library_versions(),
            "model_class": captured.model_class,
            "recipe": record.recipe.name,
            "backend": record.backend,
            "calibration": provenance.calibration,
            "reconstruction_seed": record.recipe.reconstruction.seed if record.recipe.reconstruction else None,
            "sizes": {"artifact_bytes": sum(f["bytes"] for f in files.values()),   # run.json's few bytes aside
                      "tensor_bytes": files[TENSORS]["bytes"],
                      "fp_checkpoint_bytes": provenance.fp_checkpoint_bytes},
            "packed_bits": _bit_counts(packed),
            "files": files,
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
    return path


def _pack_tensors(tensors: dict[str, torch.Tensor], progress: bool) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    stored, packed, seen = {}, {}, set()
    for name, tensor in tqdm(tensors.items(), desc="pack tensors", unit="tensor", disable=not progress):
        tensor = tensor.detach().cpu()
        bits = bits_needed(tensor)
        if bits is not None and bits < 8 * tensor.element_size():
            data, info = pack(tensor)
            stored[name], packed[name] = data, info.to_dict()
            continue
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset())
        stored[name] = tensor.clone() if key in seen else tensor.contiguous()   # safetensors refuses shared memory
        seen.add(key)
    return stored, packed


def _bit_counts(packed: dict[str, Any]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for info in packed.values():
        counts[str(info["bits"])] = counts.get(str(info["bits"]), 0) + 1
    return dict(sorted(counts.items(), key=lambda kv: int(kv[0])))


def _captured_to_json(captured: CapturedModel) -> dict[str, Any]:
    parameters = []
    for p in captured.signature.parameters.values():
        try:
            default = None if p.default is inspect.Parameter.empty else {"value": encode_value(p.default, p.name)}
        except GraphFormatError:
            default = {"unstored": repr(p.default)}
        parameters.append({"name": p.name, "kind": p.kind.name, "default": default})
    return {"signature": parameters, "input_names": list(captured.input_names), "sample_input": captured.sample_input,
            "timestep_input": captured.timestep_input, "model_class": captured.model_class}


def _example_to_files(example: dict[str, Any] | None) -> tuple[dict[str, Any] | None, dict[str, torch.Tensor]]:
    if example is None:
        return None, {}
    leaves, spec = pytree.tree_flatten(example)
    tensors, encoded = {}, []
    for i, leaf in enumerate(leaves):
        if isinstance(leaf, torch.Tensor):
            tensors[f"input.{i}"] = leaf.detach().cpu().contiguous()
            encoded.append({"tensor": f"input.{i}"})
        else:
            encoded.append({"value": encode_value(leaf, "example input")})
    return {"spec": encode_spec(spec), "leaves": encoded}, tensors


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _check_replaceable(path: Path) -> None:
    if path.exists() and not path.is_dir():
        raise ArtifactError(f"{path} exists and is not a directory; refusing to replace it with an artifact")
    if path.is_dir() and any(path.iterdir()) and not (path / MANIFEST).is_file():
        raise ArtifactError(f"{path} is a non-empty directory that is not a ditq artifact (no {MANIFEST}); "
                            "refusing to replace it")


@contextmanager
def _atomic_directory(path: Path) -> Iterator[Path]:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)
        for file in tmp.iterdir():
            with open(file, "rb") as f:
                os.fsync(f.fileno())
        if not path.exists():
            os.rename(tmp, path)
        elif _exchange(tmp, path):
            shutil.rmtree(tmp)          # it now holds the previous artifact
        else:
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".old", dir=path.parent))
            os.rename(path, old / "artifact")
            os.rename(tmp, path)
            shutil.rmtree(old)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (Linux renameat2 with RENAME_EXCHANGE); False where unsupported."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    return renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0


# ---- reading -------------------------------------------------------------------------------------
def read_manifest(path: str | os.PathLike) -> dict[str, Any]:
    """The artifact's manifest, after checking its format and version."""
    path = Path(path)
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        raise ArtifactError(f"{path} is not a ditq artifact: it has no {MANIFEST}")
    try:
        manifest = json.loads(manifest_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ArtifactError(f"{manifest_path} is corrupted: {e}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ArtifactError(f"{manifest_path} is not a ditq artifact manifest (format "
                            f"{manifest.get('format') if isinstance(manifest, dict) else None!r})")
    version = manifest.get("format_version")
    if not isinstance(version, int) or version < 1:
        raise ArtifactError(f"{manifest_path}: invalid format_version {version!r}")
    if version > FORMAT_VERSION:
        writer = manifest.get("library_versions", {}).get("ditq-compiler", "a newer version")
        raise ArtifactError(f"{path} uses artifact format {version}, newer than this ditq-compiler reads "
                            f"({FORMAT_VERSION}); it was written by ditq-compiler {writer}: upgrade to load it")
    saved_torch = manifest.get("library_versions", {}).get("torch")
    if saved_torch != torch.__version__:
        warnings.warn(f"{path} was written with torch {saved_torch}, this is torch {torch.__version__}: outputs may "
                      "differ in the last bits", ArtifactVersionWarning, stacklevel=3)
    return manifest


def _verified(path: Path, manifest: dict[str, Any], name: str) -> Path:
    entry = manifest.get("files", {}).get(name)
    file = path / name
    if entry is None:
        raise ArtifactError(f"{path}: the manifest does not list {name}")
    if not file.is_file():
        raise ArtifactError(f"{file} is missing")
    if file.stat().st_size != entry["bytes"] or _sha256(file) != entry["sha256"]:
        raise ArtifactError(f"{file} is corrupted: its checksum does not match the manifest (size "
                            f"{file.stat().st_size} bytes, expected {entry['bytes']}); save the model again")
    return file


def _load_tensors(file: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    try:
        return load_file(str(file))
    except Exception as e:  # safetensors raises its own error types for a bad header or payload
        raise ArtifactError(f"{file} is not a readable safetensors file: {e}") from None


def read_artifact(path: str | os.PathLike, progress: bool = False) -> CompileRecord:
    """The ``CompileRecord`` saved at ``path``, its graph lowered again for the saved backend."""
    path = Path(path)
    manifest = read_manifest(path)
    description = json.loads(_verified(path, manifest, GRAPH).read_text())
    stored = _load_tensors(_verified(path, manifest, TENSORS))
    tensors = {}
    for name, data in tqdm(stored.items(), desc="unpack tensors", unit="tensor", disable=not progress):
        info = description.get("packed", {}).get(name)
        tensors[name] = unpack(data, PackedInfo.from_dict(info)) if info else data
    try:
        reference = graph_from_json(description, tensors)
    except GraphFormatError as e:
        raise ArtifactError(f"{path / GRAPH}: {e}") from None
    recipe = Recipe.load(_verified(path, manifest, RECIPE))
    report = json.loads(_verified(path, manifest, REPORT).read_text())
    inspection = _load_tensors(_verified(path, manifest, INSPECTION))
    example = _load_tensors(_verified(path, manifest, EXAMPLE))

    captured = _captured_from_json(description["captured"], reference)
    known = {f.name for f in dataclasses.fields(LayerReport)}
    reports = Reports(layers=[LayerReport(**{k: v for k, v in layer.items() if k in known})
                              for layer in report["layers"]], output_sqnr_db=report["output_sqnr_db"])
    for layer in reports.layers:
        layer.weight_scale = tuple(layer.weight_scale)
    reports.read_extras(report)
    saved = report["provenance"]
    provenance = Provenance(saved["fp_checkpoint_bytes"], saved["model_config"], saved["calibration"],
                            _example_from_files(report.get("example_inputs"), example))
    if provenance.example_inputs is not None:
        _restore_shapes(reference, provenance.example_inputs)
    backend = report["backend"]
    lowered, kernels = lower(backend, reference)
    if kernels:
        sources = {meta.get(n).annotation.name: meta.get(n).source_node for n in reference.graph.nodes
                   if meta.get(n).source_node is not None and meta.get(n).annotation is not None}
        for layer in reports.layers:
            layer.kernel = kernels.get(sources.get(layer.name), "reference")
    names = sorted({key.rsplit("/", 1)[0] for key in inspection})
    reports.activation_stats = {name: LayerActivations.from_tensors(inspection, f"{name}/") for name in names}
    run = _read_run(path)
    reports.unit_seconds = run.get("block_seconds", {})
    return CompileRecord(graph_module=lowered, captured=captured, recipe=recipe, backend=backend,
                         reference_graph=None if lowered is reference else reference, reports=reports,
                         stage_seconds=run.get("stage_seconds", report.get("stage_seconds")) or {},
                         resumed_from_cache=run.get("resumed_from_cache", []), provenance=provenance,
                         world_size=int(run.get("world_size", 1)),
                         manifest={**manifest, "created": run.get("created", "unknown")})   # shown by inspect


def _restore_shapes(graph_module, example: dict[str, Any]) -> None:
    """Every node's ``meta["val"]`` (a saved graph has none), by fake-tensor propagation of the saved
    example call: what the input check, re-export and the ONNX lowering read. The fake kernels of the
    ``ditq::`` ops make this cheap (no real compute). Inner nodes keep the example's sizes; the
    inputs' batch dim (dim 0 where it has the example's batch) is made symbolic again, as
    ``torch.export`` captured it, so a loaded model takes any batch like the saved one."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.symbolic_shapes import DimDynamic, ShapeEnv, StatelessSymbolicContext
    from torch.fx.passes.fake_tensor_prop import FakeTensorProp

    inputs = flat_inputs(example)
    FakeTensorProp(graph_module, FakeTensorMode(allow_non_fake_inputs=True)).propagate(*inputs)
    batch = next((t.shape[0] for t in inputs if isinstance(t, torch.Tensor) and t.dim() > 0), None)
    symbolic = FakeTensorMode(shape_env=ShapeEnv())
    placeholders = [n for n in graph_module.graph.nodes if n.op == "placeholder"]
    for node, value in zip(placeholders, inputs, strict=True):
        if isinstance(value, torch.Tensor):
            sizes = [DimDynamic.DYNAMIC if i == 0 and size == batch else DimDynamic.STATIC
                     for i, size in enumerate(value.shape)]
            node.meta["val"] = symbolic.from_tensor(value, symbolic_context=StatelessSymbolicContext(
                dynamic_sizes=sizes))


def _read_run(path: Path) -> dict[str, Any]:
    """run.json: informative only (times), so a missing or damaged one is an empty record, not an error."""
    try:
        run = json.loads((path / RUN).read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return {}
    return run if isinstance(run, dict) else {}


_UNSTORED = object()


def _captured_from_json(data: dict[str, Any], graph_module) -> CapturedModel:
    parameters = []
    for p in data["signature"]:
        default = inspect.Parameter.empty
        if p["default"] is not None:
            default = decode_value(p["default"]["value"], {}, p["name"]) if "value" in p["default"] else _UNSTORED
        kind = getattr(inspect.Parameter, p["kind"], None)
        if not isinstance(kind, type(inspect.Parameter.POSITIONAL_OR_KEYWORD)):
            raise ArtifactError(f"graph.json: parameter '{p['name']}' has an unknown kind {p['kind']!r}")
        parameters.append(inspect.Parameter(p["name"], kind, default=default))
    return CapturedModel(graph_module=graph_module, signature=inspect.Signature(parameters),
                         input_names=tuple(data["input_names"]), sample_input=data["sample_input"],
                         timestep_input=data["timestep_input"], model_class=data["model_class"])


def _example_from_files(description: dict[str, Any] | None, tensors: dict[str, torch.Tensor]) -> dict | None:
    if description is None:
        return None
    leaves = [tensors[leaf["tensor"]] if "tensor" in leaf else decode_value(leaf["value"], {}, "example input")
              for leaf in description["leaves"]]
    return pytree.tree_unflatten(leaves, decode_spec(description["spec"]))


__all__ = ["FORMAT", "FORMAT_VERSION", "ArtifactError", "ArtifactVersionWarning", "library_versions", "read_artifact",
           "read_manifest", "write_artifact"]
