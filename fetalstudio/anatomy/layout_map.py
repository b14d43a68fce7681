"""A layout drawn as images: a colour map (display, ControlNet condition) and a label map (models).

Filled boxes by default. The layout map reaches a ControlNet through 8x downsampling (its
conditioning embedder, or the VAE encoder in FetalFlex's pre-alignment); a 1-2 px outline of a
small structure such as the nasal bone (about 12 x 4 px at 384 px) all but vanishes there, while a
filled box keeps its area and colour, i.e. which structure sits where and how big it is. Outlines
(``style="outline"``) carry edges instead and leave the anatomy under a box visible in an overlay;
they are offered for display and for experiments.

Overlaps are resolved deterministically: boxes are drawn largest first (area in layout pixels),
ties by label id, then by their order in the layout, so a small structure drawn over a large one
(the nasal bone over the nasal skin, the fourth ventricle over the midbrain) stays visible.

Maps can be drawn at any size: each box's (turned) corners are scaled from the layout's size to
the map's, so every size shows the same geometry (a map pixel belongs to a box when its centre
falls inside it); a box thinner than a pixel at that size still
gets at least a one-pixel line, so no structure disappears from a small map.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import cv2
import numpy as np

from fetalstudio.anatomy.layout import Layout, StructureBox
from fetalstudio.errors import FetalStudioError
from fetalstudio.vocabulary import BACKGROUND_LABEL, structure

MapStyle = Literal["filled", "outline"]
MAP_STYLES: tuple[str, ...] = ("filled", "outline")
DEFAULT_STYLE: MapStyle = "filled"
#: Outline thickness in map pixels at 512 px (scaled with the map's longer side, at least 1).
OUTLINE_PX_AT_512 = 3
_SHIFT = 4  # fixed-point bits for cv2 polygons: corners placed with 1/16 px precision


@dataclass(frozen=True)
class LayoutMaps:
    """The two maps of one layout at one size."""

    color: np.ndarray  # (H, W, 3) uint8 RGB, black background
    labels: np.ndarray  # (H, W) uint8 label ids (vocabulary), 0 = background


def drawing_order(layout: Layout) -> list[StructureBox]:
    """The boxes in the order they are drawn: largest area first, then label id, then layout order."""
    indexed = list(enumerate(layout.boxes))
    indexed.sort(key=lambda item: (-item[1].area, structure(layout.plane, item[1].structure).label, item[0]))
    return [box for _, box in indexed]


def _map_size(layout: Layout, size: tuple[int, int] | None) -> tuple[int, int]:
    if size is None:
        return layout.width, layout.height
    width, height = (int(v) for v in size)
    if width < 1 or height < 1:
        raise FetalStudioError(f"A layout map of {width}x{height} pixels cannot be drawn; give a positive size.")
    return width, height


def _polygon(box: StructureBox, scale_x: float, scale_y: float) -> np.ndarray:
    """The box's corners in map pixel-centre coordinates, fixed point for cv2 (shift ``_SHIFT``)."""
    corners = box.corners() * np.array([scale_x, scale_y])
    centred = corners - 0.5  # continuous pixel edges -> cv2's pixel-centre coordinates
    return np.round(centred * (1 << _SHIFT)).astype(np.int32).reshape(-1, 1, 2)


def _filled(box: StructureBox, layout_size: tuple[int, int], width: int, height: int) -> np.ndarray:
    """The map pixels whose centres lie in the box: the centre, taken back to layout pixels and turned
    back by the box's rotation, must fall in [x0, x1) x [y0, y1). Exact at any size and aspect ratio
    (``cv2.fillPoly`` also paints the pixels its edges touch, one more column and row)."""
    scale_x, scale_y = width / layout_size[0], height / layout_size[1]
    corners = box.corners() * np.array([scale_x, scale_y])
    left, top = (max(0, int(np.floor(v)) - 1) for v in corners.min(axis=0))
    right = min(width, int(np.ceil(corners[:, 0].max())) + 1)
    bottom = min(height, int(np.ceil(corners[:, 1].max())) + 1)
    mask = np.zeros((height, width), bool)
    if right <= left or bottom <= top:
        return mask
    xs = (np.arange(left, right) + 0.5) / scale_x
    ys = (np.arange(top, bottom) + 0.5) / scale_y
    dx, dy = xs[None, :] - box.center[0], ys[:, None] - box.center[1]
    angle = np.radians(box.rotation_deg)  # OpenCV's convention: the width axis is (cos, sin)
    u = dx * np.cos(angle) + dy * np.sin(angle) + box.width / 2
    v = -dx * np.sin(angle) + dy * np.cos(angle) + box.height / 2
    mask[top:bottom, left:right] = (u >= 0) & (u < box.width) & (v >= 0) & (v < box.height)
    return mask


