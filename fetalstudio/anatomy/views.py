"""Pictures for the Anatomy editor: the difference of a result, a layout drawn on its scan, the ROI,
and the check of the generated anatomy against the layout asked for (with the detector's boxes).

Every picture is an RGB uint8 array of the image's size (the gray scan underneath). Boxes are drawn
as (turned) rectangles in their structure's colour, the colour the box annotator gives it
(``editor_boxes.annotator_labels``), with the structure's name beside them.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np

from fetalstudio.anatomy.layout import Layout, StructureBox
from fetalstudio.detection.metrics import box_iou
from fetalstudio.errors import FetalStudioError
from fetalstudio.vocabulary import anatomy_plane

#: A pixel counts as changed when it differs by more than this (uint8 levels).
CHANGED_LEVEL = 8
#: A found box overlapping the asked one at least this much (IoU) is "as asked"; less is "moved".
MATCH_IOU = 0.3
AS_ASKED, MOVED, MISSING, PRESENT_THOUGH_REMOVED, EXTRA = (
    "as asked", "moved", "missing", "present though removed", "extra box")
ROI_TINT_RGB = (255, 190, 0)
ROI_TINT_ALPHA = 0.35
_SHIFT = 4  # fixed-point bits for cv2 drawing: corners placed with 1/16 px precision
_FONT = cv2.FONT_HERSHEY_SIMPLEX


# --- the scan and the pen ----------------------------------------------------------------------
def _rgb(gray: np.ndarray, what: str = "the image") -> np.ndarray:
    """A writable RGB copy of an 8-bit gray (or RGB) image."""
    array = np.asarray(gray)
    if array.dtype != np.uint8 or not (array.ndim == 2 or (array.ndim == 3 and array.shape[2] == 3)):
        raise FetalStudioError(f"Cannot draw on {what}: an 8-bit gray or RGB image is needed, got an array of "
                               f"shape {array.shape} ({array.dtype}).")
    return np.repeat(array[..., None], 3, axis=2) if array.ndim == 2 else array.copy()


def line_px(shape: Sequence[int]) -> int:
    """The thickness of a box's line on an image of ``shape``: 1 px up to 480 px, growing with the image."""
    return max(1, round(max(shape[:2]) / 320))


def _fixed(points: np.ndarray) -> np.ndarray:
    """Continuous image coordinates -> cv2's pixel-centre fixed-point coordinates."""
    return np.round((np.asarray(points, np.float64) - 0.5) * (1 << _SHIFT)).astype(np.int32)


def _corners(box: StructureBox, layout: Layout, shape: Sequence[int]) -> np.ndarray:
    """The box's turned corners in the picture's pixels (a layout of another size is scaled to it)."""
    return box.corners() * np.array([shape[1] / layout.width, shape[0] / layout.height])


def _outline(picture: np.ndarray, corners: np.ndarray, color: Sequence[int], thickness: int) -> None:
    cv2.polylines(picture, [_fixed(corners).reshape(-1, 1, 2)], True, tuple(int(c) for c in color), thickness,
                  cv2.LINE_8, _SHIFT)


def _dashed(picture: np.ndarray, corners: np.ndarray, color: Sequence[int], thickness: int, dash: float) -> None:
    """A closed polygon drawn as dashes of ``dash`` pixels with gaps as long."""
    color = tuple(int(c) for c in color)
    for start, end in zip(corners, np.roll(corners, -1, axis=0)):
        length = float(np.hypot(*(end - start)))
        for offset in np.arange(0.0, length, 2 * dash):
            a = start + (end - start) * offset / length
            b = start + (end - start) * min(offset + dash, length) / length
            cv2.line(picture, tuple(_fixed(a)), tuple(_fixed(b)), color, thickness, cv2.LINE_8, _SHIFT)


