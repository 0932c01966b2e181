"""Deterministic grey-level and geometry transforms on 2-D uint8 images: CLAHE, a fixed window, resize to a square."""

from __future__ import annotations

import cv2
import numpy as np


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
