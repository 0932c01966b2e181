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
from chestct.imaging.transforms import apply_window, row_bands

_PREAMBLE = 128
_MAGIC = b"DICM"
_GRAYSCALE = ("MONOCHROME1", "MONOCHROME2")
_UNDEFINED_LENGTH = 0xFFFFFFFF
# Hounsfield values a CT slice can hold: air is -1000, dense bone about +2000, metal a little more. The lower end
# leaves room for the fill value many scanners write outside the scanned circle (-2000, -3024 or -3072 HU) without
# marking it as Pixel Padding Value; pixels DICOM does mark as padding are not held to the range at all.
HU_RANGE = (-3100, 4000)


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


def _padding_range(ds: Dataset) -> tuple[float, float] | None:
    """The stored values DICOM marks as padding outside the scanned field (Pixel Padding Value, and Range Limit
    when given, PS3.3 C.7.5.1.1.2), or None."""
    if ds.get("PixelPaddingValue") is None:
        return None
    first = _number(ds, "PixelPaddingValue", 0.0)
    last = _number(ds, "PixelPaddingRangeLimit", first)
    return min(first, last), max(first, last)


def _value_range(values: np.ndarray, stored: np.ndarray, padding: tuple[float, float] | None
                 ) -> tuple[float, float] | None:
    """Smallest and largest of `values` where the stored value is not padding, a band of rows at a time; None when
    every pixel is padding."""
    low, high = np.inf, -np.inf
    for band in row_bands(*values.shape):
        kept = values[band]
        if padding is not None:
            kept = kept[(stored[band] < padding[0]) | (stored[band] > padding[1])]
        if kept.size:
            low, high = min(low, float(kept.min())), max(high, float(kept.max()))
    return (low, high) if low <= high else None


def _check_hounsfield(low: float, high: float, name: str, source: str) -> None:
    """Refuse values no CT scanner produces: a damaged rescale (slope 1e308) would otherwise be windowed into an
    all-white image that still gets a diagnosis."""
    if not (HU_RANGE[0] <= low and high <= HU_RANGE[1]):  # also false for NaN
        raise CorruptImageError(f"{name}: Hounsfield values {low:g}..{high:g} after {source} are outside the sane CT "
                                f"range {HU_RANGE[0]}..{HU_RANGE[1]} HU; the rescale values or the pixel data are "
                                "damaged, or this is not a CT slice")


def _windowed(stored: np.ndarray, slope: float, intercept: float, center: float, width: float) -> np.ndarray:
    """HU = stored * slope + intercept, then the window, in float32 one band of rows at a time."""
    gray = np.empty(stored.shape, np.uint8)
    for band in row_bands(*stored.shape):
        hu = stored[band].astype(np.float32)
        hu *= np.float32(slope)
        hu += np.float32(intercept)
        gray[band] = apply_window(hu, center, width)
    return gray


def dicom_to_grayscale(data: bytes, name: str, center: float, width: float, max_pixels: int) -> np.ndarray:
    """Decode a single-frame grayscale DICOM slice, convert it to HU and apply the window: uint8 (rows, cols).

    Pixels marked as padding aside, every HU value must lie in HU_RANGE (CorruptImageError otherwise)."""
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
        padding = _padding_range(ds)
        if ds.get("ModalityLUTSequence"):
            hu = apply_modality_lut(pixels, ds)  # the table's output is HU; padding stays defined on stored values
            found = _value_range(hu, pixels, padding)
            pixels, slope, intercept, source = hu, 1.0, 0.0, "the modality LUT"
        else:
            # defaults 1/0 when absent (pydicom's apply_modality_lut ignores an intercept without a slope)
            slope, intercept = _number(ds, "RescaleSlope", 1.0), _number(ds, "RescaleIntercept", 0.0)
            if slope == 0 or not (np.isfinite(slope) and np.isfinite(intercept)):
                raise CorruptImageError(f"{name}: invalid rescale slope/intercept ({slope}, {intercept}); "
                                        "the file is damaged")
            source = f"rescale (slope {slope:g}, intercept {intercept:g})"
            found = _value_range(pixels, pixels, padding)
        if found is None:
            raise CorruptImageError(f"{name}: every pixel is padding (Pixel Padding Value); the slice holds no image")
        # HU is linear in the stored value, so the extremes come from the stored extremes (Python floats: no overflow)
        low, high = sorted((found[0] * slope + intercept, found[1] * slope + intercept))
        _check_hounsfield(low, high, name, source)
    except ImageDecodeError:
        raise
    except Exception as exc:  # pydicom raises many types (InvalidDicomError, ValueError, RuntimeError, ...)
        reason = " ".join(str(exc).split()) or type(exc).__name__
        raise CorruptImageError(f"{name}: cannot decode the DICOM file ({reason}); it may be truncated, damaged "
                                "or compressed in a format this server cannot read - export it uncompressed") from None
    gray = _windowed(pixels, slope, intercept, center, width)
    return 255 - gray if photometric == "MONOCHROME1" else gray
