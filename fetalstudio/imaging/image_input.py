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

Every file's *declared* size is checked before anything is decoded (``max_pixels``): rows x
columns x samples per pixel (x frames, where all frames must be held), from Pillow's lazy
``Image.open`` or the DICOM header, so a decompression bomb (a few hundred KB declaring
30000 x 30000 pixels) is refused in milliseconds instead of taking gigabytes. Images smaller than
``MIN_IMAGE_SIDE_PX`` on a side are refused as well: nothing can be measured on them.
"""

from __future__ import annotations

import os
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from fetalstudio.errors import FetalStudioError

RASTER_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
DICOM_SUFFIXES = (".dcm", ".dicom")
#: DICOM fields copied into ``LoadedImage.details``: technical only, nothing that identifies a person.
TECHNICAL_DICOM_FIELDS = ("Modality", "Rows", "Columns", "NumberOfFrames", "PhotometricInterpretation", "BitsStored")
_CM_UNITS = 3  # PhysicalUnitsXDirection code for centimetres

#: The most pixel values (rows x columns x samples per pixel, x frames where all frames are decoded)
#: any reader decodes. Ultrasound frames are at most a few megapixels (a 4K RGBA screen capture,
#: 3840 x 2160 x 4, is 33 M), while decoding 50 M values costs at most ~0.6 GB here (the float
#: conversion of a 16-bit or colour image), so a bomb declaring 30000 x 30000 (900 M) is refused
#: before it is decoded. Raise it for genuinely larger images: ``set_max_pixels`` (``--max-pixels``)
#: or the environment variable below.
DEFAULT_MAX_PIXELS = 50_000_000
MAX_PIXELS_ENV = "FETALSTUDIO_MAX_PIXELS"
#: The smallest image side analysed: the automatic head box's smallest candidate is 0.15 of the frame
#: and a box needs at least 2 px (segmentation.predictor.MIN_BOX_SIDE_PX), and an ultrasound frame is
#: hundreds of pixels wide, so anything smaller is a wrong file (a 1x1 placeholder, an icon).
MIN_IMAGE_SIDE_PX = 16
#: Deflated DICOM: at most this much of the inflated dataset is read to find its header (the
#: elements before the pixel data; ultrasound headers are a few KB).
DICOM_HEADER_BYTES = 4 * 1024 * 1024
_PIXEL_DATA_TAGS = (0x7FE00008, 0x7FE00009, 0x7FE00010)  # float, double float and integer pixel data
_max_pixels_setting: int | None = None


def parse_max_pixels(value, source: str = "--max-pixels") -> int:
    """``value`` as a pixel limit (a whole number >= 1, underscores allowed); clear error otherwise."""
    try:
        limit = int(str(value).strip())
    except ValueError:
        limit = 0
    if limit < 1:
        raise FetalStudioError(f"{source} is the most pixel values an image may have, a whole number such as "
                               f"{DEFAULT_MAX_PIXELS} (the default); {value!r} is not.")
    return limit


def set_max_pixels(limit: int | None) -> None:
    """Set the pixel limit of every reader in this process (``--max-pixels`` of analyze and app.py);
    None goes back to the environment variable ``FETALSTUDIO_MAX_PIXELS`` or the default."""
    global _max_pixels_setting
    _max_pixels_setting = None if limit is None else parse_max_pixels(limit)


def max_pixels() -> int:
    """The pixel limit: ``set_max_pixels``, else ``$FETALSTUDIO_MAX_PIXELS``, else ``DEFAULT_MAX_PIXELS``."""
    if _max_pixels_setting is not None:
        return _max_pixels_setting
    value = os.environ.get(MAX_PIXELS_ENV, "").strip()
    return parse_max_pixels(value, f"The environment variable {MAX_PIXELS_ENV}") if value else DEFAULT_MAX_PIXELS


def _raise_limit_hint() -> str:
    return (f"If the file is genuine, raise the limit: `--max-pixels N` (analyze, app.py) or the environment variable "
            f"{MAX_PIXELS_ENV}=N.")


def check_declared_size(name: str, rows: int, columns: int, samples: int = 1, frames: int = 1, limit: int | None = None) -> None:
    """Refuse an image by its declared size, before decoding: more values than the pixel limit
    (a decompression bomb, or far larger than an ultrasound frame) or smaller than ``MIN_IMAGE_SIDE_PX``."""
    check_pixel_count(name, rows, columns, samples, frames, limit)
    check_image_side(name, rows, columns)


def check_pixel_count(name: str, rows: int, columns: int, samples: int = 1, frames: int = 1, limit: int | None = None) -> None:
    """Refuse a declared size over the pixel limit (rows x columns x samples x frames)."""
    limit = max_pixels() if limit is None else limit
    values = rows * columns * max(1, samples) * max(1, frames)
    if values > limit:
        shape = f"{columns} x {rows} pixels" + (f" x {samples} samples" if samples > 1 else "") + (f" x {frames} frames" if frames > 1 else "")
        raise FetalStudioError(f"{name} declares {shape} = {values:,} pixel values, more than the limit of {limit:,} "
                               "(a decompression bomb, or far larger than an ultrasound frame); it was not decoded. "
                               + _raise_limit_hint())


def check_image_side(name: str, rows: int, columns: int) -> None:
    """Refuse an image smaller than ``MIN_IMAGE_SIDE_PX`` on a side, with a message instead of a
    degenerate (inverted) automatic box further on."""
    if min(rows, columns) < MIN_IMAGE_SIDE_PX:
        raise FetalStudioError(f"{name} is {columns}x{rows} pixels: too small to analyse (at least {MIN_IMAGE_SIDE_PX}x"
                               f"{MIN_IMAGE_SIDE_PX}; an ultrasound frame is hundreds of pixels wide). Check that this is the right file.")


def check_image_file(path: str | Path, limit: int | None = None) -> None:
    """The pixel limit of ``load_image`` for readers that decode a raster file themselves (e.g.
    OpenCV for colour masks), from the size Pillow reads in the header. Files Pillow cannot identify
    pass (their own reader reports them)."""
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    limit = max_pixels() if limit is None else limit
    _follow_limit_in_pillow(limit)
    try:
        with Image.open(path) as image:
            check_pixel_count(path.name, image.height, image.width, len(image.getbands()), limit=limit)
    except Image.DecompressionBombError as error:
        raise _pillow_bomb(path, error, limit) from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError):
        return


def _follow_limit_in_pillow(limit: int) -> None:
    """Pillow refuses images over twice its own MAX_IMAGE_PIXELS at ``Image.open``: a limit raised
    above it must raise Pillow's too (never lowered: other code may rely on it)."""
    from PIL import Image

    if Image.MAX_IMAGE_PIXELS is not None and Image.MAX_IMAGE_PIXELS < limit:
        Image.MAX_IMAGE_PIXELS = limit


