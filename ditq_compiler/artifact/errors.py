"""The errors of saving and loading artifacts (their own module so the verifier and the store share them)."""

from __future__ import annotations


class ArtifactError(RuntimeError):
    """An artifact cannot be written or read; the message names the file, node or tensor and what is wrong."""


class ArtifactVersionWarning(UserWarning):
    """The artifact was written with another torch version than the one loading it."""


__all__ = ["ArtifactError", "ArtifactVersionWarning"]
