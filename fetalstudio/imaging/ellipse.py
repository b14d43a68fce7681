"""Head masks and ellipses: fill an outline annotation, fit an ellipse, measure HC, Dice.

HC18-style annotations are ellipse *outlines* (a ring 2-3 px wide). The head region is the
inside of the ring's centre line, and the reference head circumference (HC) is the perimeter of
that ellipse times the pixel size. Fitting ``cv2.fitEllipse`` to *all outline pixels* recovers
it: on the 805 shared HC18 outlines the HC error is 0.009 mm on average (max 0.07 mm), whereas
fitting the outer contour of the hole-filled ring overestimates HC by 0.72 mm, the inner contour
underestimates it by 1.5 mm, and their average by 0.4 mm.

So ``fill_outline`` fits the ellipse to the outline pixels and fills it. That also works for
outlines that run out of the frame (HC18 186_HC, 346_HC, 628_2HC, 787_HC; es_heads
Patient00708_Plane3_3_of_6, Patient00830_Plane3_3_of_3), where a hole fill gives nothing.
``fit_ellipse`` on a *filled* mask fits its largest contour, leaving out contour points on the
image border (a head cut off by the frame must not be fitted to the frame edge); on the filled
HC18 ellipses this gives HC within 0.08 mm of ``hc_mm``.

Only numpy and OpenCV are needed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np

#: A mask counts as an outline (not a filled region) when it is thin: its widest point is
#: under this fraction of its extent, or hole filling at least doubles it (a closed ring).
_THIN_FRACTION = 0.05
#: A closed outline whose filled ellipse overlaps its hole fill less than this (Dice) is not
#: an ellipse (e.g. a hand-drawn contour): it is hole-filled instead. Shared masks: >= 0.985.
_ELLIPSE_DICE = 0.96
_SUBPIXEL_SHIFT = 4  # cv2.ellipse fixed-point bits: draw with 1/16 px precision


@dataclass(frozen=True)
class Ellipse:
    """An ellipse in pixel coordinates (x = column, y = row).

    ``axis_a``/``axis_b`` are semi-axes in pixels (a along ``angle_deg``, measured like OpenCV:
    clockwise from the x axis in image coordinates).
    """

    center_x: float
    center_y: float
    axis_a: float
    axis_b: float
    angle_deg: float

    @classmethod
    def from_cv2(cls, box: tuple) -> Ellipse:
        (cx, cy), (width, height), angle = box
        return cls(float(cx), float(cy), float(width) / 2, float(height) / 2, float(angle))

    def perimeter_px(self) -> float:
        return ramanujan_perimeter(self.axis_a, self.axis_b)

    def to_mask(self, shape: tuple[int, int]) -> np.ndarray:
        """The filled ellipse as a boolean mask of ``shape`` (rows, columns), clipped to the frame."""
        canvas = np.zeros(shape[:2], np.uint8)
        scale = 1 << _SUBPIXEL_SHIFT
        center = (int(round(self.center_x * scale)), int(round(self.center_y * scale)))
        axes = (max(0, int(round(self.axis_a * scale))), max(0, int(round(self.axis_b * scale))))
        cv2.ellipse(canvas, center, axes, self.angle_deg, 0, 360, 1, -1, cv2.LINE_8, _SUBPIXEL_SHIFT)
        return canvas.astype(bool)


def _binary(mask: np.ndarray) -> np.ndarray:
    array = np.asarray(mask)
    if array.ndim == 3:
        array = array.max(axis=2)
    if array.ndim != 2:
        raise ValueError(f"a mask must be a 2-D array (rows x columns), not shape {array.shape}")
    return array > (127 if array.dtype == np.uint8 and array.max() > 1 else 0)


def fill_holes(mask: np.ndarray) -> np.ndarray:
    """Boolean mask with every region enclosed by ``mask`` filled (like scipy's binary_fill_holes)."""
    binary = _binary(mask).astype(np.uint8)
    contours, _ = cv2.findContours(binary, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    filled = binary.copy()
    cv2.drawContours(filled, contours, -1, 1, thickness=cv2.FILLED)
    return filled.astype(bool)


def _is_thin(binary: np.ndarray) -> bool:
    ys, xs = np.nonzero(binary)
    extent = max(xs.max() - xs.min(), ys.max() - ys.min()) + 1
    widest = float(cv2.distanceTransform(np.pad(binary, 1).astype(np.uint8), cv2.DIST_L2, 5).max())
    return widest < _THIN_FRACTION * extent


def is_outline(mask: np.ndarray) -> bool:
    """True for a thin ring/arc (an outline annotation), False for a filled region or nothing."""
    binary = _binary(mask)
    count = int(binary.sum())
    if count < 5:
        return False
    return int(fill_holes(binary).sum()) >= 2 * count or _is_thin(binary)


def _fit_points(xs: np.ndarray, ys: np.ndarray) -> Ellipse | None:
    if len(xs) < 5:
        return None
    points = np.stack([xs, ys], axis=1).astype(np.float32)
    ellipse = Ellipse.from_cv2(cv2.fitEllipse(points))
    values = (ellipse.center_x, ellipse.center_y, ellipse.axis_a, ellipse.axis_b)
    if not all(math.isfinite(v) for v in values) or min(ellipse.axis_a, ellipse.axis_b) <= 0:
        return None
    return ellipse


def fit_outline(mask: np.ndarray) -> Ellipse | None:
    """The ellipse through an outline ring's centre line: a fit to every outline pixel."""
    ys, xs = np.nonzero(_binary(mask))
    return _fit_points(xs, ys)


def fill_outline(mask: np.ndarray) -> np.ndarray:
    """The filled head region (boolean, same rows x columns) of an outline or filled mask.

    - An outline ring or arc (HC18 style, closed or running out of the frame): the ellipse
      fitted to the outline pixels, filled. A closed outline that is clearly not an ellipse
      (e.g. a hand-drawn contour) is hole-filled instead.
    - An already filled mask (or an empty one) is returned as a boolean mask unchanged.
    Accepts 0/1, 0/255 and boolean masks (a colour mask counts where any channel is set).
    """
    binary = _binary(mask)
    count = int(binary.sum())
    if count < 5:
        return binary
    holes = fill_holes(binary)
    closed = int(holes.sum()) >= 2 * count
    if not closed and not _is_thin(binary):
        return binary  # already filled
    ys, xs = np.nonzero(binary)
    ellipse = _fit_points(xs, ys)
    if ellipse is None:
        return holes
    filled = ellipse.to_mask(binary.shape)
    if closed and dice(filled, holes) < _ELLIPSE_DICE:
        return holes
    return filled


def largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 8-connected region of a mask, holes filled (empty in, empty out)."""
    binary = _binary(mask).astype(np.uint8)
    count, labels, stats, _ = cv2.connectedComponentsWithStats(binary, connectivity=8)
    if count <= 1:
        return binary.astype(bool)
    biggest = 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))
    return fill_holes(labels == biggest)


def fit_ellipse(binary_mask: np.ndarray) -> Ellipse | None:
    """Ellipse fitted to the largest contour of a filled mask (None when there is none).

    Contour points on the image border are left out when enough others remain, so a head that
    runs out of the frame is fitted to its real edge only.
    """
    binary = _binary(binary_mask).astype(np.uint8)
    contours, _ = cv2.findContours(binary, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    if not contours:
        return None
    points = max(contours, key=cv2.contourArea).reshape(-1, 2)
    rows, cols = binary.shape
    inside = (points[:, 0] > 0) & (points[:, 1] > 0) & (points[:, 0] < cols - 1) & (points[:, 1] < rows - 1)
    if inside.sum() >= max(5, len(points) // 4):
        points = points[inside]
    return _fit_points(points[:, 0], points[:, 1])


def ramanujan_perimeter(a: float, b: float) -> float:
    """Perimeter of an ellipse with semi-axes a, b (Ramanujan's second approximation)."""
    a, b = abs(float(a)), abs(float(b))
    if a + b == 0:
        return 0.0
    h = ((a - b) / (a + b)) ** 2
    return math.pi * (a + b) * (1 + 3 * h / (10 + math.sqrt(4 - 3 * h)))


def head_circumference_mm(ellipse: Ellipse, pixel_size_mm: float) -> float:
    """HC in millimetres: the ellipse's perimeter in pixels times the pixel size."""
    return ellipse.perimeter_px() * float(pixel_size_mm)


def dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice overlap of two masks of the same shape (1.0 when both are empty)."""
    a, b = _binary(a), _binary(b)
    if a.shape != b.shape:
        raise ValueError(f"masks differ in shape: {a.shape} vs {b.shape}")
    total = int(a.sum()) + int(b.sum())
    return 1.0 if total == 0 else 2.0 * int((a & b).sum()) / total


def bounding_box(mask: np.ndarray) -> tuple[int, int, int, int] | None:
    """(x_min, y_min, x_max, y_max) of a mask's pixels, inclusive pixel indices; None when empty."""
    ys, xs = np.nonzero(_binary(mask))
    if len(xs) == 0:
        return None
    return int(xs.min()), int(ys.min()), int(xs.max()), int(ys.max())


def box_ellipse(box) -> Ellipse:
    """The axis-aligned ellipse inscribed in a box (the trivial 'box-ellipse' baseline)."""
    x0, y0, x1, y1 = (float(v) for v in box)
    return Ellipse((x0 + x1) / 2, (y0 + y1) / 2, (x1 - x0) / 2, (y1 - y0) / 2, 0.0)


def jitter_box(box, width: int, height: int, max_px: float, rng) -> tuple[float, float, float, float]:
    """``box`` with each coordinate moved by a uniform random amount in [-max_px, max_px] px,
    kept inside a ``width`` x ``height`` frame and at least 1 px wide and high.

    ``rng`` is a ``numpy.random.Generator``. This is how training perturbs boxes (MedSAM-style
    0-20 px) and how ``eval segmenter --box jitter`` builds its boxes.
    """
    x0, y0, x1, y1 = (float(v) + float(d) for v, d in zip(box, rng.uniform(-max_px, max_px, size=4)))
    x0, x1 = min(max(x0, 0.0), width - 1.0), min(max(x1, 0.0), width - 1.0)
    y0, y1 = min(max(y0, 0.0), height - 1.0), min(max(y1, 0.0), height - 1.0)
    if x1 < x0 + 1:
        x0, x1 = max(0.0, min(x0, x1) - 0.5), min(width - 1.0, max(x0, x1) + 0.5)
    if y1 < y0 + 1:
        y0, y1 = max(0.0, min(y0, y1) - 0.5), min(height - 1.0, max(y0, y1) + 0.5)
    return x0, y0, x1, y1
