"""Where the body and the lung fields are in a 2-D grayscale slice: classical masks, no learning (OpenCV).

body_mask: Otsu's threshold separates tissue from the air around the patient; a morphological opening cuts
  the scanner couch, cables and text off; the largest connected component is the body; its convex hull closes
  the ring (lungs, and a ring broken where the body touches the image border, included).
lung_mask: inside the body, eroded so the dark outer fat and skin edge do not count, Otsu's threshold over the
  body's own pixels separates air-filled lung from tissue; the two largest dark components (each at least
  `MIN_LUNG_SHARE` of the body) are the lung fields, each with the vessels, nodules and wall masses inside it
  (its convex hull when it is one lung). Empty when none is found; callers fall back to the body.

crop_box: the box the preprocessing crops to, and what it keeps: the body, or (`preprocess.mask: lungs`) the lung
  fields grown by a margin so a mass on the lung wall stays in.

Both masks work on any window (bright or dull, lung or mediastinal) because every threshold comes from the image's
own histogram, and both return boolean arrays of the image's shape. All-black input gives empty masks.
"""

from __future__ import annotations

import cv2
import numpy as np

MIN_LUNG_SHARE = 0.02  # a dark component smaller than this share of the body is an airway or noise, not a lung
MAX_HULL_GROWTH = 1.4  # a lung field whose convex hull is larger than this is not one lung (two joined ones)


def _kernel(gray: np.ndarray, fraction: float) -> np.ndarray:
    size = max(3, int(round(fraction * min(gray.shape))) | 1)  # odd, at least 3 px
    return cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (size, size))


def _as_2d_uint8(gray: np.ndarray) -> np.ndarray:
    gray = np.asarray(gray)
    if gray.ndim == 3 and gray.shape[-1] == 1:
        gray = gray[..., 0]
    if gray.ndim != 2 or gray.dtype != np.uint8:
        raise ValueError(f"expected a 2-D uint8 image ((H, W) or (H, W, 1)), got {gray.dtype} {gray.shape}")
    return gray


def _largest_components(mask: np.ndarray, count: int, min_area: int) -> np.ndarray:
    labels, components, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=8)
    areas = stats[1:, cv2.CC_STAT_AREA]
    keep = [index + 1 for index in np.argsort(-areas)[:count] if areas[index] >= max(1, min_area)]
    return np.isin(components, keep) if keep else np.zeros(mask.shape, bool)


