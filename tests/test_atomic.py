"""Atomic writes: the old file survives a failed write, no temporary file is left, the suffix is kept."""

import pytest

from ditq_compiler.atomic import replacing, write_text


def test_write_text_creates_the_folder_and_replaces_the_file(tmp_path):
    path = tmp_path / "new" / "table.md"
    assert write_text(path, "first") == path and path.read_text() == "first"
    write_text(path, "second")
    assert path.read_text() == "second" and [p.name for p in path.parent.iterdir()] == ["table.md"]


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    path = write_text(tmp_path / "results.json", "old")
    with pytest.raises(RuntimeError, match="disk full"):
        with replacing(path) as tmp:
            tmp.write_text("half a fi")
            raise RuntimeError("disk full")
    assert path.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["results.json"]


def test_the_temporary_keeps_the_suffix_writers_pick_a_format_from(tmp_path):
    with replacing(tmp_path / "grid.png") as tmp:
        assert tmp.suffix == ".png" and tmp.parent == tmp_path and tmp.name.startswith(".")
        tmp.write_bytes(b"\x89PNG")
    assert (tmp_path / "grid.png").read_bytes() == b"\x89PNG"
