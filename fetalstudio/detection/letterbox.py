"""The detector's square input: the grayscale image scaled so its longer side fills the square
(OpenCV ``INTER_AREA``, what the detector was trained on) and centred on a black canvas; and back to
image pixels. The geometry (fitted size, offsets) is the shared ``fetalstudio.imaging.letterbox``."""

from __future__ import annotations

import numpy as np

from fetalstudio.errors import FetalStudioError
from fetalstudio.imaging.letterbox import Letterbox, letterbox_geometry

__all__ = ["Letterbox", "as_gray", "fit_image", "letterbox", "pad_square"]


def as_gray(image) -> np.ndarray:
    """A PIL image or an array (H x W, H x W x 3/4, uint8) as an H x W uint8 grayscale array."""
    import cv2

    if hasattr(image, "convert"):
        return np.asarray(image.convert("L"))
    array = np.asarray(image)
    if array.dtype != np.uint8:
        raise FetalStudioError(f"the detector takes 8-bit images (uint8), not {array.dtype}; convert the image first.")
    if array.ndim == 3 and array.shape[2] in (3, 4):
        return cv2.cvtColor(array[..., :3], cv2.COLOR_RGB2GRAY)
    if array.ndim == 3 and array.shape[2] == 1:
        return array[..., 0]
    if array.ndim != 2 or min(array.shape) < 1:
        raise FetalStudioError(f"the detector takes a grayscale or RGB image, not an array of shape {array.shape}.")
    return array


def fit_image(gray: np.ndarray, size: int) -> tuple[np.ndarray, Letterbox]:
    """The image scaled (aspect kept) to fit ``size`` x ``size``, unpadded, and its letterbox."""
    import cv2

    height, width = gray.shape
    box = letterbox_geometry(width, height, size)
    resized = cv2.resize(gray, (box.fitted_width, box.fitted_height), interpolation=cv2.INTER_AREA)
    return resized, box


def pad_square(resized: np.ndarray, box: Letterbox) -> np.ndarray:
    square = np.zeros((box.size, box.size), dtype=np.uint8)
    height, width = resized.shape
    square[box.pad_y:box.pad_y + height, box.pad_x:box.pad_x + width] = resized
    return square


def letterbox(gray: np.ndarray, size: int) -> tuple[np.ndarray, Letterbox]:
    resized, box = fit_image(gray, size)
    return pad_square(resized, box), box
