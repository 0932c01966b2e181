"""THE deterministic preprocessing: any image file -> the model's uint8 input.

decode (any PNG/JPEG mode, or DICOM through a Hounsfield window; the type read from the bytes) -> grayscale
uint8 -> CLAHE -> optional fixed window -> resize to a square (keeping the aspect ratio and padding, or
stretching) -> uint8 (S, S, 1).

The preprocess stage, evaluation, export checks and the server all call `preprocess_image` with the same
`PreprocessParams`, so the model always sees exactly what it was trained on.
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import cv2
import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from chestct.dicom import dicom_to_grayscale, looks_like_dicom
from chestct.errors import ChestctError
from chestct.params import DicomWindowParams, PreprocessParams

# Pillow refuses images above this many pixels unless told otherwise; we check explicitly instead.
DEFAULT_MAX_PIXELS = 40_000_000
# Lung window in Hounsfield units, used for DICOM input when no window is given (params: serve.dicom_window).
DEFAULT_DICOM_WINDOW = DicomWindowParams(center=-600, width=1500)


class ImageDecodeError(ChestctError, ValueError):
    """A file is not a readable image (empty, truncated, not an image, or too large)."""


class EmptyImageError(ImageDecodeError):
    """The file has no bytes at all."""


class UnsupportedImageError(ImageDecodeError):
    """Not an image this project reads: not PNG, JPEG or DICOM content (whatever the file name says), or a
    DICOM kind it does not handle (multi-frame, colour)."""


class CorruptImageError(ImageDecodeError):
    """The format is recognised but the data cannot be decoded (truncated, damaged, or a DICOM without pixels)."""


class ImageTooLargeError(ImageDecodeError):
    """The decoded image would exceed the pixel limit (decompression-bomb guard)."""


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
    are converted to Hounsfield units and mapped through `dicom_window` (default: a lung window).
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
        window = dicom_window or DEFAULT_DICOM_WINDOW
        return dicom_to_grayscale(data, label, window.center, window.width, max_pixels)
    return to_grayscale(open_image(data, label, max_pixels))


def apply_clahe(gray: np.ndarray, clip_limit: float, tile_grid: int) -> np.ndarray:
    clahe = cv2.createCLAHE(clipLimit=clip_limit, tileGridSize=(tile_grid, tile_grid))
    return clahe.apply(gray)


def apply_window(gray: np.ndarray, center: float, width: float) -> np.ndarray:
    """Map [center - width/2, center + width/2] linearly onto 0-255, clipping outside (grey levels or HU)."""
    low = center - width / 2.0
    windowed = (gray.astype(np.float32) - low) * (255.0 / width)
    return np.clip(np.round(windowed), 0, 255).astype(np.uint8)


def resize_square(gray: np.ndarray, size: int, mode: str) -> np.ndarray:
    """Resize to size x size: 'pad' keeps the aspect ratio and centres on black, 'stretch' distorts."""
    height, width = gray.shape
    if mode == "stretch":
        interpolation = cv2.INTER_AREA if size < max(height, width) else cv2.INTER_CUBIC
        return cv2.resize(gray, (size, size), interpolation=interpolation)
    scale = size / max(height, width)
    new_w, new_h = max(1, round(width * scale)), max(1, round(height * scale))
    interpolation = cv2.INTER_AREA if scale < 1 else cv2.INTER_CUBIC
    resized = cv2.resize(gray, (new_w, new_h), interpolation=interpolation)
    canvas = np.zeros((size, size), dtype=np.uint8)
    top, left = (size - new_h) // 2, (size - new_w) // 2
    canvas[top:top + new_h, left:left + new_w] = resized
    return canvas


def preprocess_gray(gray: np.ndarray, params: PreprocessParams) -> np.ndarray:
    """The deterministic steps after decoding: CLAHE -> window -> resize; returns uint8 (S, S, 1)."""
    if params.clahe.enabled:
        gray = apply_clahe(gray, params.clahe.clip_limit, params.clahe.tile_grid)
    if params.window.enabled:
        gray = apply_window(gray, params.window.center, params.window.width)
    square = resize_square(gray, params.image_size, params.resize_mode)
    return square[:, :, np.newaxis]


def preprocess_image(source: str | Path | bytes, params: PreprocessParams, name: str | None = None,
                     max_pixels: int = DEFAULT_MAX_PIXELS,
                     dicom_window: DicomWindowParams | None = None) -> np.ndarray:
    """Any image file or bytes (PNG, JPEG, DICOM) -> the model's input: uint8 array of shape (S, S, 1)."""
    gray = decode_grayscale(source, name=name, max_pixels=max_pixels, dicom_window=dicom_window)
    return preprocess_gray(gray, params)