def body_mask(gray: np.ndarray) -> np.ndarray:
    """Boolean mask of the patient's body (convex hull of the largest bright component)."""
    gray = _as_2d_uint8(gray)
    if not gray.any():
        return np.zeros(gray.shape, bool)
    smooth = cv2.GaussianBlur(gray, (5, 5), 0)
    threshold, _ = cv2.threshold(smooth, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    tissue = (smooth > threshold).astype(np.uint8)
    opened = cv2.morphologyEx(tissue, cv2.MORPH_OPEN, _kernel(gray, 0.02))
    largest = _largest_components(opened if opened.any() else tissue, 1, 1)
    if not largest.any():
        return largest
    points = cv2.findNonZero(largest.astype(np.uint8))
    hull = np.zeros(gray.shape, np.uint8)
    cv2.fillConvexPoly(hull, cv2.convexHull(points), 1)
    return hull.astype(bool)


def lung_mask(gray: np.ndarray, body: np.ndarray | None = None) -> np.ndarray:
    """Boolean mask of the lung fields (up to the two largest dark regions inside the eroded body)."""
    gray = _as_2d_uint8(gray)
    body = body_mask(gray) if body is None else np.asarray(body, bool)
    if not body.any():
        return np.zeros(gray.shape, bool)
    inner = cv2.erode(body.astype(np.uint8), _kernel(gray, 0.04)).astype(bool)
    if not inner.any():
        return np.zeros(gray.shape, bool)
    smooth = cv2.GaussianBlur(gray, (5, 5), 0)
    inside = smooth[inner]
    if inside.max() == inside.min():
        return np.zeros(gray.shape, bool)  # a flat body: no contrast to find air in
    threshold, _ = cv2.threshold(inside.reshape(-1, 1), 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    dark = ((smooth <= threshold) & inner).astype(np.uint8)
    dark = cv2.morphologyEx(dark, cv2.MORPH_OPEN, _kernel(gray, 0.015))
    labels, components, stats, _ = cv2.connectedComponentsWithStats(dark, connectivity=8)
    areas = stats[1:, cv2.CC_STAT_AREA]
    fields = np.zeros(gray.shape, np.uint8)
    for index in np.argsort(-areas)[:2]:
        if areas[index] >= max(1, int(MIN_LUNG_SHARE * body.sum())):
            fields |= _whole_field(components == index + 1, gray)
    return fields.astype(bool) & body


def _whole_field(field: np.ndarray, gray: np.ndarray) -> np.ndarray:
    """One lung field with what lies inside it: vessels and nodules are bright spots in the dark lung, and a mass
    on the lung wall bites into its outline. A single lung is nearly convex, so its hull gives both back; two
    lungs joined in front of the heart are not, and their hull would swallow the heart, so they are only
    closed and hole-filled."""
    field = field.astype(np.uint8)
    hull = np.zeros_like(field)
    cv2.fillConvexPoly(hull, cv2.convexHull(cv2.findNonZero(field)), 1)
    if hull.sum() <= MAX_HULL_GROWTH * field.sum():
        return hull
    closed = cv2.morphologyEx(field, cv2.MORPH_CLOSE, _kernel(gray, 0.05))
    contours, _ = cv2.findContours(closed, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    filled = np.zeros_like(field)
    cv2.drawContours(filled, contours, -1, 1, thickness=cv2.FILLED)
    return filled


def mask_share(heatmap: np.ndarray, mask: np.ndarray) -> float | None:
    """The share of a non-negative heatmap's mass inside `mask`; None for an all-zero heatmap."""
    heatmap = np.asarray(heatmap, np.float64)
    if heatmap.shape != np.shape(mask):
        raise ValueError(f"heatmap {heatmap.shape} and mask {np.shape(mask)} differ in shape")
    if np.any(heatmap < 0):
        raise ValueError("heatmap values must be non-negative")
    total = heatmap.sum()
    return None if total <= 0 else float(heatmap[np.asarray(mask, bool)].sum() / total)


def crop_box(gray: np.ndarray, mode: str, margin: float, keep: str = "body",
             keep_margin: float = 0.0) -> tuple[tuple[int, int, int, int], np.ndarray, str]:
    """The box to crop to ((x0, y0, x1, y1), end-exclusive), the mask of what to keep, and what the box was built
    from.

    mode "lungs": the lung fields' bounding box, falling back to the body's when no lung is found; "body": the
    body's. `margin` (a fraction of the box's longer side) is added on every side, within the image. Without a
    body (an all-black image) the box is the whole image; what it was built from is "lungs", "body" or "image".
    keep "body" returns the body mask; "lungs" (with mode "lungs") the lung fields grown by `keep_margin` (a
    fraction of the image's shorter side, so a nodule or mass on the lung wall stays in) within the body, or the
    body where no lung was found.
    """
    gray = _as_2d_uint8(gray)
    if keep == "lungs" and mode != "lungs":
        raise ValueError(f"keeping the lung fields needs the crop to the lungs, got crop mode {mode!r}")
    height, width = gray.shape
    body = body_mask(gray)
    region, found = body, "body"
    if mode == "lungs":
        lungs = lung_mask(gray, body)
        if lungs.any():
            region, found = lungs, "lungs"
    if not region.any():
        return (0, 0, width, height), np.ones(gray.shape, bool), "image"
    kept = body
    if keep == "lungs" and found == "lungs":
        kept = grow(region, keep_margin) & body
    x, y, box_w, box_h = cv2.boundingRect(region.astype(np.uint8))
    pad = int(round(margin * max(box_w, box_h)))
    x0, y0 = max(0, x - pad), max(0, y - pad)
    x1, y1 = min(width, x + box_w + pad), min(height, y + box_h + pad)
    return (x0, y0, x1, y1), kept, found


def grow(mask: np.ndarray, fraction: float) -> np.ndarray:
    """A boolean `mask` dilated by `fraction` of its shorter side (unchanged for 0)."""
    if fraction <= 0:
        return np.asarray(mask, bool)
    size = max(1, int(round(2 * fraction * min(np.shape(mask))))) | 1  # a disc of radius ~fraction x side
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (size, size))
    return cv2.dilate(np.asarray(mask, np.uint8), kernel).astype(bool)
