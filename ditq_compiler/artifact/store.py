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

    signature.json              only when saved with ``sign_key=``: an HMAC of the manifest (``signing``)

Loading reads JSON, YAML (``safe_load``) and safetensors only: nothing is unpickled. It checks the
format version (newer: an error), the torch version (different: a warning), the signature when
``verify_key=`` asks for one, and every file's sha256 (a corrupted or truncated file is an error
naming it). Then it verifies what the files hold before any of it runs (``verify``: the ops the
graph may call, names, dtypes, shapes, bounds, scales), rebuilds the graph and, for backend
``torch-int8``, lowers it again. Every failure is an ``ArtifactError``. The loaded model's outputs
equal the saved model's bit for bit (same ops in the same order on the same values).

Artifacts are deterministic: the same model, recipe, calibration and seeds give the same bytes in
every file but ``run.json`` (the manifest included: it holds no time stamp), in any process (no
set or hash order reaches a file) and whether or not the compile resumed from its cache.

Saving owns only its files. Writes go to a temporary directory next to the target (symlinks in
the target path resolved first), which is then swapped in place: with Linux's
``renameat2(RENAME_EXCHANGE)`` in one atomic step, elsewhere by two renames. An existing directory
is only replaced if it is empty or a ditq artifact (its manifest.json a valid ditq manifest);
files in it the artifact did not write (an exported ONNX model, notes) move into the new
artifact, and a folder or a file by an artifact file's name that the old manifest does not list
makes the save refuse, naming it. A save that is killed leaves its temporary directory (named
after its process id); the next save next to it removes those whose process is gone.

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
import re
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

from ditq_compiler.artifact import verify
from ditq_compiler.artifact.bitpack import bits_needed, pack, unpack
from ditq_compiler.artifact.errors import ArtifactError, ArtifactVersionWarning
from ditq_compiler.artifact.graph_json import (GraphFormatError, check_identifier, decode_spec, decode_value,
                                               encode_spec, encode_value, graph_from_json, graph_to_json)
from ditq_compiler.artifact.signing import SIGNATURE, verify_signature, write_signature
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
ARTIFACT_FILES = (MANIFEST, GRAPH, TENSORS, RECIPE, REPORT, RUN, INSPECTION, EXAMPLE, SIGNATURE)


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
                   progress: bool = False, sign_key: bytes | str | None = None) -> Path:
    """Write ``record`` (its fake-quant ``reference`` graph) as an artifact directory at ``path`` (where a
    symlink points, if it is one); returns ``path``. ``sign_key``: also write ``signature.json`` (``signing``).

    For a record calibrated by several processes, called by each of them: rank 0 writes, the others wait."""
    group = default_group() if record.world_size > 1 else None
    if group is None or not group.active:
        return _write_artifact(record, reference, path, progress, sign_key)
    failure = None
    if group.is_main:
        try:
            _write_artifact(record, reference, path, progress, sign_key)
        except Exception as error:   # the others are told before it is raised here
            failure = f"{type(error).__name__}: {error}"
            group.broadcast(failure)
            raise
    failure = group.broadcast(failure)
    if failure is not None:
        raise ArtifactError(f"rank 0 could not write the artifact {path}: {failure}")
    return Path(path)


def _write_artifact(record: CompileRecord, reference: torch.fx.GraphModule, path: str | os.PathLike,
                    progress: bool, sign_key: bytes | str | None) -> Path:
    given, path = Path(path), check_destination(path)
    captured, reports = record.captured, record.reports
    try:
        description, tensors = graph_to_json(reference)
        verify.check_tensors(tensors)           # what loading would refuse is refused now, not after the move
    except (GraphFormatError, ArtifactError) as e:
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
        if sign_key is not None:
            write_signature(tmp, sign_key)
    return given


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
            "timestep_input": captured.timestep_input, "model_class": captured.model_class,
            "max_batch": captured.max_batch}


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


# ---- what a save may replace ---------------------------------------------------------------------
def check_destination(path: str | os.PathLike) -> Path:
    """The directory a save to ``path`` writes (symlinks resolved), after checking it may replace what is
    there: nothing, an empty directory, or a ditq artifact whose files besides its own are plain files
    the new artifact does not write (they are kept). Anything else is an ``ArtifactError`` and nothing
    is touched. ``ditq compile --out`` calls this before compiling."""
    path = Path(os.path.realpath(path))
    if path.exists() and not path.is_dir():
        raise ArtifactError(f"{path} exists and is not a directory; refusing to replace it with an artifact")
    if path.is_dir() and any(path.iterdir()):
        _foreign_entries(path)
    return path


