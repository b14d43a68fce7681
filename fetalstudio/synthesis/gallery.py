"""Where interactively generated images are stored: outputs/synthesis/<date>/<n>-<seed>.png."""

from __future__ import annotations

import datetime as dt
import itertools
from pathlib import Path

from fetalstudio.pipelines.metadata import save_png
from fetalstudio.pipelines.settings import GeneratedImage


def save_generated(image: GeneratedImage, outputs_dir: Path) -> Path:
    folder = outputs_dir / "synthesis" / dt.date.today().isoformat()
    folder.mkdir(parents=True, exist_ok=True)
    start = len(list(folder.glob("*.png")))
    for number in itertools.count(start):
        path = folder / f"{number:05d}-{image.seed}.png"
        if not path.exists():
            return save_png(image.image, path, image.settings, image.seed, image.metadata)
    raise AssertionError("unreachable")
