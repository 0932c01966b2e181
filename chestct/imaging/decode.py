"""Image bytes or files -> a 2-D uint8 grayscale array: PNG and JPEG through Pillow, DICOM through a window.

The format comes from the content, never the file name (the real data has JPEGs named .png). Every failure is one
of the typed errors in `chestct.imaging.errors`, naming the file.
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from chestct.imaging.dicom import dicom_to_grayscale, looks_like_dicom
from chestct.imaging.errors import (
    CorruptImageError,
    EmptyImageError,
    ImageDecodeError,
    ImageTooLargeError,
    UnsupportedImageError,
)
from chestct.params import DicomWindowParams

# Pillow refuses images above this many pixels unless told otherwise; we check explicitly instead. The service
# uses serve.max_pixels; pipeline stages read files the user put there and keep this guard.
DEFAULT_MAX_PIXELS = 40_000_000


def open_image(data: bytes, name: str, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Open and fully decode image bytes with Pillow, turning every failure into an ImageDecodeError."""
    if not data:
        raise EmptyImageError(f"{name}: the file is empty (0 bytes); replace it with a valid PNG or JPEG")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            width, height = image.size
            if width * height > max_pixels:
                raise ImageTooLargeError(
                    f"{name}: {width}x{height} px exceeds the limit of {max_pixels} pixels; downscale it first"
                )
            image.load()  # decodes fully: a truncated file fails here, not later
    except ImageDecodeError:
        raise
    except UnidentifiedImageError:
        raise UnsupportedImageError(f"{name}: not a recognised image (expected PNG, JPEG or DICOM content)") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageTooLargeError(f"{name}: {exc}; downscale it first") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise CorruptImageError(f"{name}: cannot be decoded ({exc}); the file may be truncated or corrupt") from None
    return image


def to_grayscale(image: Image.Image) -> np.ndarray:
    """Grayscale uint8 from any Pillow mode; alpha is composited onto black (CT background)."""
    image = ImageOps.exif_transpose(image)  # honour camera/scanner orientation tags
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        # 16-bit or float data: stretch the values actually used onto 0-255.
        values = np.asarray(image, dtype=np.float64)
        low, high = float(values.min()), float(values.max())
        scaled = (values - low) / (high - low) * 255.0 if high > low else np.zeros_like(values)
        return np.round(scaled).astype(np.uint8)
    if image.mode == "P":
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA"):
        background = Image.new("RGBA", image.size, (0, 0, 0, 255))
        image = Image.alpha_composite(background, image.convert("RGBA"))
    return np.asarray(image.convert("L"), dtype=np.uint8)


def decode_grayscale(source: str | Path | bytes, name: str | None = None,
                     max_pixels: int = DEFAULT_MAX_PIXELS,
                     dicom_window: DicomWindowParams | None = None) -> np.ndarray:
    """Decode PNG, JPEG or DICOM bytes or a file into a 2-D uint8 grayscale array.

    The format comes from the content, not the file name (the real data has JPEGs named .png). DICOM pixels
    are converted to Hounsfield units and mapped through `dicom_window` (params `serve.dicom_window`, or the
    export's metadata); without a window, DICOM content is refused rather than shown through a guessed one.
    """
    if isinstance(source, bytes):
        data, label = source, name or "<upload>"
    else:
        path = Path(source)
        label = name or str(path)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise ImageDecodeError(f"{label}: file not found") from None
        except IsADirectoryError:
            raise ImageDecodeError(f"{label}: is a folder, not an image file") from None
    if looks_like_dicom(data):
        if dicom_window is None:
            raise UnsupportedImageError(f"{label}: DICOM input here needs a Hounsfield window (serve.dicom_window); "
                                        f"the training data must be PNG or JPEG")
        return dicom_to_grayscale(data, label, dicom_window.center, dicom_window.width, max_pixels)
    return to_grayscale(open_image(data, label, max_pixels))
