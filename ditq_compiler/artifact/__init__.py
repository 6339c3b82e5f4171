"""Saved artifacts: ``compiled.save(dir)`` and ``dq.load(dir)`` (see ``store`` for the layout).

``write_artifact`` / ``read_artifact`` take and give a ``CompileRecord``; ``ditq_compiler.compiled`` wraps
it as the ``CompiledModel`` the user sees. ``verify`` and ``allowed_ops`` are what loading checks
before anything of an artifact runs; ``signing`` its optional signature.
"""

from ditq_compiler.artifact.store import (FORMAT, FORMAT_VERSION, ArtifactError, ArtifactVersionWarning,
                                          check_destination, library_versions, read_artifact, read_manifest,
                                          write_artifact)

__all__ = ["FORMAT", "FORMAT_VERSION", "ArtifactError", "ArtifactVersionWarning", "check_destination",
           "library_versions", "read_artifact", "read_manifest", "write_artifact"]
