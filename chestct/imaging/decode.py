"""Image bytes or files -> a 2-D uint8 grayscale array: PNG and JPEG through Pillow, DICOM through a window.

The format comes from the content, never the file name (the real data has JPEGs named .png). Pillow is only allowed
its PNG and JPEG readers: it knows dozens of formats (TIFF, BMP, GIF, WEBP, EPS through Ghostscript, ...) that this
project neither promises nor tests. Every failure, in reading, decoding or converting to grayscale, is one of the
typed errors in `chestct.imaging.errors`, naming the file.

Memory: pixels are kept in uint8, or float32 one band of rows at a time (never float64 at full resolution), so a
small file that decodes to a huge 16-bit image costs little more than the decoded image itself.
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from chestct.imaging.dicom import dicom_to_grayscale, looks_like_dicom
from chestct.imaging.domain import colour_spread
from chestct.imaging.errors import (
    CorruptImageError,
    EmptyImageError,
    ImageDecodeError,
    ImageTooLargeError,
    UnsupportedImageError,
)
from chestct.imaging.files import DEFAULT_MAX_BYTES, read_image_file
from chestct.imaging.transforms import linear_to_uint8, row_bands
from chestct.params import DicomWindowParams

# Pillow refuses images above this many pixels unless told otherwise; we check explicitly instead. The service
# uses serve.max_pixels; pipeline stages read files the user put there and keep this guard.
DEFAULT_MAX_PIXELS = 40_000_000

PILLOW_FORMATS = ("PNG", "JPEG")  # DICOM is recognised separately, by its magic bytes
ACCEPTED = "PNG, JPEG or DICOM"

_DEEP_MODES = ("I", "I;16", "I;16L", "I;16B", "I;16N", "F")  # more than 8 bits per pixel: stretched onto 0-255
_ALPHA_MODES = ("RGBA", "LA")  # composited onto black (the CT background)
_VIA_RGBA = ("P", "PA")  # palettes may carry transparency


def _format_guess(data: bytes) -> str | None:
    """The format Pillow's own signature checks see in the first bytes, without opening anything (for messages)."""
    Image.init()
    prefix = data[:16]  # what Image.open hands each format's check
    for name in Image.ID:
        accept = Image.OPEN[name][1]
        try:
            if accept is not None and accept(prefix):
                return name
        except Exception:  # some plugins' checks raise on a few bytes (struct.error): not that format
            continue
    return None


def _unidentified(data: bytes, name: str) -> ImageDecodeError:
    """Why Pillow's PNG and JPEG readers both refused the bytes: a damaged header, another format, or no image."""
    guess = _format_guess(data)
    if guess in PILLOW_FORMATS:
        return CorruptImageError(f"{name}: the {guess} header cannot be read; the file is damaged or truncated")
    if guess is not None:
        return UnsupportedImageError(f"{name}: {guess} content is not accepted (only {ACCEPTED}); "
                                     "convert it to PNG")
    return UnsupportedImageError(f"{name}: not a recognised image (expected {ACCEPTED} content)")


