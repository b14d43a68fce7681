"""User-facing errors: every message says what was wrong and what to do."""

from __future__ import annotations

import errno
from pathlib import Path


class FetalStudioError(Exception):
    """An error the user can act on. The message is shown as-is in the UI and CLI."""


class ModelNotFoundError(FetalStudioError):
    """A model id or path that the manager does not know."""


class ModelLoadError(FetalStudioError):
    """A checkpoint exists but could not be loaded (corrupt, incompatible, missing files)."""


class OfflineModelError(FetalStudioError):
    """A hub model is needed but the machine is offline (or HF_HUB_OFFLINE is set)."""


class OutOfMemoryError(FetalStudioError):
    """The device ran out of memory even after freeing other models."""


class GenerationCancelled(FetalStudioError):
    """The user pressed Cancel; the images finished before that are kept."""


class DiskFullError(FetalStudioError):
    """A write failed because the disk (or the user's quota) is full."""


def is_disk_full(error: BaseException) -> bool:
    return isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT)


def disk_full_error(folder: str | Path, kept: str) -> DiskFullError:
    """The message for a full disk: which folder could not be written, what was kept, what to do.

    ``kept`` is one sentence saying what is safe, e.g. "The 41 decisions made before are saved."
    Use as ``raise disk_full_error(folder, kept) from error`` where ``is_disk_full(error)``.
    """
    return DiskFullError(
        f"The disk holding {folder} is full, so nothing more could be written there. {kept.strip()} "
        "Free some space (or choose a folder on another disk) and try again."
    )
