"""Real layouts for the anatomy tests: boxes of ../shared/data/first_trimester_structures, read with csv."""

from __future__ import annotations

import csv
import shutil
from collections import defaultdict
from functools import lru_cache
from pathlib import Path

import pytest

from data_support import DATA
from fetalstudio.anatomy.layout import Layout

STRUCTURES = DATA / "first_trimester_structures"
needs_structures = pytest.mark.skipif(not (STRUCTURES / "boxes.csv").is_file(), reason="first_trimester_structures not found")


@lru_cache(maxsize=2)
def _rows(subfolder: str) -> tuple[dict, dict]:
    folder = STRUCTURES / subfolder if subfolder else STRUCTURES
    boxes = defaultdict(list)
    with (folder / "boxes.csv").open(newline="") as handle:
        for row in csv.DictReader(handle):
            boxes[row["image"]].append((row["structure"], row["x_min"], row["y_min"], row["x_max"], row["y_max"]))
    with (folder / "images.csv").open(newline="") as handle:
        sizes = {row["image"]: (int(row["width"]), int(row["height"])) for row in csv.DictReader(handle)}
    return dict(boxes), sizes


def real_layout(image: str = "images/0.png", subfolder: str = "") -> Layout:
    """The layout of one annotated image (default: the first original, all 9 structures)."""
    boxes, sizes = _rows(subfolder)
    return Layout.from_annotation("facial_sagittal", *sizes[image], boxes[image], source=image)


def real_images(subfolder: str = "") -> list[str]:
    return sorted(_rows(subfolder)[0])


def write_structures_folder(folder: Path, image_rows: list[dict], box_rows: list[dict], copies: dict[str, Path]) -> Path:
    """A structures folder: images.csv and boxes.csv holding the given rows, and each image copied in
    (``copies``: its path in the folder -> the file to copy)."""
    (folder / "images").mkdir(parents=True)
    for name, table in (("images.csv", image_rows), ("boxes.csv", box_rows)):
        with (folder / name).open("w", newline="", encoding="utf-8") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(table[0]))
            writer.writeheader()
            writer.writerows(table)
    for name, source in copies.items():
        shutil.copy(source, folder / name)
    return folder
