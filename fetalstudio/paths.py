"""The app's own folders. File access from the UI is limited to these."""

from __future__ import annotations

import os
from pathlib import Path

APP_ROOT = Path(__file__).resolve().parent.parent


def checkpoints_dir() -> Path:
    return Path(os.environ.get("FETALSTUDIO_CHECKPOINTS", APP_ROOT / "checkpoints")).expanduser()


def outputs_dir() -> Path:
    return Path(os.environ.get("FETALSTUDIO_OUTPUTS", APP_ROOT / "outputs")).expanduser()


def assets_dir() -> Path:
    return APP_ROOT / "assets"
