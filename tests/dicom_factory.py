"""Build small, valid DICOM Part 10 CT slices in memory for tests (uncompressed, Explicit VR Little Endian)."""

from __future__ import annotations

import io

import numpy as np
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid


def make_ct_dicom(hu: np.ndarray, slope: float = 1.0, intercept: float = -1024.0, photometric: str = "MONOCHROME2",
                  with_pixels: bool = True, padding_hu: float | None = None) -> bytes:
    """A single-frame CT Image Storage file whose pixels rescale back to `hu` (stored = round((hu - b) / m)).
    `padding_hu`: the HU value marked as Pixel Padding Value (outside the scanned field)."""
    hu = np.asarray(hu, dtype=np.float64)
    if hu.ndim != 2:
        raise ValueError(f"hu must be 2-D, got shape {hu.shape}")
    stored = np.round((hu - intercept) / slope)
    signed = bool(stored.min() < 0)
    dtype = np.dtype("<i2") if signed else np.dtype("<u2")
    info = np.iinfo(dtype)
    if stored.min() < info.min or stored.max() > info.max:
        raise ValueError(f"stored values {stored.min()}..{stored.max()} do not fit in 16 bits; change slope/intercept")

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(None, {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.Modality = "CT"
    ds.PatientID = "PHANTOM"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.Rows, ds.Columns = hu.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 1 if signed else 0
    ds.RescaleSlope = slope
    ds.RescaleIntercept = intercept
    ds.RescaleType = "HU"
    if padding_hu is not None:  # stored like the pixels: its VR (US or SS) follows the pixel representation
        ds.add_new(0x00280120, "SS" if signed else "US", int(round((padding_hu - intercept) / slope)))
    if with_pixels:
        ds.PixelData = stored.astype(dtype).tobytes()
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def phantom_to_dicom(gray_uint8: np.ndarray, center: float = -600, width: float = 1500) -> bytes:
    """A DICOM whose HU, windowed with the same center/width, give back `gray_uint8` (within rounding)."""
    gray = np.asarray(gray_uint8)
    if gray.dtype != np.uint8 or gray.ndim != 2:
        raise ValueError(f"expected a 2-D uint8 image, got {gray.dtype} {gray.shape}")
    hu = (center - width / 2.0) + gray.astype(np.float64) * (width / 255.0)
    return make_ct_dicom(hu)
