"""Shortcut audit: how far do trivial image statistics get, and what is left once they are removed?

The real dataset's Normal class comes from a different source than its Cancer class and differs in global
brightness and contrast, so a one-number rule on intensity std already reaches test AUC 1.0. The evaluation
therefore compares the CNN with trivial predictors fitted on the same train split:

- `intensity_features` (mean, std), `histogram_features` (the normalised intensity histogram) and
  `geometry_features` (original width, height, aspect and file format) describe each image by what a
  shortcut would use;
- `shortcut_auc` fits StandardScaler + LogisticRegression on TRAIN only and scores ROC AUC on test;
- `reference_quantiles` + `match_to_reference` / `match_batch` remove the global-intensity cue by histogram
  matching every image onto one fixed reference distribution taken from train. After matching, every image
  has (nearly) the same intensity distribution, so mean/std/histogram carry (almost) no class information,
  while the spatial order of intensities (the anatomy, any lesion) is kept. A model that still separates the
  classes on matched images is not relying on global brightness/contrast alone.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import StandardScaler

from chestct.evaluation.scoring import predict_scores
from chestct.imaging.decode import decode_grayscale
from chestct.imaging.processed import SplitArrays
from chestct.params import EvaluateParams

if TYPE_CHECKING:  # only for annotations: external validation imports this module without TensorFlow
    import keras

GRAY_LEVELS = 256


def _as_image_list(gray_images: Sequence[np.ndarray] | np.ndarray) -> list[np.ndarray]:
    # Original images have different sizes, so a list is accepted as well as a stacked (N, S, S[, 1]) array.
    images = list(gray_images)
    if not images:
        raise ValueError("no images given")
    return [np.asarray(image) for image in images]


def intensity_features(gray_images: Sequence[np.ndarray] | np.ndarray) -> np.ndarray:
    """(N, 2) float64: each image's pixel mean and (population) std."""
    rows = []
    for image in _as_image_list(gray_images):
        pixels = image.astype(np.float64).ravel()
        if pixels.size == 0:
            raise ValueError("empty image")
        rows.append((pixels.mean(), pixels.std()))
    return np.asarray(rows, dtype=np.float64)


def histogram_features(gray_images: Sequence[np.ndarray] | np.ndarray, bins: int) -> np.ndarray:
    """(N, bins) float64: each image's intensity histogram over 0..255 in `bins` equal bins, summing to 1."""
    if bins < 1:
        raise ValueError(f"bins must be >= 1, got {bins}")
    rows = []
    for image in _as_image_list(gray_images):
        # Range (0, 256): equal-width bins over the 256 uint8 levels, 255 falls into the last bin.
        counts, _ = np.histogram(image.ravel(), bins=bins, range=(0, GRAY_LEVELS))
        total = counts.sum()
        if total == 0:
            raise ValueError("empty image")
        rows.append(counts / total)
    return np.asarray(rows, dtype=np.float64)


class GeometryFeatures:
    """width, height, aspect (width / height) and a one-hot of the file format, categories fitted on train.

    Formats are compared case-insensitively; a format not seen in `fit` gets an all-zero one-hot (like
    sklearn's OneHotEncoder(handle_unknown="ignore")), so test-only formats never break the transform.
    """

    def __init__(self) -> None:
        self.categories_: list[str] | None = None

    @staticmethod
    def _normalise(formats: Iterable[str]) -> list[str]:
        return [str(fmt).strip().upper() for fmt in formats]

    def fit(self, formats: Iterable[str]) -> GeometryFeatures:
        self.categories_ = sorted(set(self._normalise(formats)))
        return self

    def transform(self, widths, heights, formats) -> np.ndarray:
        if self.categories_ is None:
            raise RuntimeError("GeometryFeatures must be fitted (on train formats) before transform")
        widths = np.asarray(widths, dtype=np.float64)
        heights = np.asarray(heights, dtype=np.float64)
        names = self._normalise(formats)
        if not (len(widths) == len(heights) == len(names)):
            raise ValueError(f"lengths differ: {len(widths)} widths, {len(heights)} heights, {len(names)} formats")
        if np.any(heights <= 0) or np.any(widths <= 0):
            raise ValueError("widths and heights must be positive")
        one_hot = np.zeros((len(names), len(self.categories_)), dtype=np.float64)
        index = {name: column for column, name in enumerate(self.categories_)}
        for row, name in enumerate(names):
            if name in index:
                one_hot[row, index[name]] = 1.0
        return np.column_stack([widths, heights, widths / heights, one_hot])

    @property
    def feature_names(self) -> list[str]:
        if self.categories_ is None:
            raise RuntimeError("GeometryFeatures is not fitted")
        return ["width", "height", "aspect", *(f"format_{name}" for name in self.categories_)]


def geometry_features(widths, heights, formats, encoder: GeometryFeatures | None = None) -> np.ndarray:
    """(N, 3 + F) float64: width, height, aspect, one-hot format.

    Without `encoder`, the format categories are fitted on these very rows: call it that way on TRAIN, and
    pass the train-fitted `GeometryFeatures` for test (`GeometryFeatures().fit(train_formats)`).
    """
    if encoder is None:
        encoder = GeometryFeatures().fit(formats)
    return encoder.transform(widths, heights, formats)


