"""Argument types shared by every command, so one kind of bad value gets one message everywhere.

argparse reports a refused value as ``<prog>: error: argument --batch-size: ...`` and exits 2.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def at_least_one(text: str) -> int:
    """A count such as ``--batch-size``: a whole number >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a whole number of at least 1, not {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


def output_folder(text: str) -> Path:
    """An ``--out`` folder: it may exist (as a folder) or not yet; an existing file is refused."""
    path = Path(text).expanduser()
    if path.exists() and not path.is_dir():
        raise argparse.ArgumentTypeError(f"{text} is a file, not a folder; give a folder path (it is created if missing)")
    return path


def device_name(text: str) -> str:
    """A ``--device`` this machine has (cpu, cuda, cuda:N, mps); the message lists what is available."""
    from fetalstudio.errors import FetalStudioError
    from fetalstudio.models.device import checked_device

    try:
        return str(checked_device(text, source=""))
    except FetalStudioError as error:
        raise argparse.ArgumentTypeError(str(error).strip()) from None
