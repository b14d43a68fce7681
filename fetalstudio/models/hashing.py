"""Content hashes of checkpoints, as other SD tools show them (A1111 "AutoV2": sha256, 10 hex)."""

from __future__ import annotations

import hashlib
import threading
from pathlib import Path

from fetalstudio.models.inspect import WEIGHT_SUFFIXES

_cache: dict[tuple[str, int, int], str] = {}
_lock = threading.Lock()


def file_sha256(path: Path) -> str:
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    with _lock:
        if key in _cache:
            return _cache[key]
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    with _lock:
        _cache[key] = digest.hexdigest()
    return _cache[key]


def checkpoint_hash(path: Path) -> str:
    """sha256 of a file, or of a folder's weight files (their hashes, in path order); 10 hex digits."""
    if path.is_file():
        return file_sha256(path)[:10]
    digest = hashlib.sha256()
    for weight in sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in WEIGHT_SUFFIXES):
        digest.update(str(weight.relative_to(path)).encode())
        digest.update(file_sha256(weight).encode())
    return digest.hexdigest()[:10]
