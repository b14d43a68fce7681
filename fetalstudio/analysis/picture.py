"""The analysis picture: the image with the mask, the fitted ellipse with its BPD/OFD axes, the
prompt box and the clicked points — what the tab shows and what a batch run saves as overlay."""

from __future__ import annotations

import math
from collections.abc import Sequence

import cv2
import numpy as np

from fetalstudio.imaging.ellipse import Ellipse
from fetalstudio.imaging.masks import overlay

BOX_COLOUR = (0, 200, 255)
POSITIVE_COLOUR, NEGATIVE_COLOUR = (40, 220, 40), (230, 40, 230)
AXIS_COLOUR = (255, 255, 255)


def _thickness(shape: tuple[int, ...]) -> int:
    return max(1, round(max(shape[:2]) / 300))


def draw_axes(picture: np.ndarray, ellipse: Ellipse) -> None:
    """The ellipse's two full axes (OFD along the major, BPD along the minor), in place."""
    angle = math.radians(ellipse.angle_deg)
    thickness = _thickness(picture.shape)
    for length, direction in ((ellipse.axis_a, angle), (ellipse.axis_b, angle + math.pi / 2)):
        dx, dy = length * math.cos(direction), length * math.sin(direction)
        start = (round(ellipse.center_x - dx), round(ellipse.center_y - dy))
        end = (round(ellipse.center_x + dx), round(ellipse.center_y + dy))
        cv2.line(picture, start, end, AXIS_COLOUR, thickness, cv2.LINE_AA)


def analysis_picture(
    gray: np.ndarray,
    mask: np.ndarray | None = None,
    ellipse: Ellipse | None = None,
    box: Sequence[float] | None = None,
    points: Sequence[Sequence[float]] = (),
    point_labels: Sequence[int] = (),
    opacity: float = 0.4,
) -> np.ndarray:
    """RGB uint8 picture in the image's own pixels."""
    picture = overlay(gray, mask, ellipse, opacity=opacity)
    thickness = _thickness(picture.shape)
    if ellipse is not None:
        draw_axes(picture, ellipse)
    if box is not None:
        x0, y0, x1, y1 = (round(float(v)) for v in box)
        cv2.rectangle(picture, (x0, y0), (x1, y1), BOX_COLOUR, thickness, cv2.LINE_AA)
    labels = list(point_labels) or [1] * len(points)
    for (x, y), label in zip(points, labels):
        colour = POSITIVE_COLOUR if int(label) == 1 else NEGATIVE_COLOUR
        cv2.circle(picture, (round(float(x)), round(float(y))), 3 * thickness + 2, colour, -1, cv2.LINE_AA)
    return picture
