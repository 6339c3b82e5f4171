"""Saved artifacts: ``compiled.save(dir)`` and ``dq.load(dir)`` (see ``store`` for the layout).

``write_artifact`` / ``read_artifact`` take and give a ``CompileRecord``; ``ditq_compiler.compiled`` wraps
it as the ``CompiledModel`` the user sees.
"""

from ditq_compiler.artifact.store import (FORMAT, FORMAT_VERSION, ArtifactError, ArtifactVersionWarning,
                                          library_versions, read_artifact, read_manifest, write_artifact)

__all__ = ["FORMAT", "FORMAT_VERSION", "ArtifactError", "ArtifactVersionWarning", "library_versions", "read_artifact",
           "read_manifest", "write_artifact"]
