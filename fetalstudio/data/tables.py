"""Label tables as the shared data uses them.

- Classification: a CSV with ``filename`` (relative to the CSV's folder) and ``plane``; or a
  folder with one sub-folder per plane (``abdomen/``, ``brain/``...).
- Segmentation: a CSV with ``image`` and ``mask`` (relative to the CSV's folder; the mask an
  ellipse outline or a filled mask) and optional ``pixel_size_mm``, ``hc_mm`` and a grouping
  column (``subject_group`` or ``patient_id``) for splits.
"""

from __future__ import annotations

import math

import csv
import io
from dataclasses import dataclass, field
from pathlib import Path

from fetalstudio.errors import FetalStudioError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"}


@dataclass(frozen=True)
class LabelledImage:
    path: Path
    plane: str
    group: str = ""  # patient or exam, for group-aware splits


@dataclass(frozen=True)
class SegmentationPair:
    image: Path
    mask: Path
    pixel_size_mm: float | None = None
    hc_mm: float | None = None
    group: str = ""
    extra: dict = field(default_factory=dict, hash=False, compare=False)


def read_csv_rows(path: Path) -> list[dict]:
    """The rows of a UTF-8 CSV (a BOM is allowed) as dicts; a file in another encoding or one the csv
    module cannot parse is a FetalStudioError naming the file, the line and what to do."""
    path = Path(path)
    if not path.is_file():
        raise FetalStudioError(f"{path} does not exist. Give a CSV file (or a folder of plane sub-folders).")
    data = path.read_bytes()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        line = data[: error.start].count(b"\n") + 1
        raise FetalStudioError(
            f"{path} is not UTF-8 text: byte {error.start} (line {line}) is 0x{data[error.start]:02x}. "
            "Save it as UTF-8 (e.g. in Excel: Save As > 'CSV UTF-8') and try again."
        ) from None
    reader = csv.DictReader(io.StringIO(text, newline=""))
    try:
        return list(reader)
    except csv.Error as error:
        raise FetalStudioError(f"{path}, line {reader.line_num}: not a readable CSV ({error}). Fix that line and try again.") from None


def _require(rows: list[dict], path: Path, columns: tuple[str, ...]) -> None:
    present = set(rows[0]) if rows else set()
    missing = [c for c in columns if c not in present]
    if missing or not rows:
        raise FetalStudioError(
            f"{path} needs the columns {', '.join(columns)} (missing: {', '.join(missing) or 'all rows'}). "
            "See README, 'Datasets'."
        )


def read_classification(source: Path) -> list[LabelledImage]:
    """A classification CSV or a folder of per-plane sub-folders."""
    if source.is_dir():
        items = [
            LabelledImage(path, folder.name.lower())
            for folder in sorted(p for p in source.iterdir() if p.is_dir())
            for path in sorted(folder.rglob("*"))
            if path.suffix.lower() in IMAGE_SUFFIXES
        ]
        if not items:
            raise FetalStudioError(f"{source} has no images in plane sub-folders (e.g. {source}/brain/*.png).")
        return items
    rows = read_csv_rows(source)
    _require(rows, source, ("filename", "plane"))
    base = source.parent
    return [LabelledImage(base / row["filename"], row["plane"].strip().lower(), row.get("patient_id", "") or "") for row in rows]


def _positive_cell(row: dict, column: str, source: Path, number: int) -> float | None:
    """An optional positive, finite number (pixel size, HC): empty is unknown; anything else is refused
    with the line, because a wrong scale would silently corrupt every millimetre derived from it."""
    text = (row.get(column) or "").strip()
    if not text:
        return None
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not math.isfinite(value) or value <= 0:
        raise FetalStudioError(f"{source}, line {number}: {column} {text!r} is not a positive number. "
                               "Correct it, or leave the cell empty if it is unknown.")
    return value


def read_segmentation(source: Path) -> list[SegmentationPair]:
    rows = read_csv_rows(source)
    _require(rows, source, ("image", "mask"))
    base = source.parent
    pairs = []
    for number, row in enumerate(rows, start=2):  # line 1 is the header
        empty = [column for column in ("image", "mask") if not (row.get(column) or "").strip()]
        if empty:
            raise FetalStudioError(f"{source}, line {number}: the {' and '.join(empty)} cell is empty; every row needs an image "
                                   "and a mask (paths relative to the CSV's folder). Fill or remove that row.")
        group = row.get("subject_group") or row.get("patient_id") or ""
        pairs.append(
            SegmentationPair(
                image=base / row["image"], mask=base / row["mask"], pixel_size_mm=_positive_cell(row, "pixel_size_mm", source, number),
                hc_mm=_positive_cell(row, "hc_mm", source, number), group=group, extra=row,
            )
        )
    return pairs


def group_split(groups: list[str], validation_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Indices for train/validation such that no group (patient, exam) is on both sides."""
    import random

    unique = sorted(set(groups))
    random.Random(seed).shuffle(unique)
    n_val = max(1, round(len(unique) * validation_fraction)) if validation_fraction > 0 else 0
    held_out = set(unique[:n_val])
    train = [i for i, g in enumerate(groups) if g not in held_out]
    val = [i for i, g in enumerate(groups) if g in held_out]
    return train, val