def _pillow_bomb(path: Path, error: Exception, limit: int) -> FetalStudioError:
    return FetalStudioError(f"{path.name} declares far more pixels than the limit of {limit:,} (Pillow: {error}); it was not "
                            "decoded. " + _raise_limit_hint())


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


def load_image(path: str | Path, frame: int = 0, *, pixel_limit: int | None = None) -> LoadedImage:
    """The image at ``path`` as grayscale uint8 (see the module docstring); clear errors otherwise.

    ``pixel_limit``: the pixel limit for this call (default: ``max_pixels()``)."""
    path = Path(path)
    if not path.is_file():
        raise FetalStudioError(f"{path} does not exist (or is a folder). Give an image file.")
    limit = max_pixels() if pixel_limit is None else parse_max_pixels(pixel_limit, "pixel_limit")
    if _is_dicom(path):
        return _load_dicom(path, frame, limit)
    if path.suffix.lower() not in RASTER_SUFFIXES:
        raise FetalStudioError(
            f"{path.name}: unsupported file type {path.suffix or '(none)'}. Supported: {', '.join(supported_suffixes())}."
        )
    return _load_raster(path, limit)


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


def _load_raster(path: Path, limit: int) -> LoadedImage:
    from PIL import Image, UnidentifiedImageError

    _follow_limit_in_pillow(limit)
    try:
        with Image.open(path) as image:  # lazy: reads the header only
            check_declared_size(path.name, image.height, image.width, len(image.getbands()), limit=limit)
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
    except Image.DecompressionBombError as error:
        raise _pillow_bomb(path, error, limit) from None
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


def _load_dicom(path: Path, frame: int, limit: int) -> LoadedImage:
    try:
        from pydicom.errors import InvalidDicomError
        from pydicom.filereader import read_file_meta_info
    except ImportError as error:  # pragma: no cover - pydicom is a requirement
        raise FetalStudioError("Reading DICOM needs pydicom: pip install pydicom.") from error
    meta = None
    try:
        meta = read_file_meta_info(str(path))
        header, pixels, frames = _read_dicom(path, meta, frame, limit)
    except FetalStudioError:
        raise
    except InvalidDicomError as error:
        raise FetalStudioError(f"{path.name} is not a valid DICOM file ({error}).") from error
    except (AttributeError, KeyError) as error:
        raise FetalStudioError(f"{path.name} is a DICOM file without image pixels (e.g. a report or structured data).") from error
    except Exception as error:
        syntax = meta.get("TransferSyntaxUID") if meta is not None else None
        hint = ("Its compression may need an extra pydicom plug-in (pylibjpeg)." if syntax is not None and syntax.is_compressed
                else "The file is truncated or corrupt: re-export or re-copy it.")
        raise FetalStudioError(f"{path.name}: the DICOM pixels cannot be decoded ({type(error).__name__}: {error}). {hint}") from error
    photometric = str(getattr(header, "PhotometricInterpretation", "MONOCHROME2"))
    gray = _luminance(pixels) if pixels.ndim == 3 else to_uint8(pixels)  # YBR is already RGB (pydicom converts it)
    if photometric == "MONOCHROME1":
        gray = 255 - gray
    details = {name: _plain(getattr(header, name)) for name in TECHNICAL_DICOM_FIELDS if hasattr(header, name)}
    return LoadedImage(gray=np.ascontiguousarray(gray), path=path, kind="dicom", pixel_size_mm=_dicom_pixel_size(header),
                       frame=frame, frame_count=frames, bit_depth=int(getattr(header, "BitsStored", 8) or 8), details=details)


