"""The evaluate stage's work: score every image once, choose the threshold on validation, report honestly.

Nothing here is chosen on the test split: the threshold comes from validation scores only, the trivial
shortcut predictors are fitted on train only, and the histogram-matching reference comes from train.
"""

from __future__ import annotations

from pathlib import Path

import keras
import numpy as np
import pandas as pd

from chestct.clinical_metrics import binary_metrics, roc_band
from chestct.imaging import decode_grayscale
from chestct.input_pipeline import SplitArrays
from chestct.params import EvaluateParams
from chestct.shortcuts import (
    GeometryFeatures,
    histogram_features,
    intensity_features,
    match_batch,
    reference_quantiles,
    shortcut_auc,
)


def predict_scores(model: keras.Model, images: np.ndarray, batch_size: int) -> np.ndarray:
    """Cancer probability for every image, in order, in one pass (none dropped)."""
    scores = model.predict(images, batch_size=batch_size, verbose=0).astype(np.float64).ravel()
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


def _raw_grayscale(ids: np.ndarray, raw_data: Path) -> list[np.ndarray]:
    return [decode_grayscale(raw_data / str(image_id)) for image_id in ids]


def shortcut_audit(model: keras.Model, train: SplitArrays, test: SplitArrays, test_scores: np.ndarray,
                   manifest: pd.DataFrame, raw_data: Path, params: EvaluateParams, batch_size: int) -> dict:
    """Trivial predictors fitted on train (on the images as stored), and the model on histogram-matched test.

    If a trivial predictor reaches the model's AUC, the test split cannot tell the model from a brightness
    rule; if the model's AUC drops on matched images, it leaned on global intensity.
    """
    from sklearn.metrics import roc_auc_score

    train_gray, test_gray = _raw_grayscale(train.ids, raw_data), _raw_grayscale(test.ids, raw_data)
    by_id = manifest.set_index("id")
    train_rows, test_rows = by_id.loc[train.ids.astype(str)], by_id.loc[test.ids.astype(str)]

    def geometry(rows: pd.DataFrame) -> pd.DataFrame:
        return rows[["width", "height", "format"]].reset_index(drop=True)

    reference = reference_quantiles(train.images)
    matched_scores = predict_scores(model, match_batch(test.images, reference), batch_size)
    two_classes = len(np.unique(test.labels)) == 2
    return {
        "model_auc": float(roc_auc_score(test.labels, test_scores)) if two_classes else None,
        "intensity_std_auc": shortcut_auc(intensity_features(train_gray), train.labels,
                                          intensity_features(test_gray), test.labels),
        "histogram_auc": shortcut_auc(histogram_features(train_gray, params.histogram_bins), train.labels,
                                      histogram_features(test_gray, params.histogram_bins), test.labels),
        "geometry_auc": _geometry_auc(geometry(train_rows), train.labels, geometry(test_rows), test.labels),
        "hist_matched_model_auc": float(roc_auc_score(test.labels, matched_scores)) if two_classes else None,
    }


def _geometry_auc(train_rows: pd.DataFrame, train_labels, test_rows: pd.DataFrame, test_labels) -> float | None:
    """Width, height, aspect and real file format: the format categories come from train."""
    encoder = GeometryFeatures().fit(train_rows["format"])

    def features(rows: pd.DataFrame) -> np.ndarray:
        return encoder.transform(rows["width"], rows["height"], rows["format"])

    return shortcut_auc(features(train_rows), train_labels, features(test_rows), test_labels)


def roc_band_for(labels: np.ndarray, scores: np.ndarray, params: EvaluateParams, seed: int) -> dict:
    band = roc_band(labels, scores, resamples=params.bootstrap_resamples, seed=seed, level=params.confidence_level)
    return {**band, "level": params.confidence_level}


def gradcam_selection(labels: np.ndarray, scores: np.ndarray, threshold: float, count: int) -> list[tuple[int, str]]:
    """Up to `count` test images spread over TP, FP, TN, FN, the most confident of each first."""
    decisions = scores >= threshold
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
