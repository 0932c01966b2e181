"""Where the model looks: the share of each test image's Grad-CAM mass inside the body and inside the lung fields.

A model that found the lesion puts its evidence in the lungs; one that learned the scanner puts it on the borders,
the table or the padding. Masks come from chestct.imaging.anatomy on the model's own input (the processed array),
so they align with the heatmaps pixel for pixel.
"""

from __future__ import annotations

import cv2
import numpy as np

from chestct.imaging.anatomy import body_mask, lung_mask, mask_share
from chestct.labels import CLASS_NAMES


def anatomy_masks(images: np.ndarray, kept: str = "body") -> tuple[np.ndarray, np.ndarray]:
    """(body, lungs): boolean (N, S, S) masks of the processed images (N, S, S, 1).

    `kept` is `preprocess.mask`. With "lungs" the preprocessing already zeroed everything outside the lung fields,
    so the non-zero pixels are both masks (finding lungs again inside them would only find their dark parts).
    """
    if kept == "lungs":
        inside = np.asarray(images)[..., 0] > 0
        return inside, inside.copy()
    bodies, lungs = [], []
    for image in images:
        plane = image[..., 0]
        body = body_mask(plane)
        bodies.append(body)
        lungs.append(lung_mask(plane, body))
    return np.stack(bodies), np.stack(lungs)


def _mean(values: list[float]) -> float | None:
    return float(np.mean(values)) if values else None


def attention_report(heatmaps: np.ndarray, labels: np.ndarray, bodies: np.ndarray, lungs: np.ndarray) -> dict:
    """Mean share of Grad-CAM mass inside the body and the lungs, over all test images and per class.

    All-zero maps (no positive evidence anywhere) have no share and are counted apart; images where no lung was
    found count as 0 inside the lungs, since the mass then lies wherever the lungs are not. `lung_area_share`
    and `body_area_share` are what a uniform heatmap would score on the same images (the masks' share of the
    input): a share is evidence of looking at the lungs only by how far it rises above its area.
    """
    body_shares, lung_shares, classes = [], [], []
    body_areas, lung_areas = [], []
    zero_maps = 0
    for heatmap, label, body, lung in zip(heatmaps, labels, bodies, lungs, strict=True):
        in_body = mask_share(heatmap, body)
        if in_body is None:
            zero_maps += 1
            continue
        body_shares.append(in_body)
        lung_shares.append(mask_share(heatmap, lung))
        body_areas.append(float(np.mean(body)))
        lung_areas.append(float(np.mean(lung)))
        classes.append(int(label))
    classes_array = np.asarray(classes, int)
    by_class = {}
    for label, name in enumerate(CLASS_NAMES):
        members = np.flatnonzero(classes_array == label)
        by_class[name.lower()] = {"images": int(len(members)),
                                  "in_body_share": _mean([body_shares[i] for i in members]),
                                  "in_lung_share": _mean([lung_shares[i] for i in members])}
    return {"in_body_share": _mean(body_shares), "in_lung_share": _mean(lung_shares),
            "body_area_share": _mean(body_areas), "lung_area_share": _mean(lung_areas), "by_class": by_class,
            "images": int(len(heatmaps)), "zero_maps": zero_maps,
            "lungs_not_found": int(sum(not lung.any() for lung in lungs))}


def outline(rgb: np.ndarray, body: np.ndarray, lungs: np.ndarray) -> np.ndarray:
    """The overlay with the body (white) and lung (cyan) outlines drawn on it, one pixel wide."""
    drawn = np.ascontiguousarray(rgb.copy())
    for mask, colour in ((body, (255, 255, 255)), (lungs, (0, 255, 255))):
        contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
        cv2.drawContours(drawn, contours, -1, colour, 1)
    return drawn
