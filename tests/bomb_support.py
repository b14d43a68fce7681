"""Raster decompression bombs for tests, small on disk: PNG and TIFF files whose deflate streams
really hold ``width x height`` zero pixels (streamed, so writing one never holds more than a few MB),
and files that only declare a huge size in their header (PNG, JPEG, BMP, TIFF). The DICOM bomb is
``dicom_support.write_deflated_dicom_bomb``."""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

_ROWS_PER_CHUNK = 1024


def _zeros_deflated(rows: int, row_bytes: int, raw: bool = False) -> bytes:
    """A deflate stream (zlib-wrapped, or raw) of ``rows`` x ``row_bytes`` zero bytes."""
    compressor = zlib.compressobj(6, zlib.DEFLATED, -zlib.MAX_WBITS if raw else zlib.MAX_WBITS)
    chunk = bytes(row_bytes * _ROWS_PER_CHUNK)
    out = io.BytesIO()
    left = rows
    while left:
        step = min(left, _ROWS_PER_CHUNK)
        out.write(compressor.compress(chunk[: step * row_bytes]))
        left -= step
    out.write(compressor.flush())
    return out.getvalue()


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def write_png_bomb(path: Path, width: int, height: int, data: bool = True) -> Path:
    """An 8-bit grayscale PNG declaring ``width x height``; with ``data`` its IDAT really inflates to
    that many (zero) pixels, without it the file is only the header (a huge IHDR)."""
    header = _png_chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
    idat = _zeros_deflated(height, width + 1) if data else zlib.compress(b"\0" * 64)  # each row: filter byte + pixels
    Path(path).write_bytes(b"\x89PNG\r\n\x1a\n" + header + _png_chunk(b"IDAT", idat) + _png_chunk(b"IEND", b""))
    return Path(path)


def write_tiff_bomb(path: Path, width: int, height: int, data: bool = True) -> Path:
    """An 8-bit grayscale little-endian TIFF declaring ``width x height`` in one strip; with ``data``
    the strip is Adobe-deflate compressed zeros that really inflate to that size, without it the
    strip is 16 bytes (the file only declares the size)."""
    strip = _zeros_deflated(height, width) if data else bytes(16)
    entries = [  # tag, type (3 SHORT, 4 LONG), value
        (256, 4, width), (257, 4, height), (258, 3, 8), (259, 3, 8 if data else 1), (262, 3, 1),
        (273, 4, 0), (277, 3, 1), (278, 4, height), (279, 4, len(strip)),
    ]
    ifd_size = 2 + 12 * len(entries) + 4
    strip_offset = 8 + ifd_size
    entries = [(tag, kind, strip_offset if tag == 273 else value) for tag, kind, value in entries]
    ifd = struct.pack("<H", len(entries)) + b"".join(
        struct.pack("<HHI", tag, kind, 1) + (struct.pack("<HH", value, 0) if kind == 3 else struct.pack("<I", value))
        for tag, kind, value in entries) + struct.pack("<I", 0)
    Path(path).write_bytes(b"II*\0" + struct.pack("<I", 8) + ifd + strip)
    return Path(path)


def write_huge_jpeg_header(path: Path, width: int = 60000, height: int = 60000) -> Path:
    """A real small JPEG whose frame header (SOF0) is patched to declare ``width x height``."""
    buffer = io.BytesIO()
    Image.fromarray(np.full((32, 32), 128, np.uint8)).save(buffer, "JPEG")
    data = bytearray(buffer.getvalue())
    sof = data.index(b"\xff\xc0")
    data[sof + 5:sof + 9] = struct.pack(">HH", height, width)
    Path(path).write_bytes(bytes(data))
    return Path(path)


def write_huge_bmp_header(path: Path, width: int = 60000, height: int = 60000) -> Path:
    """A real small 8-bit BMP whose header is patched to declare ``width x height``."""
    buffer = io.BytesIO()
    Image.fromarray(np.full((32, 32), 128, np.uint8)).save(buffer, "BMP")
    data = bytearray(buffer.getvalue())
    data[18:26] = struct.pack("<ii", width, height)
    Path(path).write_bytes(bytes(data))
    return Path(path)
