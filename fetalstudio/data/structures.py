"""Structure-box datasets: a folder laid out like ``../shared/data/first_trimester_structures``.

::

    FOLDER/
      images.csv   image[, width, height, ...]          one row per image
      boxes.csv    image, structure, x_min, y_min, x_max, y_max[, ...]   one row per box
      more/        optional, the same two tables again (the shared folder's resized images)

Paths are relative to the CSV's folder; boxes are in that image's own pixels (x = column,
y = row, floats allowed). A structure without a box on an image means **not annotated**, not
absent anatomy: a trainer must not teach "no structure here" from a missing box, and an
evaluation counts only the annotated structures of each image.

The validation split (:func:`split_structures`) is fixed by the image's file name, so every
trainer and evaluation holds out the same images whatever folders they read.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from fetalstudio.data.tables import read_csv_rows
from fetalstudio.errors import FetalStudioError

IMAGES_TABLE = "images.csv"
BOXES_TABLE = "boxes.csv"
MORE_SUBFOLDER = "more"
BOX_COLUMNS = ("image", "structure", "x_min", "y_min", "x_max", "y_max")
# a box may touch the border; annotation tools round, so half a pixel beyond it is accepted
BORDER_TOLERANCE = 1.0
# percent of images held out for validation, chosen by a hash of the file name
VALIDATION_PERCENT = 12

Box = tuple[str, float, float, float, float]  # structure, x0, y0, x1, y1
SplitPart = Literal["train", "val"]


@dataclass(frozen=True)
class AnnotatedImage:
    """One image and its boxes (``(structure, x0, y0, x1, y1)`` in its own pixels); a structure
    missing from ``boxes`` is not annotated on this image, not absent."""

    path: Path
    width: int
    height: int
    boxes: tuple[Box, ...]

    @property
    def structures(self) -> tuple[str, ...]:
        return tuple(box[0] for box in self.boxes)


def read_structures(folder: Path, *, include_more: bool = True) -> list[AnnotatedImage]:
    """The annotated images of ``folder`` (its ``images.csv`` and ``boxes.csv``) and, with
    ``include_more``, of its ``more/`` subfolder when that has the same two tables."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FetalStudioError(f"{folder} is not a folder. Give a structures folder with {IMAGES_TABLE} and {BOXES_TABLE} "
                               "(laid out like first_trimester_structures; see README, 'Datasets').")
    items = _read_one_folder(folder)
    more = folder / MORE_SUBFOLDER
    if include_more and (more / IMAGES_TABLE).is_file():
        items += _read_one_folder(more)
    return items


def read_structure_folders(folders: list[Path], *, include_more: bool = True) -> list[AnnotatedImage]:
    """Several structures folders read one after another (each with its ``more/``)."""
    return [item for folder in folders for item in read_structures(folder, include_more=include_more)]


def validation_bucket(path: Path) -> int:
    """0-99 from a SHA-256 of the file name: stable across machines, Python versions and folders."""
    return int.from_bytes(hashlib.sha256(Path(path).name.encode("utf-8")).digest()[:4], "big") % 100


def split_structures(items: list[AnnotatedImage], part: SplitPart) -> list[AnnotatedImage]:
    """The ``"train"`` or ``"val"`` part of ``items``: an image is validation when the hash of its
    file name falls in the first ``VALIDATION_PERCENT`` buckets. The split is by image; the shared
    set has about one image per woman, so it is by patient too. The same file name always lands on
    the same side (the source numbers its images uniquely across ``more/`` and the originals)."""
    if part not in ("train", "val"):
        raise FetalStudioError(f"unknown split part {part!r}; use 'train' or 'val'.")
    held_out = part == "val"
    return [item for item in items if (validation_bucket(item.path) < VALIDATION_PERCENT) == held_out]


