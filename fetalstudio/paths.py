"""The app's own folders. File access from the UI is limited to these."""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

from fetalstudio.errors import FetalStudioError

APP_ROOT = Path(__file__).resolve().parent.parent

#: One answer for a missing, forbidden or unreadable path, so that a refusal tells nothing about the disk.
NOT_AVAILABLE = ("That file is not available here: only images the app made or that were uploaded to it can be "
                 "opened. Upload the image instead.")


def checkpoints_dir() -> Path:
    return Path(os.environ.get("FETALSTUDIO_CHECKPOINTS", APP_ROOT / "checkpoints")).expanduser()


def outputs_dir() -> Path:
    return Path(os.environ.get("FETALSTUDIO_OUTPUTS", APP_ROOT / "outputs")).expanduser()


def upload_cache_dir() -> Path:
    """Gradio's copies of uploaded and served files (app.py points GRADIO_TEMP_DIR at outputs/.gradio-cache)."""
    return Path(os.environ.get("GRADIO_TEMP_DIR") or outputs_dir() / ".gradio-cache").expanduser()


def assets_dir() -> Path:
    return APP_ROOT / "assets"


def app_folders() -> tuple[Path, ...]:
    """The folders whose files the browser may name: the app's outputs and the upload cache."""
    return outputs_dir(), upload_cache_dir()


def is_under(path: Path, roots: Iterable[Path]) -> bool:
    """``path`` (symlinks resolved) lies inside one of ``roots`` (symlinks resolved); ``..`` is refused outright."""
    if ".." in Path(path).parts:
        return False
    resolved = Path(path).expanduser().resolve()
    return any(resolved.is_relative_to(Path(root).expanduser().resolve()) for root in roots)


def app_file(path: str | Path | None, roots: Iterable[Path] | None = None) -> Path:
    """The file at ``path`` when it is a file inside the app's own folders (or ``roots``), resolved.

    Anything else — outside, missing, a folder, a symlink leading out, ``..`` — gets the same
    :data:`NOT_AVAILABLE` message, so a caller cannot probe the server's disk with it.
    """
    text = str(path or "").strip()
    if not text or "\x00" in text:
        raise FetalStudioError(NOT_AVAILABLE)
    candidate = Path(text)
    if not is_under(candidate, app_folders() if roots is None else roots) or not candidate.resolve().is_file():
        raise FetalStudioError(NOT_AVAILABLE)
    return candidate.resolve()
