"""THE deterministic preprocessing: any image file -> the model's uint8 input.

decode (any PNG/JPEG mode, or DICOM through a Hounsfield window; the type read from the bytes) -> grayscale
uint8 -> CLAHE -> optional fixed window -> resize to a square (keeping the aspect ratio and padding, or
stretching) -> uint8 (S, S, 1).

The preprocess stage, evaluation, export checks and the server all call `preprocess_image` with the same
`PreprocessParams`, so the model always sees exactly what it was trained on.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from chestct.imaging.decode import DEFAULT_MAX_PIXELS, decode_grayscale
from chestct.imaging.transforms import apply_clahe, apply_window, resize_square
from chestct.params import DicomWindowParams, PreprocessParams


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
