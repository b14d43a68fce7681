"""Export the predicted head masks of a batch analysis run in standard dataset layouts.

Each ``MaskRecord`` is one analysed image (any raster format ``image_input`` reads) and its
predicted 0/255 mask of the same size. ``export_masks`` writes, inside ``out``:

- "png": ``png/images/<name>.png`` (grayscale) and ``png/masks/<name>.png`` (0/255).
- "coco": ``coco/images/<name>.png``, ``coco/annotations_polygons.json`` (segmentation as
  polygons: the ellipse when it matches the mask, else the mask's outer contours, as the review
  export writes them) and ``coco/annotations_rle.json`` (the same annotations as compressed RLE
  from ``pycocotools.mask.encode``; ``counts`` as text). One category, fetal_head; an image whose
  mask is empty (no head found) is listed without an annotation. RLE annotations keep
  ``iscrowd: 0``: each is one head, which pycocotools, Detectron2 and MMDetection accept.
- "yolo": Ultralytics YOLO-seg ``yolo/images/<name>.png``, ``yolo/labels/<name>.txt`` (``0 x1 y1
  x2 y2 ...``, normalised by width and height; the ellipse polygon when it matches, else the
  largest outer contour; an empty file when no head was found) and ``yolo/data.yaml`` (train and
  val both point at every image: split before using val for model selection).
- "nnunet": nnU-Net v2 raw ``nnunet/DatasetXXX_Name/imagesTr/<name>_0000.png``,
  ``labelsTr/<name>.png`` (0/1; all zero when no head was found) and ``dataset.json``.

A record without an ellipse gets one fitted to its mask (``fit_ellipse``); it stands for the mask
only where it matches (Dice >= 0.95, inside the frame). Polygons use COCO's coordinates (pixel
centres at +0.5), so YOLO's are COCO's divided by width and height.

Everything is built in a hidden folder inside ``out`` and each format's folder is then renamed
into place, so re-running replaces ``out/<format>`` whole and leaves other files in ``out``
alone. Exports into one ``out`` hold its lock (``out/.lock``), so a build folder found by the next
export is from one that was killed, and is removed. ``out/mask_export.json`` records which format folders are exports; an existing
``out/<format>`` that is not one is refused rather than replaced.
"""

from __future__ import annotations

import json
import re
import shutil
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from fetalstudio.errors import FetalStudioError
from fetalstudio.imaging.ellipse import Ellipse, fit_ellipse
from fetalstudio.imaging.files import atomic_write_bytes, atomic_write_json, copy_file, folder_lock, move_into_place, write_png
from fetalstudio.imaging.image_input import load_image
from fetalstudio.imaging.mask_datasets import (
    COCO_CATEGORY, NnunetCase, check_choices, coco_annotation, mask_polygons, nnunet_dataset_name, write_nnunet_dataset,
)
from fetalstudio.imaging.masks import binary_mask

MASK_FORMATS = ("png", "coco", "yolo", "nnunet")
MANIFEST = "mask_export.json"
#: The hidden build folder of an export in progress (removed by the next export if one was killed).
PARTIAL_PREFIX = ".mask-export-partial-"
YOLO_CLASS = 0
_SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")

Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class MaskRecord:
    name: str  # unique file stem: letters, digits, ".", "_" and "-", not starting with "." or "-"
    image_path: Path  # the analysed image (PNG, JPEG, ... as image_input reads it)
    mask_path: Path  # 0/255 (or 0/1) mask PNG with the image's size
    ellipse: Ellipse | None = None


@dataclass(frozen=True)
class _Staged:
    """A record after checking: its grayscale PNG and 0/255 mask PNG in the build folder."""

    name: str
    image: Path
    mask_file: Path
    ellipse: Ellipse | None
    width: int
    height: int

    def mask(self) -> np.ndarray:
        return cv2.imread(str(self.mask_file), cv2.IMREAD_GRAYSCALE) > 127


def export_masks(
    records: Iterable[MaskRecord],
    out: str | Path,
    formats: Sequence[str],
    *,
    dataset_name: str = "FetalStudioAnalysis",
    dataset_id: int = 501,
    progress: Progress | None = None,
) -> dict[str, Path]:
    """Write ``records`` in each of ``formats`` under ``out``; returns where each part lies.

    Keys: "png", "png_images", "png_masks", "coco", "coco_polygons", "coco_rle", "yolo",
    "yolo_data", "nnunet", "nnunet_dataset_json" (those of the formats asked for).
    ``progress(done, total)`` is called after each record is checked and after each record of
    each format.
    """
    out = Path(out)
    formats = check_choices(formats, MASK_FORMATS, "mask export format")
    records = list(records)
    _check_records(records)
    nnunet_dataset_name(dataset_id, dataset_name)  # a bad id fails before any work
    if "coco" in formats:
        _coco_mask()
    _check_out(out, formats)

    total, done = len(records) * (len(formats) + ("png" not in formats)), 0

    def step() -> None:
        nonlocal done
        done += 1
        if progress is not None:
            progress(done, total)

    out.mkdir(parents=True, exist_ok=True)
    with folder_lock(out).hold():  # one export into ``out`` at a time, so any other build folder is a dead one
        _remove_partial_builds(out)
        return _export_locked(records, out, formats, dataset_name, dataset_id, step)


