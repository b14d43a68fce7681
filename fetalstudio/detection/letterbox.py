"""The detector's square input: the grayscale image scaled so its longer side fills the square
(OpenCV ``INTER_AREA``) and centred on a black canvas; and back to image pixels."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fetalstudio.errors import FetalStudioError


@dataclass(frozen=True)
class Letterbox:
    """How image pixels map to input pixels: ``input = image * scale + pad`` per axis."""

    scale_x: float
    scale_y: float
    pad_x: int
    pad_y: int
    size: int

    def to_input(self, x0: float, y0: float, x1: float, y1: float) -> tuple[float, float, float, float]:
        return (x0 * self.scale_x + self.pad_x, y0 * self.scale_y + self.pad_y,
                x1 * self.scale_x + self.pad_x, y1 * self.scale_y + self.pad_y)

    def to_image(self, x0: float, y0: float, x1: float, y1: float) -> tuple[float, float, float, float]:
        return ((x0 - self.pad_x) / self.scale_x, (y0 - self.pad_y) / self.scale_y,
                (x1 - self.pad_x) / self.scale_x, (y1 - self.pad_y) / self.scale_y)


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
    scale = size / max(width, height)
    new_width, new_height = max(1, round(width * scale)), max(1, round(height * scale))
    resized = cv2.resize(gray, (new_width, new_height), interpolation=cv2.INTER_AREA)
    box = Letterbox(new_width / width, new_height / height, (size - new_width) // 2, (size - new_height) // 2, size)
    return resized, box


def pad_square(resized: np.ndarray, box: Letterbox) -> np.ndarray:
    square = np.zeros((box.size, box.size), dtype=np.uint8)
    height, width = resized.shape
    square[box.pad_y:box.pad_y + height, box.pad_x:box.pad_x + width] = resized
    return square


def letterbox(gray: np.ndarray, size: int) -> tuple[np.ndarray, Letterbox]:
    resized, box = fit_image(gray, size)
    return pad_square(resized, box), box
