"""THE deterministic preprocessing: any image file -> the model's uint8 input.

decode (any PNG/JPEG mode, or DICOM through a Hounsfield window; the type read from the bytes) -> grayscale
uint8 -> optional crop to the anatomy (the lung fields' or the body's box; zero outside the body, or outside the
lung fields with `mask: lungs`) -> CLAHE -> optional fixed window -> resize to a square (keeping the aspect ratio
and padding, or stretching) -> optional denoising -> optional intensity standardisation inside what the crop kept
-> uint8 (S, S, 1).

The preprocess stage, evaluation, export checks and the server all call `preprocess_image` with the same
`PreprocessParams`, so the model always sees exactly what it was trained on. With `crop: none`, no denoising
and `intensity: none`, the output is the pipeline's original one, bit for bit.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from chestct.imaging.anatomy import crop_box
from chestct.imaging.decode import DEFAULT_MAX_PIXELS, decode_grayscale
from chestct.imaging.files import DEFAULT_MAX_BYTES
from chestct.imaging.standardise import denoise, equalise_in_mask, masked, percentile_in_mask
from chestct.imaging.transforms import apply_clahe, apply_window, resize_square
from chestct.params import DicomWindowParams, PreprocessParams


@dataclass(frozen=True)
class Prepared:
    """One image through the deterministic preprocessing."""

    image: np.ndarray  # (S, S, 1) uint8: the model's input
    # (S, S) uint8 before intensity standardisation, 0 outside the body and >= 1 inside: training perturbs its
    # window and then standardises it again (augment.photometric). None on the original path (nothing masked).
    unstandardised: np.ndarray | None
    crop: str  # what the crop box came from: "lungs", "body", "image" (nothing found), or "none" (no crop)


def standardise(image: np.ndarray, params: PreprocessParams) -> np.ndarray:
    """The intensity standardisation of a masked (S, S) image, as `preprocess.intensity` asks."""
    if params.intensity == "equalise_in_mask":
        return equalise_in_mask(image)
    if params.intensity == "percentile":
        return percentile_in_mask(image, *params.percentile)
    return image


def prepare_gray(gray: np.ndarray, params: PreprocessParams) -> Prepared:
    """The deterministic steps after decoding, with what training and the crop report need besides the input."""
    found, mask = "none", None
    if params.crop != "none":
        (x0, y0, x1, y1), kept, found = crop_box(gray, params.crop, params.crop_margin, params.mask,
                                                 params.mask_margin)
        gray, mask = np.ascontiguousarray(gray[y0:y1, x0:x1]), kept[y0:y1, x0:x1]
    if params.clahe.enabled:
        gray = apply_clahe(gray, params.clahe.clip_limit, params.clahe.tile_grid)
    if params.window.enabled:
        gray = apply_window(gray, params.window.center, params.window.width)
    if mask is None and params.intensity == "none" and params.denoise.method == "none" and not params.denoise.renoise:
        return Prepared(resize_square(gray, params.image_size, params.resize_mode)[:, :, np.newaxis], None, found)
    if mask is None:
        mask = np.ones(gray.shape, bool)
    square = resize_square(gray, params.image_size, params.resize_mode)
    # The mask goes through the same resize (padding included) with nearest-neighbour values.
    square_mask = resize_square(mask.astype(np.uint8) * 255, params.image_size, params.resize_mode) > 127
    unstandardised = denoise(masked(square, square_mask), params.denoise.method, params.denoise.strength,
                             params.denoise.renoise)
    return Prepared(standardise(unstandardised, params)[:, :, np.newaxis], unstandardised, found)


def carry_region(gray: np.ndarray, region: np.ndarray, params: PreprocessParams) -> np.ndarray:
    """A region of the decoded image (a lesion box, say) through the same crop and resize as the image itself:
    (S, S) bool, True wherever the region covers any part of a model-input pixel."""
    region = np.asarray(region, bool)
    if region.shape != np.shape(gray)[:2]:
        raise ValueError(f"region {region.shape} and image {np.shape(gray)[:2]} differ in shape")
    if params.crop != "none":
        (x0, y0, x1, y1), _, _ = crop_box(gray, params.crop, params.crop_margin, params.mask, params.mask_margin)
        region = region[y0:y1, x0:x1]
    return resize_square(region.astype(np.uint8) * 255, params.image_size, params.resize_mode) > 0


def preprocess_gray(gray: np.ndarray, params: PreprocessParams) -> np.ndarray:
    """The deterministic steps after decoding; returns the model's input, uint8 (S, S, 1)."""
    return prepare_gray(gray, params).image


def preprocess_image(source: str | Path | bytes, params: PreprocessParams, name: str | None = None,
                     max_pixels: int = DEFAULT_MAX_PIXELS,
                     dicom_window: DicomWindowParams | None = None,
                     max_bytes: int = DEFAULT_MAX_BYTES) -> np.ndarray:
    """Any image file or bytes (PNG, JPEG, DICOM) -> the model's input: uint8 array of shape (S, S, 1)."""
    gray = decode_grayscale(source, name=name, max_pixels=max_pixels, dicom_window=dicom_window, max_bytes=max_bytes)
    return preprocess_gray(gray, params)


