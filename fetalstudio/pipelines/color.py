"""Grayscale output for ultrasound generators.

Ultrasound is grayscale, but an SD decoder returns RGB: a small VAE that also learned a colour mask
channel (the bundled fetalstudio-tiny) leaves coloured specks and casts on grey images, and SD 1.5
tints faintly. A model declares itself grayscale with ``output = "grayscale"`` in its
checkpoints/manifest.toml entry; the user can force either way (``GenerationSettings.color``).

Image+mask pairs keep their mask: when a mask channel is known (the active image+mask LoRA records
it, or the caller names it) only the two image channels are made grey — both set to their rounded
mean, exactly the grey image ``mask_injection.unpack`` reads — and the mask channel stays as
generated. Without a mask channel the image becomes a one-channel ("L") image by Pillow's ITU-R
601-2 luma transform.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from fetalstudio.errors import FetalStudioError
from fetalstudio.models.entries import ModelEntry

GRAYSCALE = "grayscale"
RGB = "rgb"
AUTO = "auto"
#: The manifest key a generator declares its output colour with.
MANIFEST_KEY = "output"
#: Recorded in the PNG metadata, so a reproduction converts the same way.
LUMA_CONVERSION = "Pillow Image.convert('L'): ITU-R 601-2 luma, L = R*299/1000 + G*587/1000 + B*114/1000"
IMAGE_CHANNELS_CONVERSION = "image channels set to their rounded mean (mask channel kept)"


def declared_color(entry: ModelEntry) -> str:
    """The output colour a model's manifest entry declares; RGB (the decoder's pixels) when it says nothing."""
    value = str(entry.details.get(MANIFEST_KEY, RGB)).strip().lower()
    if value not in (GRAYSCALE, RGB):
        raise FetalStudioError(
            f"Model '{entry.id}' declares output = {value!r} in checkpoints/manifest.toml; "
            f"write output = \"{GRAYSCALE}\" or \"{RGB}\"."
        )
    return value


def resolve_color(requested: str, entry: ModelEntry) -> str:
    """"grayscale" or "rgb": the user's choice, or for "auto" the model's declaration."""
    if requested not in (AUTO, GRAYSCALE, RGB):
        raise FetalStudioError(f"Unknown output colour {requested!r}: choose {AUTO}, {GRAYSCALE} or {RGB}.")
    return declared_color(entry) if requested == AUTO else requested


def conversion_name(color: str, mask_channel: int | None) -> str | None:
    if color != GRAYSCALE:
        return None
    return LUMA_CONVERSION if mask_channel is None else IMAGE_CHANNELS_CONVERSION


def to_grayscale(image: Image.Image, mask_channel: int | None = None) -> Image.Image:
    """The image in grey: an "L" image, or with ``mask_channel`` an RGB image whose two other channels are equal."""
    if mask_channel is None:
        return image.convert("L")
    rgb = np.asarray(image.convert("RGB")).copy()
    first, second = (c for c in range(3) if c != mask_channel)
    gray = ((rgb[..., first].astype(np.uint16) + rgb[..., second] + 1) // 2).astype(np.uint8)
    rgb[..., first] = gray
    rgb[..., second] = gray
    return Image.fromarray(rgb, "RGB")
