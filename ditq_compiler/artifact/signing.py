"""Optional artifact signatures: an HMAC-SHA256 over ``manifest.json``, kept in ``signature.json``.

The manifest lists the sha256 of every other file (``run.json``, which holds only times, aside),
so a signature over the manifest's bytes covers the whole artifact: change any file and either
its checksum or the signature no longer matches. ``save(dir, sign_key=key)`` writes the
signature; ``load(dir, verify_key=key)`` refuses an artifact whose signature is missing or does
not match. Keys are bytes or text (UTF-8), shared between the machine that saves and the one that
loads (an HMAC is symmetric: whoever can verify can also sign); keep them out of the artifact.
Without ``verify_key``, a signature is not looked at.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from pathlib import Path

from ditq_compiler.artifact.errors import ArtifactError

SIGNATURE = "signature.json"
ALGORITHM = "hmac-sha256"


def _key(key: bytes | str, what: str) -> bytes:
    if isinstance(key, str):
        key = key.encode()
    if not isinstance(key, (bytes, bytearray)) or not key:
        raise TypeError(f"{what} must be non-empty bytes or str, got {type(key).__name__}")
    return bytes(key)


def signature(manifest: bytes, key: bytes | str) -> str:
    return hmac.new(_key(key, "sign_key"), manifest, hashlib.sha256).hexdigest()


def write_signature(directory: Path, key: bytes | str) -> None:
    """``signature.json`` for ``directory``'s ``manifest.json`` (already written)."""
    manifest = (directory / "manifest.json").read_bytes()
    text = json.dumps({"algorithm": ALGORITHM, "signed_file": "manifest.json", "hmac": signature(manifest, key)},
                      indent=1)
    (directory / SIGNATURE).write_text(text)


def verify_signature(directory: Path, key: bytes | str) -> None:
    """Raise ``ArtifactError`` unless ``directory`` carries a signature of its manifest made with ``key``."""
    key = _key(key, "verify_key")
    file = directory / SIGNATURE
    if not file.is_file():
        raise ArtifactError(f"{directory} is not signed (no {SIGNATURE}), and verify_key asks for a signature")
    try:
        saved = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ArtifactError(f"{file} is unreadable: {e}") from None
    if not (isinstance(saved, dict) and saved.get("algorithm") == ALGORITHM and isinstance(saved.get("hmac"), str)):
        raise ArtifactError(f"{file} is not a {ALGORITHM} signature")
    expected = signature((directory / "manifest.json").read_bytes(), key)
    if not hmac.compare_digest(saved["hmac"], expected):
        raise ArtifactError(f"{directory}: the signature does not match the manifest: the artifact was changed "
                            "after it was signed, or signed with another key")


__all__ = ["SIGNATURE", "signature", "verify_signature", "write_signature"]