def _owned_files(path: Path) -> set[str]:
    """The files of the artifact at ``path``: its manifest's list, the manifest, run.json and the signature.
    Refuses a directory whose manifest.json is missing or is not a ditq manifest."""
    if not (path / MANIFEST).is_file():
        raise ArtifactError(f"{path} is a non-empty directory that is not a ditq artifact (no {MANIFEST}); "
                            "refusing to replace it")
    try:
        manifest = _parse_manifest(path)
    except ArtifactError as e:
        raise ArtifactError(f"{path} has a {MANIFEST} that is not a valid ditq artifact manifest ({e}); refusing "
                            "to replace it, nothing was changed") from None
    return {*manifest["files"], *manifest.get("volatile", []), MANIFEST, RUN, SIGNATURE}


def _foreign_entries(path: Path) -> list[Path]:
    """What the artifact at ``path`` holds besides its own files: kept on a save, so they must be plain
    files or links whose names the new artifact does not use."""
    owned = _owned_files(path)
    foreign = [entry for entry in sorted(path.iterdir()) if entry.name not in owned]
    refused = [f"{e.name}/ (a directory)" if e.is_dir() and not e.is_symlink() else
               f"{e.name} (an artifact file name the old manifest does not list)"
               for e in foreign if (e.is_dir() and not e.is_symlink()) or e.name in ARTIFACT_FILES]
    if refused:
        raise ArtifactError(f"{path} holds what the artifact did not write and a save could not keep: "
                            f"{', '.join(refused)}; move it out first")
    return foreign


def _carry_foreign(path: Path, tmp: Path) -> None:
    """Link (or copy) the files in the old artifact that it did not write into the new one, before the swap."""
    if not path.is_dir() or not any(path.iterdir()):
        return
    for entry in _foreign_entries(path):
        target = tmp / entry.name
        if entry.is_symlink():
            os.symlink(os.readlink(entry), target)
            continue
        try:
            os.link(entry, target)
        except OSError:     # a filesystem without hard links
            shutil.copy2(entry, target)


# ---- writing a directory atomically --------------------------------------------------------------
_TEMPORARY = re.compile(r"\.(?P<name>.+)\.(?P<pid>[0-9]+)\.[A-Za-z0-9_]+\.ditq-(tmp|old)")


def _temporary_dir(path: Path, kind: str) -> Path:
    """A hidden directory next to ``path`` named after this process, so a later save can tell it is stale."""
    return Path(tempfile.mkdtemp(prefix=f".{path.name}.{os.getpid()}.", suffix=f".ditq-{kind}", dir=path.parent))


def _process_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True         # another save of this process may still be writing it
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _clean_stale(path: Path) -> list[Path]:
    """Remove the temporary directories that earlier saves to ``path`` left when they were killed."""
    removed = []
    for entry in path.parent.iterdir():
        match = _TEMPORARY.fullmatch(entry.name)
        if (match and match["name"] == path.name and entry.is_dir() and not entry.is_symlink()
                and not _process_alive(int(match["pid"]))):
            shutil.rmtree(entry, ignore_errors=True)
            removed.append(entry)
    return removed