def _read_dicom(path: Path, meta, frame: int, limit: int):
    """(header without pixels, the pixels of ``frame``, frame count): the header is read first and the
    declared size checked before any pixel data is read or inflated; only ``frame`` is decoded."""
    from pydicom import dcmread
    from pydicom.pixels import pixel_array
    from pydicom.uid import DeflatedExplicitVRLittleEndian

    if meta.get("TransferSyntaxUID") == DeflatedExplicitVRLittleEndian:
        return _read_deflated_dicom(path, meta, frame, limit)
    header = dcmread(str(path), stop_before_pixels=True, defer_size="1 MB")
    frames = _check_dicom_header(path, header, frame, limit, all_frames=False)
    return header, pixel_array(str(path), index=frame if frames > 1 else None), frames


def _check_dicom_header(path: Path, header, frame: int, limit: int, all_frames: bool) -> int:
    """The frame count, after checking the declared size (one frame, or all when ``all_frames``) and ``frame``."""
    if "Rows" not in header or "Columns" not in header:
        raise FetalStudioError(f"{path.name} is a DICOM file without image pixels (e.g. a report or structured data).")
    rows, columns = int(header.Rows or 0), int(header.Columns or 0)
    frames = int(getattr(header, "NumberOfFrames", 1) or 1)
    samples = int(getattr(header, "SamplesPerPixel", 1) or 1)
    check_declared_size(path.name, rows, columns, samples, frames if all_frames else 1, limit=limit)
    if frames > 1 and not 0 <= frame < frames:
        raise FetalStudioError(f"{path.name} has {frames} frames (0-{frames - 1}); frame {frame} does not exist.")
    if frames == 1 and frame != 0:
        raise FetalStudioError(f"{path.name} has a single frame; frame {frame} does not exist.")
    return frames


def _read_deflated_dicom(path: Path, meta, frame: int, limit: int):
    """A Deflated Explicit VR Little Endian file: the whole dataset is one deflate stream, so it is
    inflated in two bounded steps, the header first (at most DICOM_HEADER_BYTES) and, once its
    declared size passed the check (all frames count: they are all inflated), the rest, never more
    than that size. pydicom itself would inflate everything before looking at the header."""
    from pydicom.filebase import DicomBytesIO
    from pydicom.filereader import read_dataset
    from pydicom.pixels import pixel_array
    from pydicom.uid import ExplicitVRLittleEndian

    start = 128 + 4 + 12 + int(meta.get("FileMetaInformationGroupLength", 0))  # preamble, DICM, (0002,0000), group 2
    prefix, complete = _inflate(path, start, DICOM_HEADER_BYTES)
    reached_pixels = []

    def at_pixels(tag, vr, length) -> bool:
        if tag in _PIXEL_DATA_TAGS:
            reached_pixels.append(True)
        return bool(reached_pixels)

    header = read_dataset(DicomBytesIO(prefix), False, True, stop_when=at_pixels)
    if not complete and not reached_pixels:
        raise FetalStudioError(f"{path.name}: the DICOM header is larger than {DICOM_HEADER_BYTES // 2**20} MB once inflated; "
                               "it was not read. Re-export the file uncompressed.")
    frames = _check_dicom_header(path, header, frame, limit, all_frames=True)
    bits = int(getattr(header, "BitsAllocated", 8) or 8)
    declared = int(header.Rows) * int(header.Columns) * frames * int(getattr(header, "SamplesPerPixel", 1) or 1) * -(-bits // 8)
    body, complete = _inflate(path, start, declared + len(prefix) + 1024)
    if not complete:
        raise FetalStudioError(f"{path.name} inflates to more data than the {declared:,} bytes of pixels it declares; "
                               "it was not decoded. Re-export the file.")
    dataset = read_dataset(DicomBytesIO(body), False, True)
    dataset.file_meta = meta.copy()
    dataset.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian  # the inflated dataset is plain explicit VR LE
    return header, pixel_array(dataset, index=frame if frames > 1 else None), frames


def _inflate(path: Path, offset: int, max_bytes: int) -> tuple[bytes, bool]:
    """The raw deflate stream of ``path`` from ``offset``, inflated to at most ``max_bytes``, and
    whether that is all of it (the stream ended, or the file did: a truncated file is for pydicom to report)."""
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    out = bytearray()
    with path.open("rb") as handle:
        handle.seek(offset)
        pending = b""
        while not inflater.eof and len(out) < max_bytes:
            if not pending:
                pending = handle.read(1 << 20)
                if not pending:
                    return bytes(out), True
            out += inflater.decompress(pending, max_bytes - len(out))
            pending = inflater.unconsumed_tail
    return bytes(out), inflater.eof


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
