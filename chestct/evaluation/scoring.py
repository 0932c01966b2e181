"""The evaluate stage's scoring: every image scored once, metrics per split, the leak-free subset, Grad-CAM picks.

Nothing here is chosen on the test split: the threshold comes from validation scores only (chestct.evaluation.
thresholds), and the test figures are computed at that frozen threshold.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from chestct.decision import decide
from chestct.evaluation.metrics import auc_interval_by_group, binary_metrics, roc_band
from chestct.imaging.processed import SplitArrays
from chestct.params import EvaluateParams

if TYPE_CHECKING:  # only for annotations: external validation imports this module without TensorFlow
    import keras


def predict_scores(model: keras.Model, images: np.ndarray, batch_size: int) -> np.ndarray:
    """Cancer probability for every image, in order, in one pass (none dropped)."""
    from chestct.tf_data import array_batches

    scores = model.predict(array_batches(images, batch_size), verbose=0).astype(np.float64).ravel()
    if len(scores) != len(images):
        raise RuntimeError(f"scored {len(scores)} of {len(images)} images")
    return scores


def split_metrics(arrays: SplitArrays, scores: np.ndarray, threshold: float, params: EvaluateParams,
                  seed: int, members: np.ndarray | None = None) -> dict:
    keep = np.ones(len(scores), bool) if members is None else members
    return binary_metrics(arrays.labels[keep], scores[keep], threshold, level=params.confidence_level,
                          resamples=params.bootstrap_resamples, seed=seed, subtypes=arrays.subtypes[keep])


def leak_free_mask(test: SplitArrays, manifest: pd.DataFrame) -> np.ndarray:
    """Test images with no exact or near duplicate in train or valid (flags from the split stage)."""
    flags = manifest.set_index("id").loc[test.ids.astype(str), ["dup_in_train", "dup_in_valid"]]
    leaking = flags.astype(str).apply(lambda column: column.str.lower() == "true").any(axis=1)
    return ~leaking.to_numpy()


# Below this many distinct Normal slices in validation, the operating point rests on too few images to transfer.
FEW_DISTINCT_NORMALS = 5


def near_groups(arrays: SplitArrays, manifest: pd.DataFrame) -> np.ndarray:
    """Each image's near-duplicate group from the split stage's manifest, in the arrays' order."""
    return manifest.set_index("id").loc[arrays.ids.astype(str), "near_group"].to_numpy()


def distinct_slices(arrays: SplitArrays, manifest: pd.DataFrame) -> dict[str, int]:
    """Distinct slices per class: near-duplicate groups from the split stage, not images.

    The real data holds 215 Normal images but only 33 distinct Normal slices (the rest are copies): a split's
    Normal count overstates how much evidence its specificity, or a threshold chosen on it, rests on.
    """
    groups = near_groups(arrays, manifest)
    return {"normal_slices": int(np.unique(groups[arrays.labels == 0]).size),
            "cancer_slices": int(np.unique(groups[arrays.labels == 1]).size)}


def auc_interval_by_slice(arrays: SplitArrays, scores: np.ndarray, manifest: pd.DataFrame, params: EvaluateParams,
                          seed: int) -> dict:
    """{"auc_ci_by_slice": the AUC's interval with whole near-duplicate groups resampled}: the image-level
    interval counts each copy of a slice as new evidence, so on a split full of copies it is too narrow."""
    return {"auc_ci_by_slice": auc_interval_by_group(arrays.labels, scores, near_groups(arrays, manifest),
                                                     params.confidence_level, params.bootstrap_resamples, seed)}


def roc_band_for(labels: np.ndarray, scores: np.ndarray, params: EvaluateParams, seed: int) -> dict:
    band = roc_band(labels, scores, resamples=params.bootstrap_resamples, seed=seed, level=params.confidence_level)
    return {**band, "level": params.confidence_level}


def gradcam_selection(labels: np.ndarray, scores: np.ndarray, threshold: float, count: int) -> list[tuple[int, str]]:
    """Up to `count` test images spread over TP, FP, TN, FN, the most confident of each first."""
    decisions = decide(scores, threshold).astype(bool)
    groups = {
        "TP": np.flatnonzero(decisions & (labels == 1)),
        "FP": np.flatnonzero(decisions & (labels == 0)),
        "TN": np.flatnonzero(~decisions & (labels == 0)),
        "FN": np.flatnonzero(~decisions & (labels == 1)),
    }
    confidence = np.abs(scores - threshold)
    ranked = {name: list(members[np.argsort(-confidence[members])]) for name, members in groups.items()}
    chosen: list[tuple[int, str]] = []
    while len(chosen) < count and any(ranked.values()):
        for name in ("TP", "FP", "TN", "FN"):
            if ranked[name] and len(chosen) < count:
                chosen.append((int(ranked[name].pop(0)), name))
    return chosen