def _label(picture: np.ndarray, text: str, corners: np.ndarray, color: Sequence[int]) -> None:
    """``text`` in ``color`` on a dark patch just above the box (inside its top when there is no room)."""
    height, width = picture.shape[:2]
    scale = max(0.35, max(height, width) / 1400)
    (text_w, text_h), baseline = cv2.getTextSize(text, _FONT, scale, 1)
    left = int(np.clip(np.floor(corners[:, 0].min()), 0, max(0, width - text_w - 2)))
    top = int(np.floor(corners[:, 1].min()))
    bottom = top - 2 if top - text_h - baseline - 2 >= 0 else min(height, top + text_h + baseline + 2)
    cv2.rectangle(picture, (left, bottom - text_h - baseline - 1), (left + text_w + 1, bottom), (0, 0, 0), cv2.FILLED)
    cv2.putText(picture, text, (left + 1, bottom - baseline), _FONT, scale, tuple(int(c) for c in color), 1,
                cv2.LINE_AA)


def _color(plane: str, name: str) -> tuple[int, int, int]:
    """The structure's display colour (white for a name the plane does not know)."""
    known = {s.name: s.color_rgb for s in anatomy_plane(plane).structures}
    return known.get(name, (255, 255, 255))


# --- pictures ---------------------------------------------------------------------------------------
def difference_picture(before: np.ndarray, after: np.ndarray) -> np.ndarray:
    """The result in gray with the pixels that changed by more than :data:`CHANGED_LEVEL` tinted red (RGB)."""
    changed = np.abs(before.astype(np.int16) - after.astype(np.int16)) > CHANGED_LEVEL
    picture = np.repeat(after[..., None], 3, axis=2)
    picture[changed] = (picture[changed] // 2 + np.array([127, 0, 0], np.uint8))
    return picture


def layout_picture(gray: np.ndarray, layout: Layout, *, highlight: set[str] | None = None) -> np.ndarray:
    """``gray`` with each box of ``layout`` drawn as a labelled rectangle in its structure's colour;
    the structures in ``highlight`` (e.g. the edited ones) are drawn thicker and last (on top)."""
    picture = _rgb(gray)
    thin = line_px(picture.shape)
    highlight = set(highlight or ())
    for box in sorted(layout.boxes, key=lambda b: b.structure in highlight):
        corners = _corners(box, layout, picture.shape)
        color = _color(layout.plane, box.structure)
        _outline(picture, corners, color, 3 * thin if box.structure in highlight else thin)
        _label(picture, box.structure, corners, color)
    return picture


def roi_tint_picture(gray: np.ndarray, roi: np.ndarray) -> np.ndarray:
    """``gray`` with the ROI (a (H, W) bool mask of its size) tinted and outlined; outline and tint stay
    inside the ROI, every pixel outside it is the scan's own gray."""
    picture = _rgb(gray)
    roi = np.asarray(roi, bool)
    if roi.shape != picture.shape[:2]:
        raise FetalStudioError(f"The ROI is {roi.shape[1] if roi.ndim > 1 else '?'}x{roi.shape[0]} pixels but the "
                               f"image is {picture.shape[1]}x{picture.shape[0]}; draw the ROI on the image itself.")
    if not roi.any():
        return picture
    tint = np.array(ROI_TINT_RGB, np.float32)
    picture[roi] = np.round((1 - ROI_TINT_ALPHA) * picture[roi] + ROI_TINT_ALPHA * tint).astype(np.uint8)
    width = 2 * line_px(picture.shape) + 1
    inner = cv2.erode(roi.astype(np.uint8), np.ones((width, width), np.uint8), borderType=cv2.BORDER_CONSTANT,
                      borderValue=0).astype(bool)
    picture[roi & ~inner] = ROI_TINT_RGB
    return picture


# --- does the generated anatomy match what was asked? ------------------------------------------------
@dataclass(frozen=True)
class AnatomyCheckRow:
    """One structure's box as asked and as the detector found it on the result. ``verdict``: "as asked"
    (IoU >= :data:`MATCH_IOU`), "moved" (found elsewhere), "missing" (asked, not found), "present though
    removed" (found, not in the layout asked for) or "extra box" (found once more than asked)."""

    structure: str
    asked_box: StructureBox | None
    found_box: StructureBox | None  # upright, in the image's pixels
    score: float | None
    iou: float | None
    verdict: str


def _extent(box: StructureBox) -> tuple[float, float, float, float]:
    """The upright extent of a (turned) box, what an upright detector box is compared with."""
    corners = box.corners()
    return (*corners.min(axis=0), *corners.max(axis=0))


def _found_box(found: Any) -> StructureBox:
    return StructureBox(str(found.structure), float(found.x0), float(found.y0), float(found.x1), float(found.y1))


def _matched(asked: list[StructureBox], found: list[Any]) -> list[tuple[int, int]]:
    """Pairs (asked index, found index) of one structure: the best overlaps first, then the nearest centres."""
    def rank(i: int, j: int) -> tuple[float, float]:
        box = _found_box(found[j])
        distance = float(np.hypot(*np.subtract(asked[i].center, box.center)))
        return -box_iou(_extent(asked[i]), (box.x0, box.y0, box.x1, box.y1)), distance

    pairs, used_asked, used_found = [], set(), set()
    for i, j in sorted(((i, j) for i in range(len(asked)) for j in range(len(found))), key=lambda p: rank(*p)):
        if i not in used_asked and j not in used_found:
            pairs.append((i, j))
            used_asked.add(i)
            used_found.add(j)
    return sorted(pairs)


def _structure_rows(name: str, asked: list[StructureBox], found: list[Any]) -> list[AnatomyCheckRow]:
    rows = []
    pairs = _matched(asked, found)
    for i, j in pairs:
        box = _found_box(found[j])
        iou = box_iou(_extent(asked[i]), (box.x0, box.y0, box.x1, box.y1))
        rows.append(AnatomyCheckRow(name, asked[i], box, float(found[j].score), iou,
                                    AS_ASKED if iou >= MATCH_IOU else MOVED))
    matched_asked, matched_found = {i for i, _ in pairs}, {j for _, j in pairs}
    rows += [AnatomyCheckRow(name, box, None, None, None, MISSING)
             for i, box in enumerate(asked) if i not in matched_asked]
    rows += [AnatomyCheckRow(name, None, _found_box(item), float(item.score), None,
                             EXTRA if asked else PRESENT_THOUGH_REMOVED)
             for j, item in enumerate(found) if j not in matched_found]
    return rows


def anatomy_check(asked: Layout, found: Iterable[Any]) -> list[AnatomyCheckRow]:
    """Each structure of the layout asked for and each structure the detector found on the result
    (``detection.predict.Detection``: structure, x0, y0, x1, y1, score), paired box by box, in the plane's
    structure order (names the plane does not know last)."""
    found = list(found)
    order = [s.name for s in anatomy_plane(asked.plane).structures]
    names = {box.structure for box in asked.boxes} | {str(item.structure) for item in found}
    rows = []
    for name in sorted(names, key=lambda n: (order.index(n) if n in order else len(order), n)):
        rows += _structure_rows(name, [b for b in asked.boxes if b.structure == name],
                                [item for item in found if str(item.structure) == name])
    return rows


def detections_picture(gray: np.ndarray, asked: Layout, found: Iterable[Any]) -> np.ndarray:
    """``gray`` (the result) with the boxes asked for dashed and thin, and the detector's boxes solid with
    "name 0.87" (the detector's confidence) labels, each in its structure's colour."""
    picture = _rgb(gray)
    thin = line_px(picture.shape)
    for box in asked.boxes:
        _dashed(picture, _corners(box, asked, picture.shape), _color(asked.plane, box.structure), thin, 3.0 + 3 * thin)
    for item in found:
        box = _found_box(item)
        corners = box.corners()
        color = _color(asked.plane, box.structure)
        _outline(picture, corners, color, 2 * thin)
        _label(picture, f"{box.structure} {float(item.score):.2f}", corners, color)
    return picture
