"""Saving owns only its files: it replaces an empty folder or a ditq artifact, keeps the files in it that it did not
write, follows symlinks before it moves anything, and a save killed halfway leaves the old artifact loadable and
its temporary folder for the next save to remove."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

import ditq_compiler as dq
from ditq_compiler.artifact import ArtifactError, check_destination
from tests.child import child_env


@pytest.fixture
def compiled(tiny_artifact):
    return dq.load(tiny_artifact)


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def temporaries(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def test_a_folder_whose_manifest_is_not_a_ditq_manifest_is_refused_and_nothing_is_deleted(compiled, tmp_path):
    project = tmp_path / "project"
    (project / "src").mkdir(parents=True)
    (project / "manifest.json").write_text(json.dumps({"name": "my web app", "version": 3}))
    (project / "src" / "main.py").write_text("print('hello')")
    (project / "notes.txt").write_text("keep me")
    before = snapshot(project)
    with pytest.raises(ArtifactError, match=r"has a manifest.json that is not a valid ditq artifact manifest .*"
                                            r"refusing to replace it, nothing was changed"):
        compiled.save(project)
    (project / "manifest.json").write_text("{not json")
    with pytest.raises(ArtifactError, match="not a valid ditq artifact manifest"):
        compiled.save(project)
    (project / "manifest.json").write_text(json.dumps({"name": "my web app", "version": 3}))
    assert snapshot(project) == before and temporaries(tmp_path) == []


def test_files_the_artifact_did_not_write_are_kept_when_it_is_saved_again(compiled, tmp_path):
    path = compiled.save(tmp_path / "artifact")
    (path / "model-ort.onnx").write_bytes(b"onnx bytes ditq export wrote")
    (path / "notes.md").write_text("calibrated on the June data")
    os.symlink("notes.md", path / "README")
    compiled.save(path)
    assert (path / "model-ort.onnx").read_bytes() == b"onnx bytes ditq export wrote"
    assert (path / "notes.md").read_text() == "calibrated on the June data"
    assert os.readlink(path / "README") == "notes.md"
    assert "model-ort.onnx" not in json.loads((path / "manifest.json").read_text())["files"]
    dq.load(path)
    (path / "plots").mkdir()
    with pytest.raises(ArtifactError, match=r"holds what the artifact did not write and a save could not keep: "
                                            r"plots/ \(a directory\); move it out first"):
        compiled.save(path)
    assert (path / "plots").is_dir() and (path / "model-ort.onnx").exists()


def test_saving_through_a_symlink_replaces_the_folder_it_points_to(compiled, tmp_path):
    real = compiled.save(tmp_path / "store" / "v1")
    link = tmp_path / "current"
    link.symlink_to(real, target_is_directory=True)
    assert compiled.save(link) == link
    assert link.is_symlink() and link.resolve() == real.resolve()
    dq.load(link)
    assert temporaries(tmp_path) == [] and temporaries(real.parent) == []


def test_a_file_in_the_way_is_refused(compiled, tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(ArtifactError, match="is not a directory"):
        check_destination(tmp_path / "file")
    assert check_destination(tmp_path / "new" / "artifact") == (tmp_path / "new" / "artifact").resolve()


# the child loads the artifact and saves it again, holding still once the new tensors are written (test code,
# not the library), so the parent can kill it mid-save
CHILD = """
import sys, time
import safetensors.torch
import ditq_compiler as dq

write = safetensors.torch.save_file
def write_then_hold(tensors, filename, metadata=None):
    write(tensors, filename, metadata=metadata)
    if str(filename).endswith("tensors.safetensors"):
        print("tensors written", flush=True)
        time.sleep(600)
safetensors.torch.save_file = write_then_hold
dq.load(sys.argv[1]).save(sys.argv[1])
"""


def test_a_save_killed_halfway_leaves_the_old_artifact_and_the_next_save_cleans_up(compiled, tmp_path):
    path = compiled.save(tmp_path / "artifact")
    before = snapshot(path)
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(path)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True, env=child_env())
    line = child.stdout.readline()
    assert line.strip() == "tensors written", child.stderr.read()[-3000:]
    child.send_signal(signal.SIGKILL)
    child.wait(timeout=60)
    assert snapshot(path) == before
    dq.load(path)                                        # the old artifact is untouched and loads
    (left,) = temporaries(tmp_path)
    assert left.startswith(f".artifact.{child.pid}.") and left.endswith(".ditq-tmp")
    compiled.save(path)
    assert temporaries(tmp_path) == []                    # the next save removed what the killed one left
    dq.load(path)


def test_ditq_compile_checks_its_destination_before_compiling(tmp_path, monkeypatch):
    from ditq_compiler import model_source
    from ditq_compiler.cli import cli

    def never(*args, **kwargs):
        raise AssertionError("the model was resolved (and would be compiled) before the destination was checked")

    monkeypatch.setattr(model_source, "resolve_model", never)
    project = tmp_path / "project"
    project.mkdir()
    (project / "manifest.json").write_text("{}")
    result = CliRunner().invoke(cli, ["compile", "dit-digits", "--out", str(project)])
    assert isinstance(result.exception, ArtifactError), result.output
    assert "not a valid ditq artifact manifest" in str(result.exception)
    assert (project / "manifest.json").read_text() == "{}"
