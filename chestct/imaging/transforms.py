"""Deterministic grey-level and geometry transforms on 2-D uint8 images: CLAHE, a fixed window, resize to a square."""

from __future__ import annotations

from collections.abc import Iterator

import cv2
import numpy as np

# Grey-level maps of large images run over bands of about this many pixels, so their float32 temporaries stay a few
# MB whatever the image size (a 6300 x 6300 scan in one piece would need 160 MB per temporary).
BAND_PIXELS = 1 << 20


def row_bands(rows: int, columns: int) -> Iterator[slice]:
    """Consecutive row slices of a (rows, columns) image, each about BAND_PIXELS pixels."""
    step = max(1, BAND_PIXELS // max(1, columns))
    for top in range(0, rows, step):
        yield slice(top, min(rows, top + step))


def linear_to_uint8(values: np.ndarray, low: float, scale: float) -> np.ndarray:
    """round((values - low) * scale) clipped to 0..255 as uint8, computed in float32 band by band over the rows
    (the first axis) of an array of at least one dimension."""
    out = np.empty(values.shape, np.uint8)
    for band in row_bands(len(values), values[0].size if len(values) else 1):
        scaled = values[band].astype(np.float32)
        scaled -= np.float32(low)
        scaled *= np.float32(scale)
        np.round(scaled, out=scaled)
        np.clip(scaled, 0, 255, out=scaled)
        out[band] = scaled
    return out


def apply_clahe(gray: np.ndarray, clip_limit: float, tile_grid: int) -> np.ndarray:
    clahe = cv2.createCLAHE(clipLimit=clip_limit, tileGridSize=(tile_grid, tile_grid))
    return clahe.apply(gray)


def apply_window(gray: np.ndarray, center: float, width: float) -> np.ndarray:
    """Map [center - width/2, center + width/2] linearly onto 0-255, clipping outside (grey levels or HU)."""
    return linear_to_uint8(gray, center - width / 2.0, 255.0 / width)


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
