"""Compile a C kernel file into a shared library on first use, cache it, load it with ctypes.

The library is built by the system C compiler (``$CC``, else ``cc``, ``gcc`` or ``clang`` on the
``PATH``) and kept at

    <root>/kernels/<stem>-<key>.so      root: $DITQ_CACHE_DIR, else ~/.cache/ditq-compiler
    key = sha256(source bytes, `cc --version` output, flags, machine)[:20]

so a changed source, compiler or flag set builds a new file and a stale one is never loaded. The
compiler writes a temporary file in the same folder that ``os.replace`` renames into place:
processes building at the same time each rename a complete library, and a killed build leaves
no half file under the final name. When the cache folder cannot be written, the library is
built in a temporary folder for this process only.

Flag sets are tried in order (say, with OpenMP and then without) and the first one that
compiles *and* loads wins; a cached library for any of them is used before anything is
compiled. ``BuildError`` says what every attempt printed. Nothing is downloaded.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shlex
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

ENV_CC = "CC"
ENV_CACHE = "DITQ_CACHE_DIR"
COMPILE_TIMEOUT_S = 120


class BuildError(RuntimeError):
    """No flag set produced a loadable library (or there is no compiler)."""


@dataclass(frozen=True)
class Built:
    library: ctypes.CDLL
    path: Path
    compiler: str           # the command, as run
    compiler_version: str   # first line of `cc --version`
    flags: tuple[str, ...]  # the attempt's flags (the base flags not repeated)
    compiled: bool          # False: loaded from the cache


def find_compiler() -> list[str] | None:
    """``$CC`` split like a shell would (even when it names nothing runnable), else the first C compiler on the PATH."""
    if os.environ.get(ENV_CC):
        return shlex.split(os.environ[ENV_CC])
    for name in ("cc", "gcc", "clang"):
        found = shutil.which(name)
        if found:
            return [found]
    return None


def cache_root() -> Path:
    return Path(os.environ.get(ENV_CACHE) or Path.home() / ".cache" / "ditq-compiler") / "kernels"


def compiler_version(cc: list[str]) -> str:
    try:
        run = subprocess.run([*cc, "--version"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise BuildError(f"the C compiler {shlex.join(cc)!r} does not run ({e})") from None
    if run.returncode != 0:
        raise BuildError(f"`{shlex.join(cc)} --version` failed: {run.stderr.strip()[:300]}")
    return run.stdout.strip()


def _key(source: bytes, version: str, flags: Sequence[str]) -> str:
    h = hashlib.sha256(source)
    for part in (version, "\0".join(flags), platform.machine()):
        h.update(b"\0" + part.encode())
    return h.hexdigest()[:20]


def _writable(folder: Path) -> bool:
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = tempfile.NamedTemporaryFile(dir=folder, prefix=".probe-")
        probe.close()
        return True
    except OSError:
        return False


def _compile(cc: list[str], source: Path, flags: Sequence[str], target: Path) -> str | None:
    """Builds ``target`` atomically; returns the compiler's complaint on failure."""
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.stem}.", suffix=".so")
    os.close(fd)
    try:
        run = subprocess.run([*cc, *flags, str(source), "-o", tmp], capture_output=True, text=True,
                             timeout=COMPILE_TIMEOUT_S)
        if run.returncode != 0:
            return (run.stderr or run.stdout).strip()[-800:] or f"exit status {run.returncode}"
        os.replace(tmp, target)
        return None
    except (OSError, subprocess.TimeoutExpired) as e:
        return str(e)
    finally:
        Path(tmp).unlink(missing_ok=True)


def _load(path: Path) -> ctypes.CDLL | str:
    try:
        return ctypes.CDLL(str(path))
    except OSError as e:
        return f"compiled but does not load: {e}"


def build(source: Path, base_flags: Sequence[str], attempts: Sequence[Sequence[str]]) -> Built:
    """The library of ``source`` built with ``base_flags`` + the first attempt's flags that works."""
    cc = find_compiler()
    if cc is None:
        raise BuildError("no C compiler found ($CC is unset and there is no cc, gcc or clang on the PATH)")
    version = compiler_version(cc)
    text = source.read_bytes()
    folder = cache_root()
    if not _writable(folder):
        folder = Path(tempfile.mkdtemp(prefix="ditq-kernels-"))
    targets = [(tuple(extra), folder / f"{source.stem}-{_key(text, version, [*base_flags, *extra])}.so")
               for extra in attempts]
    for extra, target in targets:   # a library built earlier, with any of the flag sets
        if target.exists():
            library = _load(target)
            if not isinstance(library, str):
                return Built(library, target, shlex.join(cc), version.splitlines()[0], extra, compiled=False)
    failures = []
    for extra, target in targets:
        flags = [*base_flags, *extra]
        problem = _compile(cc, source, flags, target)
        if problem is None:
            library = _load(target)
            if not isinstance(library, str):
                return Built(library, target, shlex.join(cc), version.splitlines()[0], extra, compiled=True)
            problem = library
        failures.append(f"[{' '.join(extra) or 'no extra flags'}] {problem}")
    raise BuildError(f"`{shlex.join(cc)}` could not build {source.name}:\n" + "\n".join(failures))


__all__ = ["BuildError", "Built", "build", "cache_root", "find_compiler"]
