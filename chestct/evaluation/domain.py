"""The domain check measured: the feature-distance fit, and what abstaining on out-of-domain images buys.

`fit_feature_domain` fits the second layer of the domain check (chestct.feature_domain) on the training images'
pooled features: one mean per class and one covariance shared by both, shrunk with scikit-learn's LedoitWolf
(there are fewer training images than features, and the sample covariance would be singular). The cut is
`evaluate.domain.quantile` of the validation images' distances: chosen on validation, never on test.

`selective_figures` is what a user who abstains on flagged images gets: the share still answered (coverage), and
AUC, sensitivity and specificity on that part, beside the whole set. The evaluate stage reports them for test and
validation, and the external panel for every set.
"""

from __future__ import annotations

import numpy as np
from sklearn.covariance import LedoitWolf

from chestct.evaluation.metrics import binary_metrics
from chestct.feature_domain import FeatureDomain

# Variance below (this share of the features' RMS)^2 is rounding, not signal: float formats reproduce the features
# to about 1e-6 of their size, and the Mahalanobis distance divides by the standard deviation along each direction.
# Without the floor, a barely trained model (features of 1e-6 varying by 1e-12) gives distances that differ between
# TFLite and Keras by 8% of the cut; with it, by 3%. A trained model's covariance lies far above the floor.
FEATURE_RESOLUTION = 1e-3


def fit_feature_domain(train_features: np.ndarray, train_labels: np.ndarray, valid_features: np.ndarray,
                       quantile: float) -> FeatureDomain:
    """Class-conditional Gaussians with a shared Ledoit-Wolf covariance on the train features; the cut at
    `quantile` of the validation distances."""
    features = np.asarray(train_features, np.float64)
    labels = np.asarray(train_labels)
    classes = np.unique(labels)
    if len(valid_features) == 0 or len(features) < 2:
        raise ValueError(f"the feature domain needs training and validation images (got {len(features)} and "
                         f"{len(valid_features)})")
    means = np.stack([features[labels == label].mean(axis=0) for label in classes])
    centred = features - means[np.searchsorted(classes, labels)]
    covariance = LedoitWolf(assume_centered=True).fit(centred).covariance_
    floor = (FEATURE_RESOLUTION * np.sqrt(np.mean(features ** 2))) ** 2
    precision = np.linalg.inv(covariance + floor * np.eye(len(covariance)))
    # precision = W W^T, so the squared distance (x - m)^T precision (x - m) is |(x - m) W|^2.
    whitening = np.linalg.cholesky((precision + precision.T) / 2.0)
    unfitted = FeatureDomain(means=means, whitening=whitening, cut=np.inf, quantile=quantile,
                             fitted_images=len(features), validation_images=len(valid_features))
    cut = float(np.quantile(unfitted.distances(valid_features), quantile))
    return FeatureDomain(means=means, whitening=whitening, cut=cut, quantile=quantile,
                         fitted_images=len(features), validation_images=len(valid_features))


def selective_figures(labels: np.ndarray, scores: np.ndarray, threshold: float, covered: np.ndarray,
                      level: float, resamples: int, seed: int) -> dict:
    """Coverage, and AUC (with its CI), sensitivity and specificity on the covered images (in domain) at the
    operating threshold. Undefined figures (no image covered, one class only) are None."""
    labels, scores, covered = np.asarray(labels), np.asarray(scores, np.float64), np.asarray(covered, bool)
    report = {"n": int(len(labels)), "covered": int(covered.sum()),
              "coverage": round(float(covered.mean()), 4) if len(labels) else None}
    if not covered.any():
        return report | {"auc": None, "auc_ci": None, "sensitivity": None, "specificity": None}
    metrics = binary_metrics(labels[covered], scores[covered], threshold, level=level, resamples=resamples,
                             seed=seed)
    return report | {key: metrics[key] for key in ("auc", "auc_ci", "sensitivity", "specificity")}


def _share(flags: np.ndarray) -> float | None:
    return round(float(flags.mean()), 4) if len(flags) else None


def split_domain_figures(not_chest: np.ndarray, distances: np.ndarray | None, cut: float | None) -> dict:
    """Per split: the share each layer flags and the share either flags (`out_of_domain_share`), and the mask of
    images in domain. `not_chest` is the first layer's verdict per image (True: refused); `distances` None when
    the second layer is off."""
    not_chest = np.asarray(not_chest, bool)
    unlike = np.zeros_like(not_chest) if distances is None else np.asarray(distances) > cut
    out = not_chest | unlike
    return {"out_of_domain_share": _share(out), "not_chest_share": _share(not_chest),
            "unlike_training_share": None if distances is None else _share(unlike),
            "distance_median": None if distances is None or not len(distances) else round(
                float(np.median(distances)), 3)}, ~out