def open_image(data: bytes, name: str, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Open and fully decode PNG or JPEG bytes with Pillow, turning every failure into an ImageDecodeError."""
    if not data:
        raise EmptyImageError(f"{name}: the file is empty (0 bytes); replace it with a valid PNG or JPEG")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=PILLOW_FORMATS)
            width, height = image.size
            if width * height > max_pixels:
                raise ImageTooLargeError(
                    f"{name}: {width}x{height} px exceeds the limit of {max_pixels} pixels; downscale it first"
                )
            image.load()  # decodes fully: a truncated file fails here, not later
    except (ImageDecodeError, MemoryError):
        raise
    except UnidentifiedImageError:
        raise _unidentified(data, name) from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageTooLargeError(f"{name}: {exc}; downscale it first") from None
    except Exception as exc:  # Pillow's decoders raise OSError, SyntaxError, ValueError, struct.error, zlib.error...
        reason = " ".join(str(exc).split()) or type(exc).__name__
        raise CorruptImageError(f"{name}: cannot be decoded ({reason}); the file may be truncated or corrupt") from None
    return image


def _stretch_deep(image: Image.Image, name: str) -> np.ndarray:
    """16-bit, 32-bit or float pixels: the values actually used stretched onto 0-255, one band of rows at a time."""
    width, height = image.size
    low, high = np.inf, -np.inf
    for band in row_bands(height, width):  # first pass: the range (getextrema does not know every 16-bit layout)
        values = np.asarray(image.crop((0, band.start, width, band.stop)))
        low, high = min(low, float(values.min())), max(high, float(values.max()))
    if not (np.isfinite(low) and np.isfinite(high)):
        raise CorruptImageError(f"{name}: the pixel values include NaN or infinity; the file is damaged")
    if high == low:
        return np.zeros((height, width), np.uint8)
    gray = np.empty((height, width), np.uint8)
    for band in row_bands(height, width):
        gray[band] = linear_to_uint8(np.asarray(image.crop((0, band.start, width, band.stop))), low,
                                     255.0 / (high - low))
    return gray


def _composite_on_black(image: Image.Image) -> np.ndarray:
    """Grey times alpha (rounded), i.e. the image laid over black; opaque pixels keep their grey exactly."""
    gray = np.asarray(image.convert("L"), dtype=np.uint16)
    alpha = np.asarray(image.getchannel("A"), dtype=np.uint16)
    gray *= alpha
    gray += 127
    gray //= 255
    return gray.astype(np.uint8)


def _grayscale_of_mode(image: Image.Image, name: str) -> np.ndarray:
    if image.mode in _DEEP_MODES:
        return _stretch_deep(image, name)
    if image.mode in _VIA_RGBA:
        image = image.convert("RGBA")
    if image.mode in _ALPHA_MODES:
        return _composite_on_black(image)
    if image.mode == "LAB":
        return np.asarray(image.getchannel("L"), dtype=np.uint8)  # lightness is the grey; Pillow has no LAB->L
    return np.asarray(image.convert("L"), dtype=np.uint8)


def to_grayscale(image: Image.Image, name: str) -> np.ndarray:
    """Grayscale uint8 from any Pillow mode; alpha is composited onto black (CT background). Honours the EXIF
    orientation in place (the image is changed); `name` is the file the errors name."""
    try:
        ImageOps.exif_transpose(image, in_place=True)  # camera/scanner orientation tags; in place: no copy
    except MemoryError:
        raise
    except Exception as exc:
        raise CorruptImageError(f"{name}: its EXIF orientation cannot be applied ({exc}); "
                                "save the image again without EXIF data") from None
    try:
        return _grayscale_of_mode(image, name)
    except (ImageDecodeError, MemoryError):
        raise
    except Exception as exc:
        raise UnsupportedImageError(f"{name}: pixel mode {image.mode} cannot be turned into grayscale ({exc}); "
                                    "save it as an 8-bit grayscale or RGB PNG") from None


def colour_of(image: Image.Image) -> float:
    """The mean spread between the colour channels of a decoded image (0 for grey modes): the domain check's
    colour figure (chestct.imaging.domain)."""
    if image.mode not in ("RGB", "RGBA", "P", "PA", "CMYK", "YCbCr", "LAB", "HSV"):
        return 0.0
    return colour_spread(np.asarray(image.convert("RGB")))


def decode_grayscale(source: str | Path | bytes, name: str | None = None,
                     max_pixels: int = DEFAULT_MAX_PIXELS,
                     dicom_window: DicomWindowParams | None = None,
                     max_bytes: int = DEFAULT_MAX_BYTES) -> np.ndarray:
    """Decode PNG, JPEG or DICOM bytes or a file into a 2-D uint8 grayscale array.

    The format comes from the content, not the file name (the real data has JPEGs named .png). A file must be a
    regular file of at most `max_bytes` bytes (bytes handed in were already read, and limited, by the caller).
    DICOM pixels are converted to Hounsfield units and mapped through `dicom_window` (params `serve.dicom_window`,
    or the export's metadata); without a window, DICOM content is refused rather than shown through a guessed one.
    """
    return decode_with_colour(source, name, max_pixels, dicom_window, max_bytes, measure_colour=False)[0]


def decode_with_colour(source: str | Path | bytes, name: str | None = None,
                       max_pixels: int = DEFAULT_MAX_PIXELS,
                       dicom_window: DicomWindowParams | None = None,
                       max_bytes: int = DEFAULT_MAX_BYTES, measure_colour: bool = True) -> tuple[np.ndarray, float]:
    """decode_grayscale's array, and the stored image's colour spread (colour_of; 0 for DICOM and grey images)."""
    if isinstance(source, bytes):
        data, label = source, name or "<upload>"
    else:
        label = name or str(source)
        data = read_image_file(source, label, max_bytes)
    if looks_like_dicom(data):
        if dicom_window is None:
            raise UnsupportedImageError(f"{label}: DICOM input here needs a Hounsfield window (serve.dicom_window); "
                                        f"the training data must be PNG or JPEG")
        return dicom_to_grayscale(data, label, dicom_window.center, dicom_window.width, max_pixels), 0.0
    image = open_image(data, label, max_pixels)
    colour = colour_of(image) if measure_colour else 0.0
    return to_grayscale(image, label), colour
