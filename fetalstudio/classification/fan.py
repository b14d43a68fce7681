"""Crop an ultrasound screen to its imaging sector (the fan) and black out what lies outside it.

Scanner screens carry burnt-in text, logos, grey-scale bars and UI that differ by machine and
centre (FETAL_PLANES_DB's Voluson/Aloka screens, HC18's exports, the African centres' crops). A
classifier trained on a few hundred images learns those as shortcuts. ``fan_crop`` keeps the
imaging sector only:

1. the image is reduced to gray and to ``WORK_SIZE`` px on its longer side (speed);
2. a light blur, then pixels above ``threshold`` (default: a low, image-relative level) are
   "bright" — tissue inside the sector is speckled, so almost all of it is bright after the blur;
3. a morphological opening with a disc of ``OPENING_FRACTION`` of the image size removes thin
   structures (text, tick marks, calipers outside the sector, the grey-scale bar's ticks) and
   detaches them from the sector;
4. the largest connected component is the sector; its convex hull (a fan is convex) fills the
   dark fluid inside it, and is dilated by ``MARGIN_FRACTION`` so the sector's edge survives;
5. the image is cropped to the hull's bounding box and every pixel outside the hull is set to 0.

When no component covers at least ``MIN_AREA_FRACTION`` of the image (a blank or odd image),
the image is returned unchanged: the crop may only remove what is clearly not the sector.
Pure numpy + OpenCV; deterministic; the same function runs in training and at prediction time
(``Preprocessing.crop == "fan"``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

WORK_SIZE = 256
OPENING_FRACTION = 0.03
MARGIN_FRACTION = 0.01
MIN_AREA_FRACTION = 0.15
PART_FRACTION = 0.03
BACKGROUND_MARGIN = 3.0


@dataclass(frozen=True)
class FanRegion:
    """The sector found in an image: bounding box in the image's pixels and a full-size mask."""

    box: tuple[int, int, int, int]  # left, top, right, bottom (exclusive)
    mask: np.ndarray  # H x W bool, True inside the (dilated) hull
    area_fraction: float  # hull area / image area

    @property
    def found(self) -> bool:
        return self.area_fraction > 0


def find_fan(gray: np.ndarray, threshold: float | None = None) -> FanRegion:
    """The imaging sector of a 2-D uint8 image (see the module docstring); whole image if none."""
    import cv2

    height, width = gray.shape
    whole = FanRegion((0, 0, width, height), np.ones((height, width), dtype=bool), 0.0)
    if height < 16 or width < 16:
        return whole
    scale = WORK_SIZE / max(height, width)
    small_size = (max(1, round(width * scale)), max(1, round(height * scale)))
    small = cv2.resize(gray, small_size, interpolation=cv2.INTER_AREA)
    level = _background_level(small) if threshold is None else float(threshold)
    bright = (small > level).astype(np.uint8)
    radius = max(1, round(OPENING_FRACTION * WORK_SIZE / 2))
    disc = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * radius + 1, 2 * radius + 1))
    bright = cv2.morphologyEx(bright, cv2.MORPH_OPEN, disc)
    count, labels, stats, _ = cv2.connectedComponentsWithStats(bright, connectivity=8)
    if count < 2:
        return whole
    areas = stats[1:, cv2.CC_STAT_AREA]
    keep = 1 + np.flatnonzero(areas >= PART_FRACTION * areas.max())
    points = np.column_stack(np.nonzero(np.isin(labels, keep))[::-1]).astype(np.float32)  # x, y
    hull = cv2.convexHull(points) / scale
    mask = np.zeros((height, width), dtype=np.uint8)
    cv2.fillConvexPoly(mask, np.round(hull).astype(np.int32), 1)
    margin = max(1, round(MARGIN_FRACTION * max(height, width)))
    mask = cv2.dilate(mask, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * margin + 1, 2 * margin + 1)))
    area_fraction = float(mask.mean())
    if area_fraction < MIN_AREA_FRACTION:
        return whole
    ys, xs = np.nonzero(mask)
    box = (int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1)
    return FanRegion(box, mask.astype(bool), area_fraction)


def _background_level(small: np.ndarray) -> float:
    """The gray level above which a pixel is not screen background.

    Screen backgrounds are flat and dark (0 in HC18 and the African crops, 2-6 on some
    FETAL_PLANES_DB screens); inside the sector even fluid carries a little noise. The level is
    the 2nd percentile (the background, or the darkest tissue of a sector filling the frame) plus
    ``BACKGROUND_MARGIN`` gray levels.
    """
    return float(np.percentile(small, 2)) + BACKGROUND_MARGIN


def fan_crop(image: Image.Image) -> Image.Image:
    """``image`` cropped to its sector, with everything outside the sector black.

    Gray (L) and RGB images keep their mode; any other mode is converted to L or RGB first.
    """
    if image.mode not in ("L", "RGB"):
        image = image.convert("RGB" if image.mode in ("RGBA", "P", "CMYK", "YCbCr", "LA") else "L")
    gray = np.asarray(image.convert("L"))
    region = find_fan(gray)
    if not region.found:
        return image
    left, top, right, bottom = region.box
    array = np.asarray(image).copy()
    outside = ~region.mask
    array[outside] = 0
    return Image.fromarray(np.ascontiguousarray(array[top:bottom, left:right]))