def fit_shortcut_model(train_X: np.ndarray, train_y: np.ndarray) -> Pipeline:
    """StandardScaler + LogisticRegression(max_iter=1000), fitted on the given (train) rows only."""
    train_X = np.asarray(train_X, dtype=np.float64)
    train_y = np.asarray(train_y)
    if train_X.ndim == 1:
        train_X = train_X[:, None]
    if len(np.unique(train_y)) < 2:
        raise ValueError("the shortcut model needs both classes in train")
    return make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000)).fit(train_X, train_y)


def shortcut_auc(train_X: np.ndarray, train_y: np.ndarray, test_X: np.ndarray, test_y: np.ndarray) -> float | None:
    """Test ROC AUC of a linear model on shortcut features fitted on train only; None if test has one class."""
    test_X = np.asarray(test_X, dtype=np.float64)
    test_y = np.asarray(test_y)
    if test_X.ndim == 1:
        test_X = test_X[:, None]
    if len(np.unique(test_y)) < 2:
        return None  # AUC is undefined with a single class
    model = fit_shortcut_model(train_X, train_y)
    return float(roc_auc_score(test_y, model.predict_proba(test_X)[:, 1]))


# --- removing the global-intensity cue: histogram matching -------------------------------------------------


def reference_quantiles(images: np.ndarray | Sequence[np.ndarray], points: int = 256) -> np.ndarray:
    """(points,) float64: the mean over (train) images of each image's pixel quantiles at linspace(0, 1, points).

    Averaging quantiles (not pooling pixels) gives a typical image's distribution, one fixed target that
    every image, train or test, is matched to. `images` is a stack (N, S, S[, 1]) or a list of any sizes.
    """
    if points < 2:
        raise ValueError(f"points must be >= 2, got {points}")
    probabilities = np.linspace(0.0, 1.0, points)
    if isinstance(images, np.ndarray):
        if images.ndim < 2 or len(images) == 0:
            raise ValueError(f"expected a stack of images (N, S, S[, 1]), got shape {images.shape}")
        pixels = images.reshape(len(images), -1).astype(np.float64)
        return np.quantile(pixels, probabilities, axis=1).mean(axis=1)
    quantiles = [np.quantile(image.astype(np.float64).ravel(), probabilities) for image in _as_image_list(images)]
    return np.mean(quantiles, axis=0)


def match_to_reference(image: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """Histogram-match one uint8 image ((S, S, 1) or (S, S)) onto `reference` quantiles; uint8, same shape.

    Each gray level v is given its position in the image's own empirical CDF, the mean rank of the pixels
    equal to v scaled to 0..1 ((count below v + (count of v - 1) / 2) / (n - 1)); that position is mapped
    through the reference quantile function (np.interp over linspace(0, 1, len(reference))) and rounded.
    The mapping is a non-decreasing function of the gray level, so:
    - equal pixels stay equal (ties share one mean rank) and the spatial order of intensities is kept;
    - a unique darkest pixel goes to the reference minimum, a unique brightest to its maximum, and the output's
      distribution is (up to ties and rounding) the reference's, whatever the input's brightness/contrast.
    """
    image = np.asarray(image)
    if image.dtype != np.uint8:
        raise ValueError(f"image must be uint8, got {image.dtype}")
    if image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[-1] != 1):
        raise ValueError(f"image must be (S, S) or (S, S, 1), got shape {image.shape}")
    reference = np.asarray(reference, dtype=np.float64)
    if reference.ndim != 1 or len(reference) < 2:
        raise ValueError("reference must be a 1-D array of at least 2 quantiles")
    if np.any(np.diff(reference) < 0):
        raise ValueError("reference quantiles must be non-decreasing")

    # uint8 has only 256 levels: compute the mapping once per level (a lookup table) instead of per pixel.
    counts = np.bincount(image.ravel(), minlength=GRAY_LEVELS).astype(np.float64)
    total = counts.sum()
    below = np.cumsum(counts) - counts
    mean_rank = below + (counts - 1.0) / 2.0
    position = mean_rank / (total - 1.0) if total > 1 else np.full(GRAY_LEVELS, 0.5)
    levels = np.interp(position, np.linspace(0.0, 1.0, len(reference)), reference)
    table = np.clip(np.rint(levels), 0, GRAY_LEVELS - 1).astype(np.uint8)
    return table[image]


def match_batch(images: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """`match_to_reference` on every image of an (N, S, S, 1) uint8 stack; same shape and dtype."""
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[-1] != 1:
        raise ValueError(f"images must be (N, S, S, 1), got shape {images.shape}")
    matched = np.empty_like(images)
    for index, image in enumerate(images):
        matched[index] = match_to_reference(image, reference)
    return matched


# --- the evaluate stage's audit -------------------------------------------------------------------------


def raw_grayscale(ids: np.ndarray, raw_data: Path) -> list[np.ndarray]:
    """The stored images of a split, decoded to grayscale as they are on disk (before any preprocessing)."""
    return [decode_grayscale(raw_data / str(image_id)) for image_id in ids]


def shortcut_audit(model: keras.Model, train: SplitArrays, test: SplitArrays, test_scores: np.ndarray,
                   manifest: pd.DataFrame, train_gray: list[np.ndarray], test_gray: list[np.ndarray],
                   params: EvaluateParams, batch_size: int) -> dict:
    """Trivial predictors fitted on train (on the images as stored), and the model on histogram-matched test.

    If a trivial predictor reaches the model's AUC, the test split cannot tell the model from a brightness
    rule; if the model's AUC drops on matched images, it leaned on global intensity.
    """
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