def box_mask(box: StructureBox, layout_size: tuple[int, int], size: tuple[int, int] | None = None,
             style: MapStyle = DEFAULT_STYLE, outline_px: int | None = None) -> np.ndarray:
    """Where one box is drawn on a map of ``size`` (default: the layout's), as a boolean (H, W) mask."""
    width, height = size or layout_size
    if style == "filled":
        mask = _filled(box, layout_size, width, height)
        if mask.any():
            return mask
    canvas = np.zeros((height, width), np.uint8)
    polygon = _polygon(box, width / layout_size[0], height / layout_size[1])
    thickness = 1 if style == "filled" else outline_px or max(1, round(OUTLINE_PX_AT_512 * max(width, height) / 512))
    cv2.polylines(canvas, [polygon], True, 1, thickness, cv2.LINE_8, _SHIFT)
    return canvas.astype(bool)


def render_layout(layout: Layout, size: tuple[int, int] | None = None, style: MapStyle = DEFAULT_STYLE,
                  outline_px: int | None = None) -> LayoutMaps:
    """The colour and label maps of ``layout`` at ``size`` = (width, height) (default: the layout's).

    ``style``: "filled" (default, see the module docstring) or "outline"; ``outline_px`` overrides the
    outline thickness (map pixels)."""
    if style not in MAP_STYLES:
        raise FetalStudioError(f"Unknown layout map style {style!r}; choose one of: {', '.join(MAP_STYLES)}.")
    width, height = _map_size(layout, size)
    color = np.zeros((height, width, 3), np.uint8)
    labels = np.full((height, width), BACKGROUND_LABEL, np.uint8)
    for box in drawing_order(layout):
        info = structure(layout.plane, box.structure)
        where = box_mask(box, layout.size, (width, height), style, outline_px)
        color[where] = info.color_rgb
        labels[where] = info.label
    return LayoutMaps(color=color, labels=labels)


def layout_color_map(layout: Layout, size: tuple[int, int] | None = None, style: MapStyle = DEFAULT_STYLE,
                     outline_px: int | None = None) -> np.ndarray:
    """The RGB colour map (H, W, 3) uint8: the ControlNet condition image and the display map."""
    return render_layout(layout, size, style, outline_px).color


def layout_label_map(layout: Layout, size: tuple[int, int] | None = None, style: MapStyle = DEFAULT_STYLE,
                     outline_px: int | None = None) -> np.ndarray:
    """The label map (H, W) uint8 of vocabulary label ids, 0 = background."""
    return render_layout(layout, size, style, outline_px).labels


def overlay_layout(image: np.ndarray, layout: Layout, alpha: float = 0.6, style: MapStyle = "outline") -> np.ndarray:
    """``image`` (gray (H, W) or RGB (H, W, 3) uint8) with the layout drawn over it, RGB uint8, for
    showing a layout on its scan; the layout is drawn at the image's size."""
    if image.ndim == 2:
        image = np.repeat(image[:, :, None], 3, axis=2)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise FetalStudioError(f"Cannot draw a layout over an array of shape {image.shape} ({image.dtype}); "
                               "give an 8-bit gray or RGB image.")
    maps = render_layout(layout, (image.shape[1], image.shape[0]), style)
    drawn = maps.labels != BACKGROUND_LABEL
    blended = image.astype(np.float32)
    blended[drawn] = (1 - alpha) * blended[drawn] + alpha * maps.color[drawn]
    return np.clip(np.round(blended), 0, 255).astype(np.uint8)