def _remove_partial_builds(out: Path) -> None:
    """Build folders (and swapped-out previous exports) left by an export that was killed; call
    with ``out``'s lock held."""
    leftovers = list(out.glob(f"{PARTIAL_PREFIX}*")) + [path for name in MASK_FORMATS for path in out.glob(f".{name}.previous-*")]
    for folder in leftovers:
        shutil.rmtree(folder, ignore_errors=True)


def _export_locked(records: list[MaskRecord], out: Path, formats: tuple[str, ...], dataset_name: str, dataset_id: int,
                   step: Callable[[], None]) -> dict[str, Path]:
    building = out / f"{PARTIAL_PREFIX}{uuid.uuid4().hex[:8]}"
    building.mkdir()
    try:
        staged = _stage_all(records, building / "png", step)  # the "png" layout doubles as the staging area
        paths: dict[str, Path] = {}
        if "png" in formats:
            paths.update(png=building / "png", png_images=building / "png" / "images", png_masks=building / "png" / "masks")
        if "coco" in formats:
            paths.update(_write_coco(staged, building, dataset_name, step))
        if "yolo" in formats:
            paths.update(_write_yolo(staged, building, out / "yolo", step))
        if "nnunet" in formats:
            cases = [NnunetCase(item.name, item.image, item.mask) for item in staged]
            paths.update(write_nnunet_dataset(
                building, dataset_id, dataset_name, cases, step, label=COCO_CATEGORY["name"],
                description="Fetal head masks predicted by a FetalStudio batch analysis (not reviewed).",
            ))
        _write_manifest(out, formats, len(records))
        for name in formats:
            move_into_place(building / name, out / name)
    finally:
        shutil.rmtree(building, ignore_errors=True)
    return {key: out / path.relative_to(building) for key, path in paths.items()}


# --- checks ------------------------------------------------------------------------------------
def _check_records(records: list[MaskRecord]) -> None:
    if not records:
        raise FetalStudioError("No masks to export: the analysis run has no images with a mask; run the batch analysis first.")
    seen: dict[str, str] = {}
    for record in records:
        if not _SAFE_NAME.fullmatch(record.name):
            raise FetalStudioError(
                f"The export name {record.name!r} (image {record.image_path}) is not a safe file name; use letters, "
                "digits, '.', '_' and '-' only, starting with a letter or digit."
            )
        key = record.name.casefold()  # a.png and A.png are one file on Windows and macOS
        if key in seen:
            raise FetalStudioError(
                f"Two images would be exported as {record.name}.png ({seen[key]} and {record.image_path}); give every record a unique name."
            )
        seen[key] = str(record.image_path)