@contextmanager
def _atomic_directory(path: Path) -> Iterator[Path]:
    path.parent.mkdir(parents=True, exist_ok=True)
    _clean_stale(path)
    tmp = _temporary_dir(path, "tmp")
    try:
        yield tmp
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)
        for file in tmp.iterdir():
            with open(file, "rb") as f:
                os.fsync(f.fileno())
        _carry_foreign(path, tmp)
        if not path.exists():
            os.rename(tmp, path)
        elif _exchange(tmp, path):
            shutil.rmtree(tmp)          # it now holds the previous artifact
        else:
            old = _temporary_dir(path, "old")
            os.rename(path, old / "artifact")
            try:
                os.rename(tmp, path)
            except BaseException:
                os.rename(old / "artifact", path)      # the previous artifact goes back where it was
                raise
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
def _parse_manifest(path: Path) -> dict[str, Any]:
    """``path``'s manifest, checked to be a ditq manifest: format, version and a well-formed file list."""
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        raise ArtifactError(f"{path} is not a ditq artifact: it has no {MANIFEST}")
    try:
        manifest = json.loads(manifest_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise ArtifactError(f"{manifest_path} is corrupted: {e}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ArtifactError(f"{manifest_path} is not a ditq artifact manifest (format "
                            f"{manifest.get('format') if isinstance(manifest, dict) else None!r})")
    version = manifest.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise ArtifactError(f"{manifest_path}: invalid format_version {version!r}")
    files = manifest.get("files")
    well_formed = isinstance(files, dict) and all(
        isinstance(name, str) and "/" not in name and "\\" not in name and name not in ("", ".", "..")
        and isinstance(entry, dict) and isinstance(entry.get("sha256"), str)
        and isinstance(entry.get("bytes"), int) for name, entry in files.items())
    volatile = manifest.get("volatile", [])
    if not well_formed or not (isinstance(volatile, list) and all(isinstance(v, str) for v in volatile)):
        raise ArtifactError(f"{manifest_path}: malformed file list")
    return manifest


def read_manifest(path: str | os.PathLike) -> dict[str, Any]:
    """The artifact's manifest, after checking its format and version."""
    path = Path(path)
    manifest = _parse_manifest(path)
    version = manifest["format_version"]
    if version > FORMAT_VERSION:
        writer = manifest.get("library_versions", {}).get("ditq-compiler", "a newer version")
        raise ArtifactError(f"{path} uses artifact format {version}, newer than this ditq-compiler reads "
                            f"({FORMAT_VERSION}); it was written by ditq-compiler {writer}: upgrade to load it")
    versions = manifest.get("library_versions")
    saved_torch = versions.get("torch") if isinstance(versions, dict) else None
    if saved_torch != torch.__version__:
        warnings.warn(f"{path} was written with torch {saved_torch}, this is torch {torch.__version__}: outputs may "
                      "differ in the last bits", ArtifactVersionWarning, stacklevel=3)
    return manifest


def _verified(path: Path, manifest: dict[str, Any], name: str) -> Path:
    entry = manifest["files"].get(name)
    file = path / name
    if entry is None:
        raise ArtifactError(f"{path}: the manifest does not list {name}")
    if not file.is_file():
        raise ArtifactError(f"{file} is missing")
    if file.stat().st_size != entry["bytes"] or _sha256(file) != entry["sha256"]:
        raise ArtifactError(f"{file} is corrupted: its checksum does not match the manifest (size "
                            f"{file.stat().st_size} bytes, expected {entry['bytes']}); save the model again")
    return file


def _load_json(file: Path) -> Any:
    try:
        return json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise ArtifactError(f"{file} is not readable JSON: {str(e)[:200]}") from None


def _load_tensors(file: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    try:
        return load_file(str(file))
    except Exception as e:  # safetensors raises its own error types for a bad header or payload
        raise ArtifactError(f"{file} is not a readable safetensors file: {e}") from None


def read_artifact(path: str | os.PathLike, progress: bool = False,
                  verify_key: bytes | str | None = None) -> CompileRecord:
    """The ``CompileRecord`` saved at ``path``, verified (module doc), its graph lowered again for the saved
    backend. ``verify_key``: refuse the artifact unless its signature was made with this key."""
    path = Path(path)
    manifest = read_manifest(path)
    if verify_key is not None:
        verify_signature(path, verify_key)
    try:
        return _read_record(path, manifest, progress)
    except ArtifactError:
        raise
    except GraphFormatError as e:
        raise ArtifactError(f"{path / GRAPH}: {e}") from None
    except Exception as e:  # a malformed part the checks above did not name: still the artifact's fault
        raise ArtifactError(f"{path}: malformed artifact ({type(e).__name__}: {str(e)[:300]})") from None


def _unpacked(description: dict[str, Any], stored: dict[str, torch.Tensor], progress: bool) -> dict[str, torch.Tensor]:
    """The graph's tensors, integer ones unpacked once their packing is checked against their bytes."""
    packed = description.get("packed", {})
    if not isinstance(packed, dict):
        raise ArtifactError("graph.json: 'packed' must map tensor names to their packing")
    tensors = {}
    for name, data in tqdm(stored.items(), desc="unpack tensors", unit="tensor", disable=not progress):
        tensors[name] = unpack(data, verify.packed_info(name, packed[name], data)) if name in packed else data
    missing = sorted(set(packed) - set(stored))
    if missing:
        raise ArtifactError(f"graph.json packs tensor '{missing[0]}', which the tensor file does not hold")
    verify.check_tensors(tensors)
    return tensors


def _read_record(path: Path, manifest: dict[str, Any], progress: bool) -> CompileRecord:
    description = _load_json(_verified(path, manifest, GRAPH))
    if not isinstance(description, dict):
        raise ArtifactError(f"{path / GRAPH}: the graph description must be a mapping")
    tensors = _unpacked(description, _load_tensors(_verified(path, manifest, TENSORS)), progress)
    reference = graph_from_json(description, tensors)
    recipe = Recipe.load(_verified(path, manifest, RECIPE))
    report = _load_json(_verified(path, manifest, REPORT))
    inspection = _load_tensors(_verified(path, manifest, INSPECTION))
    example = _load_tensors(_verified(path, manifest, EXAMPLE))
    verify.check_tensors(example, "example input")

    captured = _captured_from_json(description.get("captured"), reference)
    known = {f.name for f in dataclasses.fields(LayerReport)}
    reports = Reports(layers=[LayerReport(**{k: v for k, v in layer.items() if k in known})
                              for layer in report["layers"]], output_sqnr_db=report["output_sqnr_db"])
    for layer in reports.layers:
        layer.weight_scale = tuple(layer.weight_scale)
    reports.read_extras(report)
    saved = report["provenance"]
    provenance = Provenance(saved["fp_checkpoint_bytes"], saved["model_config"], saved["calibration"],
                            _example_from_files(report.get("example_inputs"), example))
    if provenance.example_inputs is None:
        raise ArtifactError(f"{path}: the artifact has no example call, so its graph's shapes cannot be verified; "
                            "save the model again with this ditq-compiler")
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
    example call, which also verifies the graph (``verify.check_graph``): what the input check,
    re-export and the ONNX lowering read. The fake kernels of the ``ditq::`` ops make this cheap (no
    real compute). Inner nodes keep the example's sizes; the inputs' batch dim (dim 0 where it has
    the example's batch) is made symbolic again, as ``torch.export`` captured it, so a loaded model
    takes any batch like the saved one."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.symbolic_shapes import DimDynamic, ShapeEnv, StatelessSymbolicContext

    inputs = flat_inputs(example)
    verify.check_graph(graph_module, inputs)
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
    except (OSError, json.JSONDecodeError, UnicodeDecodeError, RecursionError):
        return {}
    return run if isinstance(run, dict) else {}


_UNSTORED = object()
_PARAMETER_KINDS = {kind.name: kind for kind in inspect._ParameterKind}


_CAPTURED_FIELDS = {"signature": list, "input_names": list, "sample_input": str, "timestep_input": (str, type(None)),
                    "model_class": str}


def _captured_from_json(data: Any, graph_module) -> CapturedModel:
    """How to call the model: the forward signature (plain names, known kinds, stored defaults) and inputs."""
    if not isinstance(data, dict):
        raise ArtifactError("graph.json: malformed 'captured' entry (how to call the model)")
    for field, kind in _CAPTURED_FIELDS.items():
        if field not in data or not isinstance(data[field], kind):
            raise ArtifactError(f"graph.json: captured.{field} is missing or malformed: {str(data.get(field))[:80]}")
    parameters = []
    for p in data["signature"]:
        if not (isinstance(p, dict) and {"name", "kind", "default"} <= set(p)):
            raise ArtifactError(f"graph.json: malformed call parameter {str(p)[:80]}")
        name = check_identifier(p["name"], "graph.json: call parameter")
        default = inspect.Parameter.empty
        if p["default"] is not None:
            stored = p["default"].get("value", _UNSTORED) if isinstance(p["default"], dict) else _UNSTORED
            default = _UNSTORED if stored is _UNSTORED else decode_value(stored, {}, f"parameter '{name}'")
        if not isinstance(p["kind"], str) or p["kind"] not in _PARAMETER_KINDS:
            raise ArtifactError(f"graph.json: parameter '{name}' has an unknown kind {p['kind']!r}")
        parameters.append(inspect.Parameter(name, _PARAMETER_KINDS[p["kind"]], default=default))
    if not all(isinstance(n, str) for n in data["input_names"]):
        raise ArtifactError("graph.json: malformed input names")
    try:
        signature = inspect.Signature(parameters)
    except ValueError as e:      # parameters out of order, or a name twice
        raise ArtifactError(f"graph.json: the call signature is invalid: {e}") from None
    return CapturedModel(graph_module=graph_module, signature=signature,
                         input_names=tuple(data["input_names"]), sample_input=data["sample_input"],
                         timestep_input=data["timestep_input"], model_class=data["model_class"],
                         max_batch=data.get("max_batch"))


def _example_from_files(description: dict[str, Any] | None, tensors: dict[str, torch.Tensor]) -> dict | None:
    if description is None:
        return None
    leaves = [tensors[leaf["tensor"]] if "tensor" in leaf else decode_value(leaf["value"], {}, "example input")
              for leaf in description["leaves"]]
    return pytree.tree_unflatten(leaves, decode_spec(description["spec"]))


__all__ = ["ARTIFACT_FILES", "FORMAT", "FORMAT_VERSION", "ArtifactError", "ArtifactVersionWarning",
           "check_destination", "library_versions", "read_artifact", "read_manifest", "write_artifact"]
