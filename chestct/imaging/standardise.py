"""Intensity and noise standardisation inside the body mask: make the stored window and noise useless as cues.

The input to these functions is a "masked" uint8 image: 0 outside the body (and on padding), at least 1 inside,
so the mask travels with the image itself (`image > 0`) through caching, augmentation and TensorFlow
(chestct.training.augmentation re-implements `equalise_in_mask` with TF ops for training; a test proves both
give the same array).

- equalise_in_mask: rank (histogram) equalisation over the masked pixels only, to 1..255; the mid-rank of each
  grey level, in exact integer arithmetic: 1 + (254 * (2 * below + count)) // (2 * n). Any monotone change of the
  stored window (gamma, level, width, contrast) gives the same output.
- percentile_in_mask: the masked pixels' [low, high] percentiles mapped linearly to 1..255.
- denoise: non-local means (or a bilateral filter) at a strength set from the image's own noise estimate, so
  every slice leaves with a similar, low noise level.
"""

from __future__ import annotations

from functools import lru_cache

import cv2
import numpy as np

GRAY_LEVELS = 256


NOISE_FLOOR_SEED = 20261201  # the fixed noise field of preprocess.denoise.renoise


def masked(gray: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """0 outside `mask`, at least 1 inside: the form every function here takes."""
    return np.where(mask, np.maximum(gray, 1), 0).astype(np.uint8)


def equalisation_table(image: np.ndarray) -> np.ndarray:
    """(256,) uint8 lookup table of the masked image's rank equalisation (level 0 -> 0)."""
    counts = np.bincount(image[image > 0].ravel(), minlength=GRAY_LEVELS).astype(np.int64)
    total = int(counts.sum())
    if total == 0:
        return np.zeros(GRAY_LEVELS, np.uint8)
    below = np.cumsum(counts) - counts
    table = 1 + (254 * (2 * below + counts)) // (2 * total)
    table[0] = 0
    return table.astype(np.uint8)


def equalise_in_mask(image: np.ndarray) -> np.ndarray:
    """Rank-equalise the pixels > 0 to 1..255; 0 stays 0."""
    image = np.asarray(image, np.uint8)
    return equalisation_table(image)[image]


def percentile_in_mask(image: np.ndarray, low: float, high: float) -> np.ndarray:
    """The masked pixels' `low` and `high` percentiles mapped to 1 and 255 (clipped); 0 stays 0."""
    image = np.asarray(image, np.uint8)
    inside = image > 0
    if not inside.any():
        return image.copy()
    p_low, p_high = np.percentile(image[inside], [low, high])
    scale = 254.0 / max(p_high - p_low, 1.0)
    mapped = np.clip(np.rint(1.0 + (image.astype(np.float32) - p_low) * scale), 1, 255)
    return np.where(inside, mapped, 0).astype(np.uint8)


def noise_level(image: np.ndarray) -> float:
    """Robust noise std of the masked pixels: 1.4826 x the median |image - 3x3 median(image)| (times a 3x3
    median's residual factor), 0 for an empty mask."""
    inside = image > 0
    if inside.sum() < 16:
        return 0.0
    residual = np.abs(image.astype(np.int16) - cv2.medianBlur(image, 3).astype(np.int16))
    return float(1.4826 * np.median(residual[inside]) * 1.1)


def denoise(image: np.ndarray, method: str, strength: float, renoise: float = 0.0) -> np.ndarray:
    """Smooth the masked image at `strength` x its own noise estimate, then add the common noise floor
    (`renoise`, see `add_noise_floor`); the mask (0 outside) is kept."""
    return add_noise_floor(_smooth(image, method, strength), renoise)


@lru_cache(maxsize=8)
def _noise_field(shape: tuple[int, ...]) -> np.ndarray:
    """One fixed standard-normal field per image shape: the same pattern in every image, so it carries no class."""
    field = np.random.default_rng(NOISE_FLOOR_SEED).standard_normal(shape).astype(np.float32)
    field.setflags(write=False)
    return field


def add_noise_floor(image: np.ndarray, sigma: float) -> np.ndarray:
    """Add `sigma` grey levels of a fixed Gaussian field inside the mask (values kept in 1..255).

    Denoising leaves each slice at its own residual noise and sharpness, which still told Normal from Cancer in
    the Kaggle data; a common floor well above those residuals puts every slice at (nearly) one noise level.
    Deterministic, so the predictor gives the cached arrays exactly."""
    if sigma <= 0:
        return image
    inside = image > 0
    noisy = np.clip(np.rint(image.astype(np.float32) + sigma * _noise_field(image.shape)), 1, 255)
    return np.where(inside, noisy, 0).astype(np.uint8)


def _smooth(image: np.ndarray, method: str, strength: float) -> np.ndarray:
    if method == "none":
        return image
    sigma = noise_level(image)
    if sigma <= 0:
        return image
    if method == "nlmeans":
        smoothed = cv2.fastNlMeansDenoising(image, None, h=float(strength * sigma), templateWindowSize=5,
                                            searchWindowSize=11)
    elif method == "bilateral":
        smoothed = cv2.bilateralFilter(image, d=5, sigmaColor=float(2.0 * strength * sigma), sigmaSpace=1.5)
    else:
        raise ValueError(f"preprocess.denoise.method: unknown method {method!r} (none, nlmeans or bilateral)")
    return masked(smoothed, image > 0)