def _read_manifest(out: Path) -> dict[str, Any]:
    try:
        data = json.loads((out / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _check_out(out: Path, formats: tuple[str, ...]) -> None:
    if out.exists() and not out.is_dir():
        raise FetalStudioError(f"{out} is a file; pick a folder for the mask export.")
    ours = set(_read_manifest(out).get("formats", []))
    for name in formats:
        target = out / name
        if target.is_dir() and not any(target.iterdir()):
            continue
        if target.exists() and (name not in ours or not target.is_dir()):
            raise FetalStudioError(
                f"{target} already exists and is not a FetalStudio mask export; move it away or export to another folder."
            )


def _write_manifest(out: Path, formats: tuple[str, ...], count: int) -> None:
    previous = _read_manifest(out)
    atomic_write_json(out / MANIFEST, {
        "formats": sorted(set(previous.get("formats", [])) | set(formats)),
        "last_export": {
            "formats": list(formats), "records": count,
            "exported_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        },
    })


# --- staging (the "png" layout) -----------------------------------------------------------------
def _stage_all(records: list[MaskRecord], root: Path, step: Callable[[], None]) -> list[_Staged]:
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    staged = []
    for record in records:
        staged.append(_stage(record, root))
        step()
    return staged


def _stage(record: MaskRecord, root: Path) -> _Staged:
    gray = load_image(record.image_path).gray
    raw = load_image(record.mask_path).gray
    if raw.shape != gray.shape:
        raise FetalStudioError(
            f"The mask {record.mask_path} is {raw.shape[1]} x {raw.shape[0]} pixels but its image {record.image_path} is "
            f"{gray.shape[1]} x {gray.shape[0]}; save the mask at the image's size."
        )
    mask = binary_mask(raw, gray.shape, what=f"mask {record.mask_path}")
    ellipse = record.ellipse
    if ellipse is None and mask.any():
        ellipse = fit_ellipse(mask)
    image, mask_file = root / "images" / f"{record.name}.png", root / "masks" / f"{record.name}.png"
    write_png(image, gray)
    write_png(mask_file, mask)
    return _Staged(record.name, image, mask_file, ellipse, width=gray.shape[1], height=gray.shape[0])


# --- polygons ----------------------------------------------------------------------------------
def head_polygons(mask: np.ndarray, ellipse: Ellipse | None) -> list[list[float]]:
    """COCO polygons of a non-empty mask; a mask too thin for a contour polygon gets its box."""
    polygons = mask_polygons(mask, ellipse)
    if polygons:
        return polygons
    ys, xs = np.nonzero(mask)
    x0, y0, x1, y1 = float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)
    return [[x0, y0, x1, y0, x1, y1, x0, y1]]


def _polygon_area(polygon: list[float]) -> float:
    return abs(cv2.contourArea(np.asarray(polygon, np.float32).reshape(-1, 2)))


# --- COCO --------------------------------------------------------------------------------------
def _write_coco(staged: list[_Staged], root: Path, dataset_name: str, step: Callable[[], None]) -> dict[str, Path]:
    coco = root / "coco"
    (coco / "images").mkdir(parents=True)
    images: list[dict[str, Any]] = []
    polygons: list[dict[str, Any]] = []
    rles: list[dict[str, Any]] = []
    for image_id, item in enumerate(staged, start=1):
        file_name = f"{item.name}.png"
        copy_file(item.image, coco / "images" / file_name)
        images.append({"id": image_id, "file_name": file_name, "width": item.width, "height": item.height})
        mask = item.mask()
        if mask.any():
            annotation = coco_annotation(mask, item.ellipse, annotation_id=len(polygons) + 1, image_id=image_id)
            if not annotation["segmentation"]:  # too thin for a contour polygon
                annotation["segmentation"] = head_polygons(mask, item.ellipse)
            polygons.append(annotation)
            rles.append(rle_annotation(mask, annotation_id=annotation["id"], image_id=image_id))
        step()
    header = {
        "info": {"description": f"FetalStudio batch analysis {dataset_name}: predicted head masks"},
        "licenses": [], "images": images, "categories": [COCO_CATEGORY],
    }
    atomic_write_json(coco / "annotations_polygons.json", {**header, "annotations": polygons})
    atomic_write_json(coco / "annotations_rle.json", {**header, "annotations": rles})
    return {"coco": coco, "coco_polygons": coco / "annotations_polygons.json", "coco_rle": coco / "annotations_rle.json"}


def rle_annotation(mask: np.ndarray, annotation_id: int, image_id: int) -> dict[str, Any]:
    """A COCO annotation with the mask as compressed RLE (pycocotools; counts as text for JSON)."""
    coco_mask = _coco_mask()
    rle = coco_mask.encode(np.asfortranarray(mask.astype(np.uint8)))
    area, bbox = float(coco_mask.area(rle)), [float(v) for v in coco_mask.toBbox(rle)]
    return {
        "id": annotation_id,
        "image_id": image_id,
        "category_id": COCO_CATEGORY["id"],
        "segmentation": {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")},
        "area": area,
        "bbox": bbox,
        "iscrowd": 0,
    }


def _coco_mask():
    try:
        from pycocotools import mask as coco_mask
    except ImportError as error:
        raise FetalStudioError("The COCO export needs pycocotools for its RLE masks: pip install pycocotools==2.0.11") from error
    return coco_mask


# --- YOLO --------------------------------------------------------------------------------------
def _write_yolo(staged: list[_Staged], root: Path, final: Path, step: Callable[[], None]) -> dict[str, Path]:
    yolo = root / "yolo"
    (yolo / "images").mkdir(parents=True)
    (yolo / "labels").mkdir()
    for item in staged:
        copy_file(item.image, yolo / "images" / f"{item.name}.png")
        mask = item.mask()
        line = yolo_line(mask, item.ellipse) if mask.any() else ""
        atomic_write_bytes(yolo / "labels" / f"{item.name}.txt", line.encode("ascii"))
        step()
    atomic_write_bytes(yolo / "data.yaml", yolo_data_yaml(final).encode("utf-8"))
    return {"yolo": yolo, "yolo_data": yolo / "data.yaml"}


def yolo_line(mask: np.ndarray, ellipse: Ellipse | None) -> str:
    """``0 x1 y1 x2 y2 ...`` for a non-empty mask: its main polygon normalised to [0, 1]."""
    polygon = max(head_polygons(mask, ellipse), key=_polygon_area)
    height, width = mask.shape
    points = np.clip(np.asarray(polygon, np.float64).reshape(-1, 2) / (width, height), 0.0, 1.0)
    return f"{YOLO_CLASS} " + " ".join(f"{v:.6f}" for v in points.reshape(-1)) + "\n"


def yolo_data_yaml(folder: Path) -> str:
    """Ultralytics' dataset file (YAML, written as text: a JSON string is a valid YAML scalar)."""
    return (
        "# Ultralytics YOLO segmentation dataset of FetalStudio's predicted head masks.\n"
        "# train and val both list every image: split them before using val for model selection.\n"
        f"path: {json.dumps(str(folder.resolve()))}\n"
        "train: images\n"
        "val: images\n"
        "names:\n"
        f"  {YOLO_CLASS}: {COCO_CATEGORY['name']}\n"
    )

