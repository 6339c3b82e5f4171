"""Files written atomically: into a temporary file next to the target, then renamed over it.

``os.replace`` is atomic within one filesystem, so a reader sees the old file or the new one, never
half of one, and a write that fails or is interrupted leaves the old file as it was (the temporary
file is removed). The temporary name keeps the target's suffix, so writers that pick a format from
it (matplotlib's ``savefig``, PIL's ``save``) still do.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


@contextmanager
def replacing(path: str | os.PathLike) -> Iterator[Path]:
    """Yields a temporary path to write; on a clean exit it replaces ``path`` (whose folder is created)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp{path.suffix}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text(path: str | os.PathLike, text: str) -> Path:
    """``path`` holds ``text`` (UTF-8), written atomically."""
    with replacing(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


__all__ = ["replacing", "write_text"]
