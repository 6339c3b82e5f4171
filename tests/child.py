"""Running test code in a fresh Python process that imports this checkout's ditq_compiler.

A child started with ``sys.executable`` imports whatever ``ditq_compiler`` the interpreter finds: in a
clone with an editable install that is the clone, but in a second worktree it would be the install's
checkout. ``child_env`` puts this checkout's root first on ``PYTHONPATH`` so both give this code.
"""

from __future__ import annotations

import os
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def child_env(**extra: str) -> dict[str, str]:
    """The environment for a child process: this one's, this checkout first on PYTHONPATH, and ``extra``."""
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "PYTHONPATH": path, **extra}
