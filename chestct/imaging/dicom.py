"""DICOM CT slices -> the same 2-D uint8 grayscale that PNG/JPEG decoding gives.

A CT slice stores scanner values, not display grey levels: Rescale Slope/Intercept turn them into Hounsfield units
(HU, -1000 air, 0 water, bone above +300), and a display window then picks the HU range to show. The training images
are lung-window renderings, so DICOM input gets a fixed lung window (default center -600, width 1500, from params
`serve.dicom_window`): HU in [center - width/2, center + width/2] map linearly onto 0-255, anything outside is clipped.

Only single-frame grayscale (MONOCHROME1/2) images are accepted. MONOCHROME1 means "the lowest value is shown white
after windowing" (DICOM PS3.3 C.7.6.3.1.2), so its windowed image is inverted to give what a viewer shows.
Detection is by content (b"DICM" at offset 128), never by the file name.
"""

from __future__ import annotations

import io

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.pixels import apply_modality_lut

from chestct.imaging.errors import CorruptImageError, ImageDecodeError, ImageTooLargeError, UnsupportedImageError
from chestct.imaging.transforms import apply_window

_PREAMBLE = 128
_MAGIC = b"DICM"
_GRAYSCALE = ("MONOCHROME1", "MONOCHROME2")
_UNDEFINED_LENGTH = 0xFFFFFFFF


def looks_like_dicom(data: bytes) -> bool:
    """True when the bytes are a DICOM Part 10 file: a 128-byte preamble followed by b"DICM"."""
    return data[_PREAMBLE:_PREAMBLE + len(_MAGIC)] == _MAGIC


def _cut_short(ds: Dataset, size: int) -> bool:
    """True when the last element read does not end exactly at the end of the file (pydicom stops silently)."""
    tags = list(ds.keys())
    if not tags:
        return True
    last = ds.get_item(tags[-1], keep_deferred=True)
    if not getattr(last, "is_raw", False) or last.length == _UNDEFINED_LENGTH:
        return False  # already parsed (a sequence): no position to check
    return last.value_tell + last.length != size


def _number(ds: Dataset, keyword: str, default: float) -> float:
    """A numeric element's value, or the default when it is absent or empty."""
    value = ds.get(keyword)
    return default if value is None or value == "" else float(value)


def dicom_to_grayscale(data: bytes, name: str, center: float, width: float, max_pixels: int) -> np.ndarray:
    """Decode a single-frame grayscale DICOM slice, convert it to HU and apply the window: uint8 (rows, cols)."""
    if width <= 0:
        raise ValueError(f"DICOM window width must be positive, got {width}")
    try:
        ds = pydicom.dcmread(io.BytesIO(data))
        if "PixelData" not in ds:
            if _cut_short(ds, len(data)):
                raise CorruptImageError(f"{name}: the DICOM file has no pixel data: it stops in the middle of an "
                                        "element (truncated); upload the complete file")
            raise CorruptImageError(f"{name}: the DICOM file has no pixel data (a report or structured document, or "
                                    "a file cut short); upload a CT image slice")
        frames = int(ds.get("NumberOfFrames") or 1)
        if frames > 1:
            raise UnsupportedImageError(f"{name}: multi-frame DICOM ({frames} frames): export a single slice")
        photometric = str(ds.get("PhotometricInterpretation", "")).strip()
        if photometric not in _GRAYSCALE or int(ds.get("SamplesPerPixel") or 1) != 1:
            raise UnsupportedImageError(f"{name}: colour DICOM (photometric interpretation {photometric or 'missing'})"
                                        "; export a grayscale (MONOCHROME2) CT slice")
        if "Rows" not in ds or "Columns" not in ds:
            raise CorruptImageError(f"{name}: the DICOM file has no image size (Rows/Columns); the file is damaged")
        rows, cols = int(ds.Rows), int(ds.Columns)
        if rows * cols > max_pixels:
            raise ImageTooLargeError(f"{name}: {cols}x{rows} px exceeds the limit of {max_pixels} pixels; "
                                     "downscale it first")
        pixels = ds.pixel_array
        if pixels.ndim != 2:
            raise UnsupportedImageError(f"{name}: DICOM pixel data of shape {pixels.shape}; export a single slice")
        if ds.get("ModalityLUTSequence"):
            hu = apply_modality_lut(pixels, ds).astype(np.float64)
        else:
            # defaults 1/0 when absent (pydicom's apply_modality_lut ignores an intercept without a slope)
            slope, intercept = _number(ds, "RescaleSlope", 1.0), _number(ds, "RescaleIntercept", 0.0)
            if slope == 0 or not (np.isfinite(slope) and np.isfinite(intercept)):
                raise CorruptImageError(f"{name}: invalid rescale slope/intercept ({slope}, {intercept}); "
                                        "the file is damaged")
            hu = pixels.astype(np.float64) * slope + intercept
    except ImageDecodeError:
        raise
    except Exception as exc:  # pydicom raises many types (InvalidDicomError, ValueError, RuntimeError, ...)
        reason = " ".join(str(exc).split()) or type(exc).__name__
        raise CorruptImageError(f"{name}: cannot decode the DICOM file ({reason}); it may be truncated, damaged "
                                "or compressed in a format this server cannot read - export it uncompressed") from None
    gray = apply_window(hu, center, width)
    return 255 - gray if photometric == "MONOCHROME1" else gray
