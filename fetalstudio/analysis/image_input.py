"""Any supported image file -> one grayscale uint8 array in the file's own pixel grid.

Coordinates (boxes, masks, ellipses) always refer to these original pixels; models get a
downscaled copy (``model_view``) and their outputs are mapped back by the returned scale.

- Raster files (PNG, JPEG, BMP, TIFF) through Pillow: 8-bit as is; 16-bit (and 32-bit integer)
  images are scaled by their own maximum to 0..255 (ultrasound exports often use 10-12 of the 16
  bits, so dividing by 65535 would give a black image); RGBA is composited over black first
  (transparent margins are no-signal); colour becomes luminance.
- DICOM (``.dcm`` or any file with the DICM preamble) through pydicom: one frame of a multi-frame
  cine loop (``frame``), MONOCHROME1 inverted, colour converted to luminance, and the pixel size in
  mm from ``PixelSpacing`` or, as ultrasound stores it, the first calibrated region of
  ``SequenceOfUltrasoundRegions`` (PhysicalDeltaX in cm). Patient and study fields are never read
  into the result; only technical ones (modality, size, frames, photometric interpretation).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from fetalstudio.errors import FetalStudioError

RASTER_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
DICOM_SUFFIXES = (".dcm", ".dicom")
#: DICOM fields copied into ``LoadedImage.details``: technical only, nothing that identifies a person.
TECHNICAL_DICOM_FIELDS = ("Modality", "Rows", "Columns", "NumberOfFrames", "PhotometricInterpretation", "BitsStored")
_CM_UNITS = 3  # PhysicalUnitsXDirection code for centimetres


@dataclass(frozen=True)
class LoadedImage:
    gray: np.ndarray  # uint8, rows x columns, the file's own pixel grid
    path: Path
    kind: str  # "raster" or "dicom"
    pixel_size_mm: float | None = None
    frame: int = 0
    frame_count: int = 1
    bit_depth: int = 8
    details: dict = field(default_factory=dict)

    @property
    def size(self) -> tuple[int, int]:
        """(width, height) in pixels."""
        return self.gray.shape[1], self.gray.shape[0]


def supported_suffixes() -> tuple[str, ...]:
    return RASTER_SUFFIXES + DICOM_SUFFIXES


def _is_dicom(path: Path) -> bool:
    if path.suffix.lower() in DICOM_SUFFIXES:
        return True
    try:
        with path.open("rb") as handle:
            handle.seek(128)
            return handle.read(4) == b"DICM"
    except OSError:
        return False


def load_image(path: str | Path, frame: int = 0) -> LoadedImage:
    """The image at ``path`` as grayscale uint8 (see the module docstring); clear errors otherwise."""
    path = Path(path)
    if not path.is_file():
        raise FetalStudioError(f"{path} does not exist (or is a folder). Give an image file.")
    if _is_dicom(path):
        return _load_dicom(path, frame)
    if path.suffix.lower() not in RASTER_SUFFIXES:
        raise FetalStudioError(
            f"{path.name}: unsupported file type {path.suffix or '(none)'}. Supported: {', '.join(supported_suffixes())}."
        )
    return _load_raster(path)


def to_uint8(array: np.ndarray) -> np.ndarray:
    """Integer or float pixels -> uint8: 8-bit kept, wider ranges scaled by their own maximum."""
    array = np.asarray(array)
    if array.dtype == np.uint8:
        return array
    if array.dtype == bool:
        return array.astype(np.uint8) * 255
    values = array.astype(np.float64)
    if np.issubdtype(array.dtype, np.floating) and values.size and 0 <= values.min() and values.max() <= 1:
        return np.clip(values * 255 + 0.5, 0, 255).astype(np.uint8)
    low = min(0.0, float(values.min())) if values.size else 0.0
    peak = float(values.max()) - low if values.size else 0.0
    if peak <= 0:
        return np.zeros(array.shape, np.uint8)
    scale = 255.0 / peak if peak > 255 or low < 0 else 1.0
    return np.clip((values - low) * scale + 0.5, 0, 255).astype(np.uint8)


def _luminance(rgb: np.ndarray) -> np.ndarray:
    """ITU-R BT.601 luma of an RGB(A) array, as uint8 (wider-than-8-bit colour scaled like gray)."""
    luma = rgb[..., :3].astype(np.float64) @ np.array([0.299, 0.587, 0.114])
    if rgb.dtype == np.uint8:
        return np.clip(luma + 0.5, 0, 255).astype(np.uint8)
    return to_uint8(luma)


def _load_raster(path: Path) -> LoadedImage:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            image.load()
            mode = image.mode
            if mode in ("RGBA", "LA", "PA") or (mode == "P" and "transparency" in image.info):
                rgba = image.convert("RGBA")
                black = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
                array = np.asarray(Image.alpha_composite(black, rgba).convert("RGB"))
            elif mode in ("RGB", "P", "CMYK", "YCbCr"):
                array = np.asarray(image.convert("RGB"))
            else:  # L, 1, I;16*, I, F
                array = np.asarray(image)
    except UnidentifiedImageError as error:
        raise FetalStudioError(f"{path.name} is not an image Pillow can read (is it really {path.suffix}?). Re-export it as PNG.") from error
    except (OSError, SyntaxError, ValueError) as error:
        raise FetalStudioError(f"{path.name} is truncated or corrupt ({error}). Re-export or re-copy the file.") from error
    bit_depth = 16 if array.dtype in (np.uint16, np.int32) and array.size and array.max() > 255 else 8
    gray = _luminance(array) if array.ndim == 3 else to_uint8(array)
    return LoadedImage(gray=np.ascontiguousarray(gray), path=path, kind="raster", bit_depth=bit_depth, details={"mode": mode})


def _dicom_pixel_size(dataset) -> float | None:
    spacing = getattr(dataset, "PixelSpacing", None)
    if spacing is not None and len(spacing) >= 2 and float(spacing[0]) > 0:
        return float(spacing[1])  # PixelSpacing is (row, column) spacing; columns run along x
    for region in getattr(dataset, "SequenceOfUltrasoundRegions", None) or []:
        delta = getattr(region, "PhysicalDeltaX", None)
        if delta is not None and float(delta) > 0 and int(getattr(region, "PhysicalUnitsXDirection", 0)) == _CM_UNITS:
            return float(delta) * 10.0
    return None


def _load_dicom(path: Path, frame: int) -> LoadedImage:
    try:
        import pydicom
        from pydicom.errors import InvalidDicomError
    except ImportError as error:  # pragma: no cover - pydicom is a requirement
        raise FetalStudioError("Reading DICOM needs pydicom: pip install pydicom.") from error
    try:
        dataset = pydicom.dcmread(str(path))
        pixels = dataset.pixel_array
    except InvalidDicomError as error:
        raise FetalStudioError(f"{path.name} is not a valid DICOM file ({error}).") from error
    except (AttributeError, KeyError) as error:
        raise FetalStudioError(f"{path.name} is a DICOM file without image pixels (e.g. a report or structured data).") from error
    except Exception as error:
        raise FetalStudioError(f"{path.name}: the DICOM pixels cannot be decoded ({type(error).__name__}: {error}). "
                               "Compressed transfer syntaxes may need extra pydicom plug-ins (pylibjpeg).") from error
    frames = int(getattr(dataset, "NumberOfFrames", 1) or 1)
    photometric = str(getattr(dataset, "PhotometricInterpretation", "MONOCHROME2"))
    if frames > 1:
        if not 0 <= frame < frames:
            raise FetalStudioError(f"{path.name} has {frames} frames (0-{frames - 1}); frame {frame} does not exist.")
        pixels = pixels[frame]
    elif frame != 0:
        raise FetalStudioError(f"{path.name} has a single frame; frame {frame} does not exist.")
    if photometric.startswith("YBR"):
        from pydicom.pixels import convert_color_space

        pixels = convert_color_space(pixels, photometric, "RGB")
    gray = _luminance(pixels) if pixels.ndim == 3 else to_uint8(pixels)
    if photometric == "MONOCHROME1":
        gray = 255 - gray
    details = {name: _plain(getattr(dataset, name)) for name in TECHNICAL_DICOM_FIELDS if hasattr(dataset, name)}
    return LoadedImage(gray=np.ascontiguousarray(gray), path=path, kind="dicom", pixel_size_mm=_dicom_pixel_size(dataset),
                       frame=frame, frame_count=frames, bit_depth=int(getattr(dataset, "BitsStored", 8) or 8), details=details)


def _plain(value):
    return value if isinstance(value, (int, float, str)) else str(value)


def model_view(gray: np.ndarray, max_side: int) -> tuple[np.ndarray, float]:
    """A copy no longer than ``max_side`` on its longest side (area-averaged), and the factor that maps
    its coordinates back to the original pixels (original = view * factor). Small images are kept."""
    import cv2

    rows, cols = gray.shape[:2]
    longest = max(rows, cols)
    if longest <= max_side:
        return gray, 1.0
    factor = longest / max_side
    size = (max(1, round(cols / factor)), max(1, round(rows / factor)))
    return cv2.resize(gray, size, interpolation=cv2.INTER_AREA), factor
