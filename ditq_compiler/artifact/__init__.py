"""Saved artifacts: ``compiled.save(dir)`` and ``dq.load(dir)`` (see ``store`` for the layout)."""

from ditq_compiler.artifact.store import (FORMAT, FORMAT_VERSION, ArtifactError, ArtifactVersionWarning,
                                          library_versions, load, read_manifest, save)

__all__ = ["FORMAT", "FORMAT_VERSION", "ArtifactError", "ArtifactVersionWarning", "library_versions", "load",
           "read_manifest", "save"]
