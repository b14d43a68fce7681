"""Files that survive a crash: atomic writes, an fsynced append, per-folder locks, PNG and JSON.

Every write goes to a temporary file in the same folder, is flushed, fsynced and renamed over its
target (``os.replace``), then the folder is fsynced: a reader (or a process started after a crash)
sees the old or the new content, never half of it. Temporary files are named
``.<name>.<random><TEMP_SUFFIX>``, so whoever owns a folder can sweep them after a crash.

``folder_lock`` serialises read-modify-write cycles on one folder: a re-entrant thread lock for
this process plus an exclusive ``flock`` on the folder's ``LOCK_FILE`` for other processes.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from fetalstudio.errors import FetalStudioError

LOCK_FILE = ".lock"
TEMP_SUFFIX = ".tmp"


# --- atomic writes ----------------------------------------------------------------------------
def fsync_folder(folder: Path) -> None:
    """Make a rename durable (power loss), not only visible."""
    descriptor = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``path`` so that it is either its old or its new content, whenever the process dies."""
    temporary = path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}{TEMP_SUFFIX}")
    try:
        with open(temporary, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    fsync_folder(path.parent)


def copy_file(source: Path, target: Path) -> None:
    """Copy ``source`` to ``target`` atomically."""
    atomic_write_bytes(target, Path(source).read_bytes())


def append_line(path: Path, line: str) -> None:
    """Append one line and fsync. A line cut short by an earlier crash is closed first, so that
    it cannot swallow this one."""
    descriptor = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        size = os.fstat(descriptor).st_size
        data = line.encode("utf-8")
        if size and os.pread(descriptor, 1, size - 1) != b"\n":
            data = b"\n" + data
        while data:
            data = data[os.write(descriptor, data):]
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def move_into_place(building: Path, out: Path) -> None:
    """Rename the finished folder ``building`` to ``out``; a previous folder there is swapped out first."""
    if out.is_dir() and not any(out.iterdir()):
        out.rmdir()
    if not out.exists():
        building.rename(out)
        return
    previous = out.parent / f".{out.name}.previous-{uuid.uuid4().hex[:8]}"
    out.rename(previous)
    building.rename(out)
    shutil.rmtree(previous, ignore_errors=True)


# --- JSON -------------------------------------------------------------------------------------
def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def json_text(data: Any, indent: int | None = 1) -> str:
    """``data`` as JSON text (numpy values and paths included); NaN/inf and other types are refused."""
    try:
        return json.dumps(data, indent=indent, ensure_ascii=False, default=_json_default, allow_nan=False)
    except (TypeError, ValueError) as error:
        raise FetalStudioError(f"Could not store {str(data)[:120]} as JSON ({error}); use str/number/bool/None/list/dict values.") from error


def atomic_write_json(path: Path, data: Any) -> None:
    atomic_write_bytes(path, (json_text(data) + "\n").encode("utf-8"))


def read_json(path: Path, hint: str = "") -> Any:
    """The JSON in ``path``; a FetalStudioError naming the file (and ``hint``, e.g. how it got broken) if unreadable."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise FetalStudioError(f"{path} could not be read as JSON ({error}){hint}.") from error


# --- PNG --------------------------------------------------------------------------------------
def png_bytes(array: np.ndarray, name: str = "an array") -> bytes:
    """``array`` (uint8/uint16, gray or BGR(A) as OpenCV orders colours) encoded as PNG."""
    ok, encoded = cv2.imencode(".png", array)
    if not ok:
        raise FetalStudioError(f"Could not encode {name} as PNG (array {array.shape}, {array.dtype}).")
    return encoded.tobytes()


def write_png(path: Path, array: np.ndarray) -> None:
    """Encode ``array`` as PNG and write it atomically."""
    atomic_write_bytes(path, png_bytes(array, path.name))


def read_gray_png(path: Path, hint: str = "") -> np.ndarray:
    """A PNG written by ``write_png`` as a 2-D uint8 array; a FetalStudioError naming the file (and ``hint``) if unreadable."""
    array = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
    if array is None:
        raise FetalStudioError(f"{path} is missing or not a readable PNG{hint}.")
    return array


# --- locking ----------------------------------------------------------------------------------
class FolderLock:
    """Re-entrant per-folder lock: a thread lock for this process plus ``flock`` for other processes.

    flock locks belong to an open file, so the lock file is opened once per outermost hold and
    closed after; a process that dies holding it releases it (the kernel closes its files).
    """

    def __init__(self, path: Path):
        self._path = path
        self._thread_lock = threading.RLock()
        self._depth = 0
        self._descriptor: int | None = None

    @contextmanager
    def hold(self, blocking: bool = True) -> Iterator[None]:
        """Hold the lock; with ``blocking=False`` raise ``BlockingIOError`` at once if another
        thread or process holds it (e.g. to refuse a second run rather than wait for the first)."""
        if not self._thread_lock.acquire(blocking):
            raise BlockingIOError(f"{self._path.parent} is in use")
        try:
            if self._depth == 0:
                self._descriptor = self._lock_file(blocking)
            self._depth += 1
            try:
                yield
            finally:
                self._depth -= 1
                if self._depth == 0:
                    descriptor, self._descriptor = self._descriptor, None
                    fcntl.flock(descriptor, fcntl.LOCK_UN)
                    os.close(descriptor)
        finally:
            self._thread_lock.release()

    def _lock_file(self, blocking: bool = True) -> int:
        descriptor = os.open(self._path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX if blocking else fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BaseException:
            os.close(descriptor)
            raise
        return descriptor


_LOCKS: dict[str, FolderLock] = {}
_LOCKS_GUARD = threading.Lock()


def folder_lock(folder: Path) -> FolderLock:
    """The lock of ``folder`` (its ``LOCK_FILE``): one per folder in this process, shared with
    other processes through flock. Review sessions and batch analysis runs hold their folder's."""
    key = str(folder.resolve())
    with _LOCKS_GUARD:
        if key not in _LOCKS:
            _LOCKS[key] = FolderLock(Path(key) / LOCK_FILE)
        return _LOCKS[key]
