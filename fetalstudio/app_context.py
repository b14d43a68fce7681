"""The one way to build what every front end shares: the model manager and the engines over it.

The UI (``app.py``), the CLI commands, training and evaluation all build their model manager here,
so the checkpoints folder, the device choice and the typed-path limits of a shared app are decided
in one place. Layer: below the workflows (synthesis, review, analysis) and training/evaluation,
above ``pipelines`` and ``models``; it imports only those lower layers.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

from fetalstudio.models.device import DevicePlacement, default_placement
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


def build_manager(device: str | None = None, checkpoints: Path | None = None,
                  data_dirs: tuple[Path, ...] | None = None, placement: DevicePlacement | None = None) -> ModelManager:
    """The model manager of a command or of the app.

    ``device``: a ``--device`` value (cpu, cuda, cuda:1, mps); None picks $FETALSTUDIO_DEVICE, else the
    best available. ``placement`` (device and dtype) wins over ``device``, for callers that need a fixed
    one (training loads its base model in float32 on the CPU). ``checkpoints``: default
    $FETALSTUDIO_CHECKPOINTS, else checkpoints/. ``data_dirs``: given when the app is shared beyond
    loopback; a typed model path is then read only from the app's model folders and these.
    """
    manager = ModelManager(checkpoints or checkpoints_dir(), placement=placement or default_placement(device))
    if data_dirs is not None:
        manager.user_path_roots = (manager.checkpoints_dir, *manager.extra_folders, *data_dirs)
    return manager


def build_context(device: str | None = None, checkpoints: Path | None = None, outputs: Path | None = None,
                  data_dirs: tuple[Path, ...] | None = None) -> AppContext:
    """The manager (see :func:`build_manager`) with the synthesis engine and the outputs folder, libraries quietened."""
    _quiet_third_party()
    manager = build_manager(device=device, checkpoints=checkpoints, data_dirs=data_dirs)
    return AppContext(manager=manager, synthesis=TextToImageRunner(manager), outputs_dir=outputs or outputs_dir(),
                      data_dirs=data_dirs)
