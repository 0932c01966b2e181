"""Lung ablation: what the model's score rests on, measured by taking parts of its input away.

The Grad-CAM shares cannot say it at the resolutions used here: MobileNetV3Small's last map is 4x4 at 128 px, so
its heatmaps are a few blurred blobs and their lung share stays near the lungs' share of the image whatever the
model uses. Ablation asks the model instead. Every test image is scored twice more, on the model's own input:

- `lungs_only`: everything outside the lung fields set to 0, the value the preprocessing gives outside the body;
- `lungs_emptied`: the lung fields filled with their own median grey, so no nodule, mass or vessel is left in them
  while the rest of the image (body build, mediastinum, window, noise) stays as it was.

A model that found the lesion keeps its AUC on the lungs alone and falls towards 0.5 with them emptied; one that
reads the scanner or the anatomy around the lungs does the opposite (the test DeGrave et al., 2021, made of chest
radiograph models). The lung fields come from `chestct.imaging.anatomy.lung_mask`, which keeps what lies inside
them (vessels, nodules, a mass on the wall); a central mass outside the fields counts as "outside". An image in
which no lung was found is blank in `lungs_only` and unchanged in `lungs_emptied`.

With `preprocess.mask: lungs` the input already holds nothing but the lung fields (the evaluate stage then
passes its non-zero region as the mask): `lungs_only` is the model's own AUC, and `lungs_emptied` leaves a flat
silhouette, so it measures what the lungs' outline alone tells the model. The report's `kept` says which.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from chestct.evaluation.metrics import auc_with_interval


def lungs_only(images: np.ndarray, lungs: np.ndarray) -> np.ndarray:
    """(N, S, S, 1) images with every pixel outside the (N, S, S) lung masks set to 0."""
    return np.where(np.asarray(lungs, bool)[..., None], images, 0).astype(images.dtype)


def lungs_emptied(images: np.ndarray, lungs: np.ndarray) -> np.ndarray:
    """(N, S, S, 1) images with each image's lung fields filled with the median grey inside them."""
    emptied = np.array(images, copy=True)
    for image, lung in zip(emptied, np.asarray(lungs, bool), strict=True):
        if lung.any():
            image[lung] = np.median(image[lung])
    return emptied


def ablation_report(predict: Callable[[np.ndarray], np.ndarray], images: np.ndarray, labels: np.ndarray,
                    lungs: np.ndarray, level: float, resamples: int, seed: int) -> dict:
    """{ablation: {"auc", "auc_ci"}} for `lungs_only` and `lungs_emptied`; `predict` maps model inputs to cancer
    probabilities. AUCs are None when the test split holds one class."""
    images, lungs = np.asarray(images), np.asarray(lungs, bool)
    if images.shape[:3] != lungs.shape:
        raise ValueError(f"images {images.shape} and lung masks {lungs.shape} do not match")
    report = {}
    for ablate in (lungs_only, lungs_emptied):
        auc, auc_ci = auc_with_interval(labels, predict(ablate(images, lungs)), level, resamples, seed)
        report[ablate.__name__] = {"auc": auc, "auc_ci": auc_ci}
    return report
