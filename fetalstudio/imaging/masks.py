"""Binary masks, the pictures drawn from them, and masks coming back from a browser editor.

``binary_mask`` accepts a mask only when it is exactly binary and of its image's size.
``overlay`` draws the filled mask (translucent) and the ellipse outline over the grayscale image.
``apply_editor_strokes`` turns the strokes painted in a browser editor into the corrected binary
mask and refuses anything that is not the image's size or not lossless: Gradio's ImageEditor
defaults to WebP and to its own canvas size, and a resampled or lossy mask must never be saved.

The editor gets the image with the current mask tinted as its *background* and returns only the
new strokes (Gradio's editor does not hand back layers it was given), so the strokes are applied
to the stored mask here: one colour adds, another removes.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from fetalstudio.errors import FetalStudioError
from fetalstudio.imaging.ellipse import Ellipse

MASK_COLOUR = (255, 64, 64)
ELLIPSE_COLOUR = (255, 215, 0)
#: The current mask's tint in the brush editor's background: the image stays visible under it.
EDITOR_MASK_OPACITY = 0.35
#: Brush colours: paint with ADD to extend the mask, with REMOVE to cut it away.
ADD_COLOUR, REMOVE_COLOUR = "#ff3030", "#2080ff"
LOSSLESS_SUFFIXES = (".png",)


def size_text(shape: tuple[int, ...]) -> str:
    """'<columns>x<rows>' of a 2-D shape, the shape itself otherwise (for messages)."""
    return f"{shape[1]}x{shape[0]}" if len(shape) == 2 else f"shape {shape}"


def binary_mask(mask: np.ndarray, shape: tuple[int, int], what: str = "mask") -> np.ndarray:
    """``mask`` (bool, 0/1 or 0/255, any numeric dtype) as a uint8 0/255 array of ``shape``.

    Anything else is refused rather than thresholded: a browser editor that resamples or saves
    lossily (JPEG, anti-aliased brush edges) would otherwise change a mask without anyone noticing.
    """
    array = np.asarray(mask)
    if array.shape != tuple(shape):
        raise FetalStudioError(
            f"The {what} is {size_text(array.shape)} pixels but its image is {size_text(tuple(shape))}: a mask must have "
            "exactly the image's size (was it resized by the editor?)."
        )
    if array.dtype == bool:
        return array.astype(np.uint8) * 255
    if not (np.issubdtype(array.dtype, np.integer) or np.issubdtype(array.dtype, np.floating)):
        raise FetalStudioError(f"The {what} must be a boolean or numeric array, not {array.dtype}.")
    zero = array == 0
    if not (zero | (array == 1)).all() and not (zero | (array == 255)).all():
        values = np.unique(array)
        shown = ", ".join(f"{v:g}" for v in values[:6]) + (", ..." if len(values) > 6 else "")
        raise FetalStudioError(
            f"The {what} is not binary: it has {len(values)} distinct values ({shown}); a mask must hold only 0/1 or 0/255. "
            "An editor that resamples, blurs brush edges or saves lossily (JPEG) makes such values; threshold it (e.g. mask > 127) first."
        )
    return (~zero).astype(np.uint8) * 255


def overlay(gray: np.ndarray, mask: np.ndarray | None, ellipse: Ellipse | None, *, opacity: float = 0.4,
            show_mask: bool = True, show_ellipse: bool = True) -> np.ndarray:
    """RGB uint8: the image, the mask blended in at ``opacity`` and the ellipse outline."""
    picture = cv2.cvtColor(np.asarray(gray, np.uint8), cv2.COLOR_GRAY2RGB)
    if show_mask and mask is not None and mask.any():
        alpha = float(np.clip(opacity, 0.0, 1.0))
        tinted = cv2.addWeighted(picture, 1 - alpha, np.full_like(picture, MASK_COLOUR), alpha, 0)
        cv2.copyTo(tinted, np.asarray(mask, np.uint8), picture)
    if show_ellipse and ellipse is not None:
        thickness = max(1, round(max(gray.shape) / 300))
        center = (int(round(ellipse.center_x * 16)), int(round(ellipse.center_y * 16)))
        axes = (int(round(ellipse.axis_a * 16)), int(round(ellipse.axis_b * 16)))
        cv2.ellipse(picture, center, axes, ellipse.angle_deg, 0, 360, ELLIPSE_COLOUR, thickness, cv2.LINE_AA, 4)
    return picture


def editor_background(gray: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
    """The brush editor's background: the image with the current mask tinted, so strokes are placed against it."""
    return overlay(gray, mask, None, opacity=EDITOR_MASK_OPACITY, show_ellipse=False)


def _stroke_layer(layer: str | Path | np.ndarray) -> np.ndarray:
    if isinstance(layer, (str, Path)):
        path = Path(layer)
        if path.suffix.lower() not in LOSSLESS_SUFFIXES:
            raise FetalStudioError(
                f"The painted strokes came back as {path.suffix or 'an unknown format'}, not PNG: a lossy format would "
                "blur the mask edges. Nothing was saved; reload the item and paint again."
            )
        from PIL import Image

        with Image.open(path) as image:
            return np.asarray(image.convert("RGBA"))
    array = np.asarray(layer)
    if array.ndim == 3 and array.shape[2] == 3:  # no alpha: paint is any non-black pixel
        alpha = (array.max(axis=2) > 0).astype(np.uint8) * 255
        array = np.dstack([array, alpha])
    return array


def apply_editor_strokes(current: np.ndarray | None, layers: list, image_shape: tuple[int, int]) -> np.ndarray:
    """The mask after the strokes of the brush editor: ADD-coloured paint joins the mask, REMOVE-coloured paint
    cuts it away (the editor's eraser only takes back strokes). Every layer must be a lossless image of exactly
    the image's size — Gradio's editor can resample to its own canvas or use WebP, which must never be saved."""
    rows, cols = image_shape[:2]
    mask = np.zeros((rows, cols), bool) if current is None else np.asarray(current, bool).copy()
    for layer in layers:
        strokes = _stroke_layer(layer)
        if strokes.ndim != 3 or strokes.shape[:2] != (rows, cols):
            got = f"{strokes.shape[1]}x{strokes.shape[0]}" if strokes.ndim >= 2 else str(strokes.shape)
            raise FetalStudioError(
                f"The painted strokes are {got} pixels but the image is {cols}x{rows}: the editor resampled them. "
                "Nothing was saved; reload the item and paint again."
            )
        painted = strokes[..., 3] > 0
        red, blue = strokes[..., 0].astype(np.int16), strokes[..., 2].astype(np.int16)
        mask[painted & (red >= blue)] = True
        mask[painted & (blue > red)] = False
    return mask
