"""A minimal ultrasound DICOM file for tests, written with pydicom (with a patient name that must not leak)."""

from __future__ import annotations

import numpy as np


def write_ultrasound_dicom(path, pixels: np.ndarray, *, spacing=None, us_delta_cm=None, photometric="MONOCHROME2",
                           deflated: bool = False):
    """A minimal ultrasound DICOM file written with pydicom (with a patient name that must not leak);
    ``pixels`` rows x columns (x 3 for colour), or frames x rows x columns for a cine loop;
    ``deflated``: the Deflated Explicit VR Little Endian transfer syntax."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian, UltrasoundMultiFrameImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UltrasoundMultiFrameImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian if deflated else ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality = "US"
    ds.PatientName = "Doe^Jane"
    ds.PatientID = "SECRET-123"
    colour = photometric in ("RGB", "YBR_FULL")
    frames = pixels[None] if pixels.ndim == 2 or colour and pixels.ndim == 3 else pixels
    ds.NumberOfFrames = len(frames)
    ds.Rows, ds.Columns = frames.shape[1:3]
    ds.SamplesPerPixel = 3 if colour else 1
    ds.PhotometricInterpretation = photometric
    if colour:
        ds.PlanarConfiguration = 0
    ds.BitsAllocated = ds.BitsStored = 8 * pixels.dtype.itemsize
    ds.HighBit = ds.BitsStored - 1
    ds.PixelRepresentation = 0
    ds.PixelData = frames.tobytes()
    if spacing is not None:
        ds.PixelSpacing = [spacing, spacing]
    if us_delta_cm is not None:
        region = Dataset()
        region.PhysicalUnitsXDirection = 3
        region.PhysicalUnitsYDirection = 3
        region.PhysicalDeltaX = us_delta_cm
        region.PhysicalDeltaY = us_delta_cm
        ds.SequenceOfUltrasoundRegions = [region]
    ds.save_as(str(path), enforce_file_format=True)
    return path


#: Deflate compresses a run of zero bytes about 1000:1, so a bomb of 900 M pixels is < 1 MB on disk.
_ZERO_CHUNK = 16 * 1024 * 1024


def write_deflated_dicom_bomb(path, rows: int = 30000, columns: int = 30000, frames: int = 1, samples: int = 1):
    """A Deflated Explicit VR Little Endian DICOM whose (all-zero) pixel data really holds
    ``frames x rows x columns x samples`` bytes once inflated, streamed so that writing it never
    holds more than a few MB: 30000 x 30000 is ~0.9 GB inflated and ~0.9 MB on disk (the
    decompression bomb of issue 11)."""
    import struct
    import zlib

    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_dataset, write_file_meta_info
    from pydicom.uid import DeflatedExplicitVRLittleEndian, UltrasoundMultiFrameImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UltrasoundMultiFrameImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    ds = Dataset()
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality = "US"
    ds.NumberOfFrames = frames
    ds.Rows, ds.Columns = rows, columns
    ds.SamplesPerPixel = samples
    ds.PhotometricInterpretation = "MONOCHROME2" if samples == 1 else "RGB"
    if samples > 1:
        ds.PlanarConfiguration = 0
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    header = DicomBytesIO()
    header.is_little_endian, header.is_implicit_VR = True, False
    write_dataset(header, ds)
    size = frames * rows * columns * samples
    size += size % 2  # DICOM values have an even length
    body = header.getvalue() + struct.pack("<HH2sHI", 0x7FE0, 0x0010, b"OB", 0, size)
    meta_bytes = DicomBytesIO()
    meta_bytes.is_little_endian, meta_bytes.is_implicit_VR = True, False
    write_file_meta_info(meta_bytes, meta, enforce_standard=True)
    deflate = zlib.compressobj(6, zlib.DEFLATED, -zlib.MAX_WBITS)
    zeros = bytes(_ZERO_CHUNK)
    with open(path, "wb") as handle:
        handle.write(b"\0" * 128 + b"DICM" + meta_bytes.getvalue())
        handle.write(deflate.compress(body))
        left = size
        while left:
            step = min(left, _ZERO_CHUNK)
            handle.write(deflate.compress(zeros[:step]))
            left -= step
        handle.write(deflate.flush())
    return path
