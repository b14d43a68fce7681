"""Image+mask pairs as training datasets, shared by the review export and the analysis mask export.

- nnU-Net v2 raw layout: ``nnunet/DatasetXXX_Name/`` with ``imagesTr/<case>_0000.png``,
  ``labelsTr/<case>.png`` (labels 0/1) and ``dataset.json`` (``write_nnunet_dataset``).
- COCO instance annotations (``coco_annotation``): segmentation = the ellipse polygon when the
  ellipse matches the mask and lies inside the frame, else the mask's outer contours. Coordinates
  are COCO's: pixel (col, row) covers [col, col+1) x [row, row+1), so pixel centres lie at +0.5.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from fetalstudio.errors import FetalStudioError
from fetalstudio.imaging.ellipse import Ellipse, dice
from fetalstudio.imaging.files import atomic_write_json, copy_file, write_png

COCO_CATEGORY = {"id": 1, "name": "fetal_head", "supercategory": "anatomy"}
#: The ellipse stands for the mask in COCO only when they agree at least this well (Dice).
ELLIPSE_MATCH_DICE = 0.95
ELLIPSE_POLYGON_POINTS = 90


def check_choices(values: Sequence[str], allowed: tuple[str, ...], what: str) -> tuple[str, ...]:
    values = (values,) if isinstance(values, str) else tuple(values)
    unknown = [v for v in values if v not in allowed]
    if unknown or not values:
        raise FetalStudioError(f"Unknown {what} {', '.join(map(repr, unknown)) or '(none given)'}; choose from: {', '.join(allowed)}.")
    return tuple(dict.fromkeys(values))


def nnunet_dataset_name(dataset_id: int, name: str) -> str:
    """DatasetXXX_Name as nnU-Net v2 wants it (3-digit id, name of letters, digits, _ and -)."""
    if not 1 <= int(dataset_id) <= 999:
        raise FetalStudioError(f"The nnU-Net dataset id must be 1-999, not {dataset_id}.")
    safe = re.sub(r"[^A-Za-z0-9_-]+", "_", name).strip("_") or "FetalHeads"
    return f"Dataset{int(dataset_id):03d}_{safe}"


@dataclass(frozen=True)
class NnunetCase:
    case: str  # nnU-Net case identifier: imagesTr/<case>_0000.png, labelsTr/<case>.png
    image: Path  # a grayscale PNG, copied as is
    mask: Callable[[], np.ndarray]  # the boolean mask, read when written (an empty one gives an all-zero label)


def write_nnunet_dataset(
    root: Path, dataset_id: int, name: str, cases: Sequence[NnunetCase], step: Callable[[], None], *,
    label: str, description: str,
) -> dict[str, Path]:
    """nnU-Net v2 raw layout ``root/nnunet/DatasetXXX_Name/`` (labels 0 = background, 1 = ``label``)."""
    dataset = root / "nnunet" / nnunet_dataset_name(dataset_id, name)
    (dataset / "imagesTr").mkdir(parents=True)
    (dataset / "labelsTr").mkdir()
    for case in cases:
        copy_file(case.image, dataset / "imagesTr" / f"{case.case}_0000.png")
        write_png(dataset / "labelsTr" / f"{case.case}.png", case.mask().astype(np.uint8))
        step()
    atomic_write_json(dataset / "dataset.json", {
        "channel_names": {"0": "ultrasound"},
        "labels": {"background": 0, label: 1},
        "numTraining": len(cases),
        "file_ending": ".png",
        "name": dataset.name,
        "description": description,
    })
    return {"nnunet": dataset, "nnunet_dataset_json": dataset / "dataset.json"}


def coco_annotation(mask: np.ndarray, ellipse: Ellipse | None, annotation_id: int, image_id: int) -> dict[str, Any]:
    """A COCO instance annotation of a boolean mask (area = mask pixels, bbox = the mask's box)."""
    ys, xs = np.nonzero(mask)
    x0, y0, x1, y1 = int(xs.min()), int(ys.min()), int(xs.max()), int(ys.max())
    return {
        "id": annotation_id,
        "image_id": image_id,
        "category_id": COCO_CATEGORY["id"],
        "segmentation": mask_polygons(mask, ellipse),
        "area": float(mask.sum()),
        "bbox": [float(x0), float(y0), float(x1 - x0 + 1), float(y1 - y0 + 1)],
        "iscrowd": 0,
    }


def mask_polygons(mask: np.ndarray, ellipse: Ellipse | None) -> list[list[float]]:
    """The ellipse polygon when it describes the mask, else the mask's outer contours."""
    if ellipse is not None and _ellipse_describes(mask, ellipse):
        return [_flat(ellipse_polygon(ellipse))]
    contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    return [_flat(c.reshape(-1, 2).astype(np.float64)) for c in contours if len(c) >= 3]


def ellipse_polygon(ellipse: Ellipse, points: int = ELLIPSE_POLYGON_POINTS) -> np.ndarray:
    """(points x 2) x, y in pixel-index coordinates (OpenCV's angle: clockwise in the image)."""
    t = np.linspace(0.0, 2.0 * np.pi, points, endpoint=False)
    theta = math.radians(ellipse.angle_deg)
    a, b = ellipse.axis_a * np.cos(t), ellipse.axis_b * np.sin(t)
    x = ellipse.center_x + a * math.cos(theta) - b * math.sin(theta)
    y = ellipse.center_y + a * math.sin(theta) + b * math.cos(theta)
    return np.stack([x, y], axis=1)


def _ellipse_describes(mask: np.ndarray, ellipse: Ellipse) -> bool:
    height, width = mask.shape
    polygon = ellipse_polygon(ellipse)
    inside = (polygon[:, 0] >= 0).all() and (polygon[:, 1] >= 0).all() and (polygon[:, 0] <= width - 1).all() and (polygon[:, 1] <= height - 1).all()
    return bool(inside) and dice(ellipse.to_mask(mask.shape), mask) >= ELLIPSE_MATCH_DICE


def _flat(points: np.ndarray) -> list[float]:
    """COCO's [x1, y1, x2, y2, ...], shifted from pixel indices to pixel-centre coordinates."""
    return [round(float(v) + 0.5, 3) for v in points.reshape(-1)]
