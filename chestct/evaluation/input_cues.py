"""Trivial rules on what the model sees: can two numbers about the PROCESSED input separate the classes?

The shortcut audit's raw-file rules say what the dataset leaks; these say what is still in the model's input
after preprocessing. Each rule is a linear model (chestct.evaluation.shortcuts.fit_shortcut_model) fitted on the
processed TRAIN arrays and scored (ROC AUC) on the processed TEST arrays:

- intensity: the input's mean and std;
- histogram: its normalised grey-level histogram;
- border: mean and std of the outer 10% frame (what lies around the anatomy: padding, table, text);
- geometry: the padding share and the aspect of the content box (`resize_mode: pad` writes the original aspect
  ratio into the array);
- noise: the median absolute residual after a 3x3 median filter, inside the body (the noise level);
- sharpness: the log variance of the Laplacian inside the body.

If preprocessing removes a cue, its rule drops towards 0.5; a rule near 1.0 means the cue is still in the input,
so a model could learn it instead of the lesion.
"""

from __future__ import annotations

from collections.abc import Callable

import cv2
import numpy as np

from chestct.evaluation.shortcuts import histogram_features, intensity_features, shortcut_auc
from chestct.imaging.anatomy import body_mask

BORDER_FRACTION = 0.10  # the outer frame: this fraction of each side


def _plane(image: np.ndarray) -> np.ndarray:
    return image[..., 0] if image.ndim == 3 else image


def border_features(images: np.ndarray) -> np.ndarray:
    """(N, 2): mean and std of the pixels in the outer BORDER_FRACTION frame of each image."""
    rows = []
    for image in images:
        plane = _plane(image).astype(np.float64)
        size = plane.shape[0]
        width = max(1, round(BORDER_FRACTION * size))
        frame = np.ones(plane.shape, bool)
        frame[width:size - width, width:size - width] = False
        rows.append((plane[frame].mean(), plane[frame].std()))
    return np.asarray(rows)


def geometry_features(images: np.ndarray) -> np.ndarray:
    """(N, 2): the share of the array outside the content's bounding box (padding) and the content's aspect."""
    rows = []
    for image in images:
        plane = _plane(image)
        x, y, width, height = cv2.boundingRect((plane > 0).astype(np.uint8))
        area = plane.shape[0] * plane.shape[1]
        rows.append((1.0 - width * height / area, width / height if height else 0.0))
    return np.asarray(rows)


def _inner_body(plane: np.ndarray) -> np.ndarray:
    body = body_mask(plane)
    inner = cv2.erode(body.astype(np.uint8), np.ones((3, 3), np.uint8)).astype(bool)  # not the body's edge
    return inner if inner.sum() >= 16 else np.ones(plane.shape, bool)


def noise_features(images: np.ndarray) -> np.ndarray:
    """(N, 1): median |image - 3x3 median(image)| inside the body, the noise level."""
    rows = []
    for image in images:
        plane = _plane(image)
        residual = np.abs(plane.astype(np.int16) - cv2.medianBlur(plane, 3).astype(np.int16))
        rows.append((float(np.median(residual[_inner_body(plane)])),))
    return np.asarray(rows, np.float64)


def sharpness_features(images: np.ndarray) -> np.ndarray:
    """(N, 1): log variance of the Laplacian inside the body."""
    rows = []
    for image in images:
        plane = _plane(image)
        laplacian = cv2.Laplacian(plane.astype(np.float32), cv2.CV_32F, ksize=3)
        rows.append((float(np.log(laplacian[_inner_body(plane)].var() + 1e-6)),))
    return np.asarray(rows, np.float64)


def input_rules(histogram_bins: int) -> dict[str, Callable[[np.ndarray], np.ndarray]]:
    return {
        "intensity_std": intensity_features,
        "histogram": lambda images: histogram_features(images, histogram_bins),
        "border": border_features,
        "geometry": geometry_features,
        "noise": noise_features,
        "sharpness": sharpness_features,
    }


def input_shortcut_audit(train_images: np.ndarray, train_labels: np.ndarray, test_images: np.ndarray,
                         test_labels: np.ndarray, histogram_bins: int) -> dict[str, float | None]:
    """`input_<rule>_auc` for every rule: fitted on the processed train arrays, scored on the processed test."""
    return {f"input_{name}_auc": shortcut_auc(features(train_images), train_labels, features(test_images),
                                              test_labels)
            for name, features in input_rules(histogram_bins).items()}
