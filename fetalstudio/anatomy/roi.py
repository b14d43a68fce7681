"""ROI masks: the region an edit regenerates, at the image's size (True = regenerate).

Derived from an edit: the union of the changed boxes before and after (a moved structure leaves a
hole where it was and appears where it goes), grown by a margin in image pixels so the new anatomy
blends into its surroundings. Or a user's mask: a lossless PNG of the image's size, any non-zero
pixel inside. An empty ROI is refused: it would regenerate nothing.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from pathlib import Path

import cv2
import numpy as np
from PIL import Image, UnidentifiedImageError

from fetalstudio.anatomy.layout import Layout, StructureBox
from fetalstudio.anatomy.layout_map import box_mask
from fetalstudio.errors import FetalStudioError
from fetalstudio.imaging.files import write_png

#: Default margin (image pixels) around the edited boxes: about 4 % of a 384 px image.
DEFAULT_MARGIN_PX = 16


def changed_boxes(before: Layout, after: Layout) -> list[StructureBox]:
    """The boxes that differ between two layouts of one image: removed or moved ones as they were,
    added or moved ones as they are (a multiset difference, so duplicates count)."""
    old, new = Counter(before.boxes), Counter(after.boxes)
    return list((old - new).elements()) + list((new - old).elements())


def boxes_roi(boxes: Iterable[StructureBox], layout_size: tuple[int, int], margin_px: float = DEFAULT_MARGIN_PX,
              size: tuple[int, int] | None = None) -> np.ndarray:
    """The union of ``boxes`` (filled, turned ones too) grown by ``margin_px`` layout pixels, as a
    boolean (H, W) mask at the layout's size, or at ``size`` = (width, height) (a pixel there is in
    the ROI if any part of it is)."""
    if margin_px < 0 or not np.isfinite(margin_px):
        raise FetalStudioError(f"The ROI margin must be 0 or more pixels, got {margin_px}.")
    mask = np.zeros((layout_size[1], layout_size[0]), np.uint8)
    for box in boxes:
        mask |= box_mask(box, layout_size).astype(np.uint8)
    radius = int(round(margin_px))
    if radius and mask.any():
        mask = cv2.dilate(mask, np.ones((2 * radius + 1, 2 * radius + 1), np.uint8))
    if size is not None and tuple(size) != tuple(layout_size):
        mask = cv2.resize(mask.astype(np.float32), tuple(int(v) for v in size), interpolation=cv2.INTER_AREA) > 0
    return mask.astype(bool)


def edit_roi(before: Layout, after: Layout, margin_px: float = DEFAULT_MARGIN_PX,
             size: tuple[int, int] | None = None) -> np.ndarray:
    """The ROI of an edit: the changed boxes, old and new, grown by ``margin_px``; refused if empty."""
    if before.size != after.size or before.plane != after.plane:
        raise FetalStudioError(f"The layouts before ({before.plane}, {before.width}x{before.height}) and after "
                               f"({after.plane}, {after.width}x{after.height}) are not of the same image.")
    changed = changed_boxes(before, after)
    if not changed:
        raise FetalStudioError("The edited layout equals the original, so there is no region to regenerate. "
                               "Edit a structure (or choose a preset), or give a mask of your own.")
    return require_roi(boxes_roi(changed, before.size, margin_px, size), "the edit's region")


def structures_roi(layout: Layout, names: Iterable[str], margin_px: float = DEFAULT_MARGIN_PX,
                   size: tuple[int, int] | None = None) -> np.ndarray:
    """The ROI around the boxes of some structures (e.g. to hide and regenerate them)."""
    boxes = [box for name in names for box in layout.boxes_of(name)]
    return require_roi(boxes_roi(boxes, layout.size, margin_px, size), "the structures' region")


def require_roi(mask: np.ndarray, what: str = "the ROI") -> np.ndarray:
    if not mask.any():
        raise FetalStudioError(f"{what[0].upper()}{what[1:]} is empty, so nothing would be regenerated. Draw or "
                               "choose a region that covers the structures to change.")
    return mask


def read_user_roi(path: Path, size: tuple[int, int]) -> np.ndarray:
    """A user's ROI mask: a PNG of exactly ``size`` = (width, height); non-zero pixels (any channel,
    or the alpha of a painted RGBA layer) are the ROI."""
    path = Path(path)
    if path.suffix.lower() != ".png":
        raise FetalStudioError(f"The ROI mask {path.name} is not a PNG. Save the mask as PNG: a lossy format "
                               "(JPEG) blurs its edge into a grey fringe.")
    try:
        with Image.open(path) as image:
            image.load()
            if image.format != "PNG":
                raise FetalStudioError(f"The ROI mask {path.name} is a {image.format} file named .png; save it as a real PNG.")
            if image.size != tuple(size):
                raise FetalStudioError(f"The ROI mask {path.name} is {image.width}x{image.height} pixels but the "
                                       f"image is {size[0]}x{size[1]}; draw the mask on the image itself (same size).")
            if image.mode in ("RGBA", "LA"):
                mask = np.asarray(image.getchannel("A")) > 0
            else:
                array = np.asarray(image.convert("RGB") if image.mode not in ("L", "1", "I", "I;16") else image)
                mask = array.reshape(array.shape[0], array.shape[1], -1).max(axis=2) > 0
    except FileNotFoundError:
        raise FetalStudioError(f"The ROI mask {path} does not exist.") from None
    except (UnidentifiedImageError, OSError) as error:
        raise FetalStudioError(f"The ROI mask {path.name} could not be read as PNG ({error}).") from None
    return require_roi(mask, f"the ROI mask {path.name}")


def write_roi(path: Path, mask: np.ndarray) -> Path:
    """Write a ROI as an 8-bit PNG (255 = ROI), atomically."""
    write_png(Path(path), np.where(mask, 255, 0).astype(np.uint8))
    return Path(path)
