"""Anatomy editor sessions on disk: one folder per browser session, every change saved as it happens.

``outputs/anatomy/sessions/<id>/`` (the id is the caller's, e.g. the browser session's) holds::

    rev-000001.json ...   the document after each change (fetalstudio.anatomy-editor, version 1):
                          image, layout history with its undo position, ROI (and mask), preset,
                          last project; the newest readable one is the document
    .lock                 inter-process lock (fcntl.flock)

Each save writes a new revision file atomically (``imaging.files``: a temporary file, fsynced and
renamed into place) and only then removes revisions older than the last :data:`KEEP_REVISIONS`,
so a kill at any point leaves the last complete document readable; temporary files left by a kill
are swept when the session is opened. A revision that cannot be read (damaged on disk, edited by
hand) is renamed ``*.corrupt``, reported, and the previous good one is opened instead. Two ids
never share a folder, so two browser sessions never see each other's layouts.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from fetalstudio.anatomy.editor import EditorState, state_from_dict, state_to_dict
from fetalstudio.errors import FetalStudioError, disk_full_error, is_disk_full
from fetalstudio.imaging.files import TEMP_SUFFIX, atomic_write_json, folder_lock, read_json
from fetalstudio.paths import outputs_dir

SESSION_SCHEMA = "fetalstudio.anatomy-editor"
SESSION_VERSION = 1
KEEP_REVISIONS = 3
CORRUPT_SUFFIX = ".corrupt"
_REVISION = re.compile(r"rev-(\d{6,})\.json")
_SESSION_ID = re.compile(r"[A-Za-z0-9_-]{1,80}")


def sessions_dir() -> Path:
    """Where editor sessions live: ``outputs/anatomy/sessions``."""
    return outputs_dir() / "anatomy" / "sessions"


def _revision_name(number: int) -> str:
    return f"rev-{number:06d}.json"


@dataclass(frozen=True)
class LoadedDocument:
    """What :meth:`EditorSession.load` found: the newest good document (None for a new session),
    its revision number, and the revisions that could not be read (one message each)."""

    state: EditorState | None
    revision: int
    problems: tuple[str, ...] = ()
    saved: str = ""


class EditorSession:
    """The folder of one browser session's editor document. Open it with :meth:`open`."""

    def __init__(self, folder: Path, session_id: str):
        self.folder = folder
        self.id = session_id
        self._lock = folder_lock(folder)

    @classmethod
    def open(cls, session_id: str, root: Path | None = None) -> EditorSession:
        """The session ``session_id`` under ``root`` (default :func:`sessions_dir`), created if new;
        temporary files a killed save left behind are removed."""
        if not isinstance(session_id, str) or not _SESSION_ID.fullmatch(session_id):
            raise FetalStudioError(f"Editor session id {session_id!r} is not 1-80 letters, digits, _ or -.")
        folder = Path(root or sessions_dir()) / session_id
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            if is_disk_full(error):
                raise disk_full_error(folder.parent, "No editor session was started; earlier sessions are kept.") from error
            raise FetalStudioError(f"The editor session folder {folder} could not be made ({error}).") from error
        session = cls(folder, session_id)
        with session._lock.hold():
            for leftover in folder.glob(f".*{TEMP_SUFFIX}"):
                leftover.unlink(missing_ok=True)
        return session

    def _revisions(self) -> list[tuple[int, Path]]:
        found = []
        for path in self.folder.iterdir():
            match = _REVISION.fullmatch(path.name)
            if match:
                found.append((int(match.group(1)), path))
        return sorted(found)

    def load(self) -> LoadedDocument:
        """The newest document that reads back; damaged newer revisions are renamed ``*.corrupt`` and reported."""
        problems = []
        with self._lock.hold():
            for number, path in reversed(self._revisions()):
                try:
                    state, saved = _read_revision(path)
                except FetalStudioError as error:
                    path.replace(path.with_name(path.name + CORRUPT_SUFFIX))
                    problems.append(f"{error} It was set aside as {path.name}{CORRUPT_SUFFIX}; the editor opened the "
                                    "change saved before it.")
                    continue
                return LoadedDocument(state, number, tuple(problems), saved)
        if problems:
            problems.append("No earlier saved state of this session could be read; open the image again.")
        return LoadedDocument(None, 0, tuple(problems))

    def save(self, state: EditorState) -> int:
        """Write ``state`` as the next revision (atomically) and return its number; the oldest
        revisions beyond :data:`KEEP_REVISIONS` are removed after it is in place."""
        with self._lock.hold(), self._disk_full_guard():
            revisions = self._revisions()
            corrupt = [int(m.group(1)) for p in self.folder.glob(f"rev-*.json{CORRUPT_SUFFIX}")
                       if (m := _REVISION.fullmatch(p.name.removesuffix(CORRUPT_SUFFIX)))]
            number = max([n for n, _ in revisions] + corrupt + [0]) + 1
            now = time.time()
            atomic_write_json(self.folder / _revision_name(number), {
                "schema": SESSION_SCHEMA, "version": SESSION_VERSION, "session": self.id, "revision": number,
                "saved": datetime.fromtimestamp(now, timezone.utc).isoformat(timespec="milliseconds"),
                "saved_unix": now, "state": state_to_dict(state)})
            for _, old in revisions[: max(0, len(revisions) + 1 - KEEP_REVISIONS)]:
                old.unlink(missing_ok=True)
        return number

    @contextmanager
    def _disk_full_guard(self) -> Iterator[None]:
        try:
            yield
        except OSError as error:
            if not is_disk_full(error):
                raise
            raise disk_full_error(self.folder, "This change was not saved; the editor's state before it is kept on "
                                               "disk and on screen.") from error


def _read_revision(path: Path) -> tuple[EditorState, str]:
    data = read_json(path, " (an editor session file)")
    if not isinstance(data, dict) or data.get("schema") != SESSION_SCHEMA:
        raise FetalStudioError(f"{path} is not an anatomy editor session file.")
    if data.get("version") != SESSION_VERSION:
        raise FetalStudioError(f"{path} has editor session version {data.get('version')!r}; this FetalStudio reads "
                               f"version {SESSION_VERSION} (a newer FetalStudio wrote it: update to open it).")
    return state_from_dict(data.get("state"), str(path)), str(data.get("saved", ""))


@dataclass(frozen=True)
class SessionSummary:
    """One saved editor session, for a list to reopen from."""

    id: str
    folder: Path
    saved: str
    saved_unix: float
    image: str
    plane: str
    boxes: int
    steps: int
    project: str | None


def list_sessions(root: Path | None = None) -> list[SessionSummary]:
    """The editor sessions under ``root`` (default :func:`sessions_dir`) that have a readable document,
    newest change first. Read-only: damaged files are left for :meth:`EditorSession.load` to report."""
    root = Path(root or sessions_dir())
    summaries = []
    for folder in root.iterdir() if root.is_dir() else []:
        if not folder.is_dir() or not _SESSION_ID.fullmatch(folder.name):
            continue
        revisions = sorted((int(m.group(1)), p) for p in folder.iterdir() if (m := _REVISION.fullmatch(p.name)))
        for _, path in reversed(revisions):
            try:
                data: Any = read_json(path)
                state = state_from_dict(data["state"], str(path))
            except (FetalStudioError, KeyError, TypeError):
                continue
            summaries.append(SessionSummary(folder.name, folder, str(data.get("saved", "")),
                                            float(data.get("saved_unix") or 0), state.image.path, state.plane,
                                            len(state.layout.boxes), state.history.position, state.project))
            break
    return sorted(summaries, key=lambda s: (s.saved_unix, s.id), reverse=True)