def _read_one_folder(folder: Path) -> list[AnnotatedImage]:
    images_csv, boxes_csv = folder / IMAGES_TABLE, folder / BOXES_TABLE
    for table in (images_csv, boxes_csv):
        if not table.is_file():
            raise FetalStudioError(f"{table} does not exist. A structures folder needs {IMAGES_TABLE} (one row per image) and "
                                   f"{BOXES_TABLE} ({', '.join(BOX_COLUMNS)}; one row per box).")
    sizes = _read_images_table(images_csv)
    boxes: dict[str, list[Box]] = {key: [] for key in sizes}
    rows = read_csv_rows(boxes_csv)
    _require_columns(rows, boxes_csv, BOX_COLUMNS)
    for number, row in enumerate(rows, start=2):  # line 1 is the header
        key = (row["image"] or "").strip()
        if key not in sizes:
            raise FetalStudioError(f"{boxes_csv}, line {number}: image {key!r} is not listed in {images_csv.name}. "
                                   "Add it there or remove the box.")
        structure = (row["structure"] or "").strip().lower()
        if not structure:
            raise FetalStudioError(f"{boxes_csv}, line {number}: the structure cell is empty. Name the structure or remove the row.")
        x0, y0, x1, y1 = (_number_cell(row, column, boxes_csv, number) for column in BOX_COLUMNS[2:])
        width, height = sizes[key]
        if not (x0 < x1 and y0 < y1):
            raise FetalStudioError(f"{boxes_csv}, line {number}: box ({x0:g}, {y0:g}, {x1:g}, {y1:g}) is empty or inverted; "
                                   "x_min must be below x_max and y_min below y_max.")
        if x0 < -BORDER_TOLERANCE or y0 < -BORDER_TOLERANCE or x1 > width + BORDER_TOLERANCE or y1 > height + BORDER_TOLERANCE:
            raise FetalStudioError(f"{boxes_csv}, line {number}: box ({x0:g}, {y0:g}, {x1:g}, {y1:g}) lies outside the "
                                   f"{width}x{height} image {key}. Boxes are in that image's own pixels.")
        boxes[key].append((structure, x0, y0, x1, y1))
    return [AnnotatedImage(folder / key, width, height, tuple(boxes[key])) for key, (width, height) in sizes.items()]


def _read_images_table(images_csv: Path) -> dict[str, tuple[int, int]]:
    """image key -> (width, height): from the ``width``/``height`` columns when present, else from
    the image file's header."""
    rows = read_csv_rows(images_csv)
    _require_columns(rows, images_csv, ("image",))
    sizes: dict[str, tuple[int, int]] = {}
    for number, row in enumerate(rows, start=2):
        key = (row["image"] or "").strip()
        if not key:
            raise FetalStudioError(f"{images_csv}, line {number}: the image cell is empty. Give the image path relative to the folder.")
        if key in sizes:
            raise FetalStudioError(f"{images_csv}, line {number}: image {key!r} is listed twice. Keep one row per image.")
        path = images_csv.parent / key
        if not path.is_file():
            raise FetalStudioError(f"{images_csv}, line {number}: {path} does not exist. Fix the path (relative to the folder) "
                                   "or remove the row.")
        if (row.get("width") or "").strip() and (row.get("height") or "").strip():
            size = (_pixel_count(row, "width", images_csv, number), _pixel_count(row, "height", images_csv, number))
        else:
            size = _size_from_file(path, images_csv, number)
        sizes[key] = size
    return sizes


def _size_from_file(path: Path, table: Path, number: int) -> tuple[int, int]:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            return image.size
    except (UnidentifiedImageError, OSError) as error:
        raise FetalStudioError(f"{table}, line {number}: {path} is not a readable image ({error}).") from None


def _require_columns(rows: list[dict], table: Path, columns: tuple[str, ...]) -> None:
    present = set(rows[0]) if rows else set()
    missing = [column for column in columns if column not in present]
    if missing or not rows:
        raise FetalStudioError(f"{table} needs the columns {', '.join(columns)} and at least one row "
                               f"(missing: {', '.join(missing) or 'all rows'}).")


def _number_cell(row: dict, column: str, table: Path, number: int) -> float:
    text = (row.get(column) or "").strip()
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        raise FetalStudioError(f"{table}, line {number}: {column} {text!r} is not a number. Give pixel coordinates.")
    return value


def _pixel_count(row: dict, column: str, table: Path, number: int) -> int:
    value = _number_cell(row, column, table, number)
    if value < 1 or value != int(value):
        raise FetalStudioError(f"{table}, line {number}: {column} {row[column]!r} is not a positive whole number of pixels.")
    return int(value)
