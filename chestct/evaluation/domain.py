"""The domain check measured: the feature-distance fit, and what abstaining on out-of-domain images buys.

`fit_feature_domain` fits the second layer of the domain check (chestct.feature_domain) on the training images'
pooled features: one mean per class and one covariance shared by both, shrunk with scikit-learn's LedoitWolf
(there are fewer training images than features, and the sample covariance would be singular). The cut is
`evaluate.domain.quantile` of held-out distances, never of test's (`evaluate.domain.cut_on`):
- `valid`: the validation images' distances. The official validation split is 72 images (10 distinct Normal
  slices), so its 0.99 quantile is about its maximum and moves with the seed.
- `cross_fitted`: those pooled with every training image's distance to Gaussians fitted on the other folds of
  the training images (stratified k-fold), so that no image is measured by a fit that saw it. The network did see
  the training images, which pulls their features in; measured on the real data over three seeds, the pooled cut
  flags 0.9-3.5% of the test split against validation's 1.9-6.3% (docs/calibration-domain.md).

`selective_figures` is what a user who abstains on flagged images gets: the share still answered (coverage), and
AUC, sensitivity and specificity on that part, beside the whole set. The evaluate stage reports them for test and
validation, and the external panel for every set.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
from sklearn.covariance import LedoitWolf
from sklearn.model_selection import StratifiedKFold

from chestct.evaluation.metrics import binary_metrics
from chestct.feature_domain import FeatureDomain, FeatureDomainError

# Variance below (this share of the features' RMS)^2 is rounding, not signal: float formats reproduce the features
# to about 1e-6 of their size, and the Mahalanobis distance divides by the standard deviation along each direction.
# Without the floor, a barely trained model (features of 1e-6 varying by 1e-12) gives distances that differ between
# TFLite and Keras by 8% of the cut; with it, by 3%. A trained model's covariance lies far above the floor.
FEATURE_RESOLUTION = 1e-3


def fit_feature_domain(train_features: np.ndarray, train_labels: np.ndarray, valid_features: np.ndarray,
                       quantile: float, cut_on: str = "valid", folds: int = 5, seed: int = 0) -> FeatureDomain:
    """Class-conditional Gaussians with a shared Ledoit-Wolf covariance on the train features; the cut at
    `quantile` of the validation distances, pooled with the training images' cross-fitted ones when `cut_on` is
    "cross_fitted" (`folds` stratified folds, shuffled with `seed`)."""
    features = np.asarray(train_features, np.float64)
    labels = np.asarray(train_labels)
    if len(valid_features) == 0 or len(features) < 2:
        raise ValueError(f"the feature domain needs training and validation images (got {len(features)} and "
                         f"{len(valid_features)})")
    fit = _gaussians(features, labels, quantile, len(valid_features))
    held_out = [fit.distances(valid_features)]
    basis = f"{len(valid_features)} validation images"
    if cut_on == "cross_fitted":
        held_out.append(_cross_fitted_distances(features, labels, folds, seed))
        basis = f"{len(valid_features)} validation and {len(features)} cross-fitted training images"
    elif cut_on != "valid":
        raise ValueError(f"evaluate.domain.cut_on is {cut_on!r}; use valid or cross_fitted")
    cut = float(np.quantile(np.concatenate(held_out), quantile))
    return replace(fit, cut=cut, cut_basis=basis)


def _gaussians(features: np.ndarray, labels: np.ndarray, quantile: float, validation_images: int) -> FeatureDomain:
    """The fit without a cut: one mean per class and the shared, shrunk covariance's whitening matrix."""
    classes = np.unique(labels)
    means = np.stack([features[labels == label].mean(axis=0) for label in classes])
    centred = features - means[np.searchsorted(classes, labels)]
    covariance = LedoitWolf(assume_centered=True).fit(centred).covariance_
    floor = (FEATURE_RESOLUTION * np.sqrt(np.mean(features ** 2))) ** 2
    precision = np.linalg.inv(covariance + floor * np.eye(len(covariance)))
    # precision = W W^T, so the squared distance (x - m)^T precision (x - m) is |(x - m) W|^2.
    whitening = np.linalg.cholesky((precision + precision.T) / 2.0)
    return FeatureDomain(means=means, whitening=whitening, cut=np.inf, quantile=quantile,
                         fitted_images=len(features), validation_images=validation_images)


def _cross_fitted_distances(features: np.ndarray, labels: np.ndarray, folds: int, seed: int) -> np.ndarray:
    """Each training image's distance to the Gaussians fitted on the other folds."""
    smallest = int(np.bincount(np.unique(labels, return_inverse=True)[1]).min())
    if smallest < folds:
        raise FeatureDomainError(f"evaluate.domain.folds is {folds}, but a class has only {smallest} training "
                                 f"images: lower evaluate.domain.folds, or use evaluate.domain.cut_on: valid")
    distances = np.empty(len(features))
    for fitted, held in StratifiedKFold(folds, shuffle=True, random_state=seed).split(features, labels):
        distances[held] = _gaussians(features[fitted], labels[fitted], 0.5, 0).distances(features[held])
    return distances


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
