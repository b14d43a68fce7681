"""A minimal ultrasound DICOM file for tests, written with pydicom (with a patient name that must not leak)."""

from __future__ import annotations

import numpy as np


def write_ultrasound_dicom(path, pixels: np.ndarray, *, spacing=None, us_delta_cm=None, photometric="MONOCHROME2"):
    """A minimal ultrasound DICOM file written with pydicom (with a patient name that must not leak)."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, UltrasoundMultiFrameImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UltrasoundMultiFrameImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality = "US"
    ds.PatientName = "Doe^Jane"
    ds.PatientID = "SECRET-123"
    frames = pixels if pixels.ndim == 3 else pixels[None]
    ds.NumberOfFrames = len(frames)
    ds.Rows, ds.Columns = frames.shape[1:]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
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
