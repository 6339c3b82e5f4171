"""The package version (one place: pyproject, artifacts and caches read it from here)."""

__version__ = "0.1.0"
