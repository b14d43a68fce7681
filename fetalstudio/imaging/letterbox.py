"""Letterboxing: an image scaled (aspect kept) so its longer side fills a square, centred on black.

One geometry for every square model input: the layout ControlNet's training images
(``fetalstudio.training.controlnet``), the anatomy engine's runs (``fetalstudio.anatomy.flex``) and the
structure detector (``fetalstudio.detection.letterbox``). The fitted size is Pillow's
``ImageOps.contain`` (the shorter side rounded from the aspect ratio), the offset ``(size - fitted) // 2``,
so an image letterboxed here and a box mapped with :meth:`Letterbox.to_input` land on the same pixels.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps

from fetalstudio.errors import FetalStudioError


@dataclass(frozen=True)
class Letterbox:
    """Where an ``image_width`` x ``image_height`` image sits in a ``size`` x ``size`` square:
    scaled to ``fitted_width`` x ``fitted_height`` and placed at (``pad_x``, ``pad_y``)."""

    image_width: int
    image_height: int
    fitted_width: int
    fitted_height: int
    pad_x: int
    pad_y: int
    size: int

    @property
    def scale_x(self) -> float:
        return self.fitted_width / self.image_width

    @property
    def scale_y(self) -> float:
        return self.fitted_height / self.image_height

    @property
    def window(self) -> tuple[int, int, int, int]:
        """The image's part of the square as a PIL crop box (left, top, right, bottom)."""
        return self.pad_x, self.pad_y, self.pad_x + self.fitted_width, self.pad_y + self.fitted_height

    def to_input(self, x0: float, y0: float, x1: float, y1: float) -> tuple[float, float, float, float]:
        """A box in image pixels -> square pixels."""
        return (x0 * self.scale_x + self.pad_x, y0 * self.scale_y + self.pad_y,
                x1 * self.scale_x + self.pad_x, y1 * self.scale_y + self.pad_y)

    def to_image(self, x0: float, y0: float, x1: float, y1: float) -> tuple[float, float, float, float]:
        """A box in square pixels -> image pixels."""
        return ((x0 - self.pad_x) / self.scale_x, (y0 - self.pad_y) / self.scale_y,
                (x1 - self.pad_x) / self.scale_x, (y1 - self.pad_y) / self.scale_y)

    def to_dict(self) -> dict[str, int]:
        return {"image_width": self.image_width, "image_height": self.image_height, "fitted_width": self.fitted_width,
                "fitted_height": self.fitted_height, "pad_x": self.pad_x, "pad_y": self.pad_y, "size": self.size}


def letterbox_geometry(width: int, height: int, size: int) -> Letterbox:
    """The letterbox of a ``width`` x ``height`` image in a ``size`` square (``ImageOps.contain``'s rounding)."""
    if width < 1 or height < 1 or size < 1:
        raise FetalStudioError(f"Cannot letterbox a {width}x{height} image into a {size} px square; sizes must be positive.")
    fitted_width, fitted_height = size, size
    if width > height:
        fitted_height = max(1, round(height / width * size))
    elif height > width:
        fitted_width = max(1, round(width / height * size))
    return Letterbox(width, height, fitted_width, fitted_height, (size - fitted_width) // 2, (size - fitted_height) // 2, size)


def letterbox_image(image: Image.Image, size: int, resample: Image.Resampling = Image.Resampling.LANCZOS
                    ) -> tuple[Image.Image, Letterbox]:
    """``image`` (any mode) fitted into a ``size`` square with ``ImageOps.contain``, centred on black."""
    box = letterbox_geometry(image.width, image.height, size)
    fitted = ImageOps.contain(image, (size, size), method=resample)
    if fitted.size != (box.fitted_width, box.fitted_height):  # only for a side that rounds to 0 px
        fitted = image.resize((box.fitted_width, box.fitted_height), resample)
    canvas = Image.new(image.mode, (size, size), 0)
    canvas.paste(fitted, (box.pad_x, box.pad_y))
    return canvas, box


def letterbox_mask(mask: np.ndarray, size: int) -> tuple[np.ndarray, Letterbox]:
    """A boolean (H, W) mask in the square: a square pixel is set when any part of it was (area
    resampling), so the square mask covers every marked image pixel; the bars are unset."""
    import cv2

    height, width = mask.shape
    box = letterbox_geometry(width, height, size)
    fitted = cv2.resize(mask.astype(np.float32), (box.fitted_width, box.fitted_height), interpolation=cv2.INTER_AREA) > 0
    square = np.zeros((size, size), bool)
    square[box.pad_y:box.pad_y + box.fitted_height, box.pad_x:box.pad_x + box.fitted_width] = fitted
    return square, box


def unletterbox_image(square: Image.Image, box: Letterbox,
                      resample: Image.Resampling = Image.Resampling.LANCZOS) -> Image.Image:
    """The image's part of a square (``box.window``) at the image's own size."""
    if square.size != (box.size, box.size):
        raise FetalStudioError(f"Expected a {box.size} px square, got {square.width}x{square.height}.")
    return square.crop(box.window).resize((box.image_width, box.image_height), resample)
