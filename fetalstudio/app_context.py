"""The objects every front end shares: one model manager and the workflow engines over it."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

from fetalstudio.models.manager import ModelManager
from fetalstudio.paths import checkpoints_dir, outputs_dir
from fetalstudio.pipelines.runners import TextToImageRunner


@dataclass
class AppContext:
    manager: ModelManager
    synthesis: TextToImageRunner
    outputs_dir: Path
    #: Server folders the batch and import boxes may read; None: any folder (the app listens on loopback only).
    data_dirs: tuple[Path, ...] | None = None


def _quiet_third_party() -> None:
    """No telemetry, no update checks, no progress-bar noise from libraries; nothing leaves the machine."""
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    os.environ.setdefault("DO_NOT_TRACK", "1")
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.disable_progress_bar()
    logging.getLogger("diffusers").setLevel(logging.ERROR)


def build_context(checkpoints: Path | None = None, outputs: Path | None = None,
                  data_dirs: tuple[Path, ...] | None = None) -> AppContext:
    _quiet_third_party()
    manager = ModelManager(checkpoints or checkpoints_dir())
    if data_dirs is not None:  # shared beyond loopback: typed model paths only inside the app's model folders
        manager.user_path_roots = (manager.checkpoints_dir, *manager.extra_folders, *data_dirs)
    return AppContext(manager=manager, synthesis=TextToImageRunner(manager), outputs_dir=outputs or outputs_dir(),
                      data_dirs=data_dirs)
