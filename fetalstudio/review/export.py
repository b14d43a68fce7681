"""Export the reviewed pairs of a session as training data.

Formats (``formats``), all inside one output folder:

- "folder": ``images/<id>.png``, ``masks/<id>.png`` (filled 0/255) and ``metadata.csv`` (image,
  mask, source metadata, ellipse, biometry, ``subject_group`` = id), which
  ``python -m fetalstudio train segmenter --csv OUT/metadata.csv`` and ``eval segmenter`` read.
- "nnunet": nnU-Net v2 raw layout ``nnunet/DatasetXXX_Name/`` with ``imagesTr/<case>_0000.png``,
  ``labelsTr/<case>.png`` (labels 0/1) and ``dataset.json``.
- "coco": ``coco/annotations.json`` (category "fetal_head"; segmentation = the ellipse polygon
  when the ellipse matches the mask and lies inside the frame, else the mask's outer contours)
  and ``coco/images/<id>.png``. Coordinates are COCO's: pixel (col, row) covers [col, col+1) x
  [row, row+1), so pixel centres lie at +0.5.

The export is built in a temporary sibling folder and renamed into place at the end, so a
folder named ``out`` is always a complete export. An existing export in ``out`` (it has
``export.json``) is replaced; any other non-empty ``out`` is refused. A full disk removes the
half-built folder and says so; the session and any previous export stay as they were.

``export.json`` names the session and its folder by name only (older exports held the absolute
path of the session folder; they are still recognised as exports), so an export shared with
others does not reveal the folder layout of the machine it was made on.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import shutil
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from fetalstudio.errors import FetalStudioError, disk_full_error, is_disk_full
from fetalstudio.imaging.files import atomic_write_bytes, atomic_write_json, copy_file, move_into_place, write_png
from fetalstudio.imaging.mask_datasets import COCO_CATEGORY, NnunetCase, check_choices, coco_annotation, write_nnunet_dataset
from fetalstudio.review.store import DECISIONS, ELLIPSE_FIELDS, ReviewItem, ReviewSession

FORMATS = ("folder", "nnunet", "coco")
EXPORT_MARKER = "export.json"
METADATA_COLUMNS = (
    "image", "mask", "id", "decision", "decided_by", "decided_at", "source", "prompt", "seed", "trimester", "sampler",
    "steps", "model", "lora", "lora_weight", "center_x", "center_y", "axis_a", "axis_b", "angle_deg", "quality",
    "hc_px", "bpd_px", "ofd_px", "pixel_size_mm", "hc_mm", "subject_group",
)
SOURCE_COLUMNS = ("prompt", "seed", "trimester", "sampler", "steps", "model", "lora", "lora_weight")

Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class ExportResult:
    out: Path
    formats: tuple[str, ...]
    exported: int  # pairs written (per format)
    counts: dict[str, int]  # exported pairs per decision
    paths: dict[str, Path]  # "folder"/"metadata_csv"/"nnunet"/"coco"/... -> where they are
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (item id, why)


@dataclass(frozen=True)
class _Pair:
    item: ReviewItem
    image: Path
    mask_file: Path  # 0/255 PNG; read when written, so that a large export does not hold every mask in memory

    def mask(self) -> np.ndarray:
        """The filled mask as a boolean array."""
        return cv2.imread(str(self.mask_file), cv2.IMREAD_GRAYSCALE) > 127


def export_session(
    session: ReviewSession,
    out: str | Path,
    formats: Sequence[str] = ("folder",),
    decisions: Sequence[str] = ("accepted", "edited"),
    progress: Progress | None = None,
    *,
    nnunet_id: int = 500,
    nnunet_name: str | None = None,
) -> ExportResult:
    """Write the items with one of ``decisions`` in each of ``formats`` to ``out``.

    ``progress(done, total)`` is called after each pair of each format. Items whose mask is
    missing or empty are skipped and listed in the result.
    """
    out = Path(out)
    formats = check_choices(formats, FORMATS, "export format")
    decisions = check_choices(decisions, DECISIONS, "decision")
    _check_out(session, out)
    pairs, skipped = _select_pairs(session, decisions)
    if not pairs:
        raise FetalStudioError(
            f"Nothing to export: no item of the session is {' or '.join(decisions)} with a non-empty mask; accept or edit items first."
        )
    total, done = len(pairs) * len(formats), 0

    def step() -> None:
        nonlocal done
        done += 1
        if progress is not None:
            progress(done, total)

    out.parent.mkdir(parents=True, exist_ok=True)
    building = out.parent / f".{out.name}.partial-{uuid.uuid4().hex[:8]}"
    building.mkdir()
    try:
        paths: dict[str, Path] = {}
        if "folder" in formats:
            paths.update(_write_folder(pairs, building, step))
        if "nnunet" in formats:
            paths.update(_write_nnunet(pairs, building, nnunet_id, nnunet_name or session.name, step))
        if "coco" in formats:
            paths.update(_write_coco(pairs, building, session.name, step))
        counts = {decision: sum(p.item.decision == decision for p in pairs) for decision in decisions}
        atomic_write_json(building / EXPORT_MARKER, {
            "session": session.name, "session_folder": session.folder.name, "exported_at": _now(),
            "formats": list(formats), "decisions": list(decisions), "counts": counts, "items": [p.item.id for p in pairs],
            "skipped": [list(s) for s in skipped],
        })
        move_into_place(building, out)
    except BaseException as error:
        shutil.rmtree(building, ignore_errors=True)
        if isinstance(error, OSError) and is_disk_full(error):
            previous = f" The previous export in {out.name} is kept." if (out / EXPORT_MARKER).is_file() else ""
            raise disk_full_error(out.parent, "Nothing was exported: the half-built export was removed and the review "
                                              f"session is unchanged.{previous}") from error
        raise
    return ExportResult(
        out=out, formats=formats, exported=len(pairs), counts=counts,
        paths={key: out / path.relative_to(building) for key, path in paths.items()}, skipped=skipped,
    )


# --- checks and selection -----------------------------------------------------------------------
def _check_out(session: ReviewSession, out: Path) -> None:
    target, folder = out.resolve(), session.folder.resolve()
    if target == folder or target.is_relative_to(folder):
        raise FetalStudioError(f"The export folder {out} is inside the review session {session.folder}; pick a folder outside it.")
    if folder.is_relative_to(target):
        raise FetalStudioError(f"The export folder {out} contains the review session {session.folder}; pick another folder.")
    if target.exists() and not target.is_dir():
        raise FetalStudioError(f"{out} is a file; pick a folder for the export.")
    if target.is_dir() and any(target.iterdir()) and not (target / EXPORT_MARKER).is_file():
        raise FetalStudioError(f"{out} is not empty and is not a FetalStudio export; pick a new or empty folder.")


def _select_pairs(session: ReviewSession, decisions: tuple[str, ...]) -> tuple[list[_Pair], list[tuple[str, str]]]:
    pairs, skipped = [], []
    for item in session.items():
        if item.decision not in decisions:
            continue
        mask = session.load_mask(item)
        if mask is None or not mask.any():
            skipped.append((item.id, "no mask" if mask is None else "empty mask"))
            continue
        pairs.append(_Pair(item, session.image_path(item), session.mask_path(item)))
    return pairs, skipped


# --- folder ------------------------------------------------------------------------------------
def _write_folder(pairs: list[_Pair], root: Path, step: Callable[[], None]) -> dict[str, Path]:
    (root / "images").mkdir()
    (root / "masks").mkdir()
    rows = []
    for pair in pairs:
        image, mask = f"images/{pair.item.id}.png", f"masks/{pair.item.id}.png"
        copy_file(pair.image, root / image)
        write_png(root / mask, pair.mask().astype(np.uint8) * 255)
        rows.append(metadata_row(pair.item, image, mask))
        step()
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, METADATA_COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_bytes(root / "metadata.csv", buffer.getvalue().encode("utf-8"))
    return {"folder": root, "metadata_csv": root / "metadata.csv"}


def metadata_row(item: ReviewItem, image: str, mask: str) -> dict[str, str]:
    """One metadata.csv row (all values as text; empty where unknown)."""
    source = item.source
    biometry = item.biometry or {}
    row: dict[str, Any] = {
        "image": image, "mask": mask, "id": item.id, "decision": item.decision, "decided_by": item.decided_by,
        "decided_at": item.decided_at, "source": source.get("origin") or source.get("source"), "quality": item.quality,
        "hc_px": biometry.get("hc_px"), "bpd_px": biometry.get("bpd_px"), "ofd_px": biometry.get("ofd_px"),
        "pixel_size_mm": biometry.get("pixel_size_mm", source.get("pixel_size_mm")), "hc_mm": biometry.get("hc_mm"),
        "subject_group": item.id,
    }
    row.update({name: source.get(name) for name in SOURCE_COLUMNS})
    row.update({name: None if item.ellipse is None else getattr(item.ellipse, name) for name in ELLIPSE_FIELDS})
    return {name: _cell(row.get(name)) for name in METADATA_COLUMNS}


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return "" if not math.isfinite(value) else repr(value)
    if isinstance(value, (list, tuple)):
        return ";".join(_cell(v) for v in value)
    if isinstance(value, dict):
        return json.dumps(value, ensure_ascii=False)
    return str(value)


# --- nnU-Net -----------------------------------------------------------------------------------
def _write_nnunet(pairs: list[_Pair], root: Path, dataset_id: int, name: str, step: Callable[[], None]) -> dict[str, Path]:
    cases = [NnunetCase(f"head_{pair.item.id}", pair.image, pair.mask) for pair in pairs]
    return write_nnunet_dataset(
        root, dataset_id, name, cases, step, label="head",
        description="Fetal head masks reviewed in FetalStudio (accepted or corrected).",
    )


# --- COCO --------------------------------------------------------------------------------------
def _write_coco(pairs: list[_Pair], root: Path, session_name: str, step: Callable[[], None]) -> dict[str, Path]:
    coco = root / "coco"
    (coco / "images").mkdir(parents=True)
    images, annotations = [], []
    for number, pair in enumerate(pairs, start=1):
        file_name = f"{pair.item.id}.png"
        copy_file(pair.image, coco / "images" / file_name)
        mask = pair.mask()
        height, width = mask.shape
        images.append({"id": number, "file_name": file_name, "width": width, "height": height, "review_id": pair.item.id})
        annotations.append(coco_annotation(mask, pair.item.ellipse, annotation_id=number, image_id=number))
        step()
    atomic_write_json(coco / "annotations.json", {
        "info": {"description": f"FetalStudio review session {session_name}", "date_created": _now()},
        "licenses": [],
        "images": images,
        "annotations": annotations,
        "categories": [COCO_CATEGORY],
    })
    return {"coco": coco, "coco_annotations": coco / "annotations.json"}


# --- files -------------------------------------------------------------------------------------
def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def zip_export(out: Path) -> Path:
    """``out.zip`` beside the export folder ``out``, written under a temporary name and renamed when
    complete: a full disk (or a kill) never leaves a truncated zip that looks like a download."""
    out = Path(out)
    target = out.with_name(f"{out.name}.zip")
    partial = out.parent / f".{out.name}.zip-partial-{uuid.uuid4().hex[:8]}"
    try:
        made = Path(shutil.make_archive(str(partial), "zip", root_dir=out))
        os.replace(made, target)
    except BaseException as error:
        partial.with_name(f"{partial.name}.zip").unlink(missing_ok=True)
        if isinstance(error, OSError) and is_disk_full(error):
            raise disk_full_error(out.parent, f"The export folder {out.name} is complete; only its zip was not written.") from error
        raise
    return target


