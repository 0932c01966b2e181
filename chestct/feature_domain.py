"""Is an image like those the model was validated on? The second layer of the domain check on every prediction.

The first layer (chestct.imaging.domain) asks whether an image is an axial chest CT slice at all. This one asks
the model: how far are its own pooled features (the vector the head reads, chestct.evaluation.features) from
what it saw in training? The evaluate stage fits class-conditional Gaussians with one shared covariance on the
training images' features, shrunk with scikit-learn's LedoitWolf because there are fewer images than features
(chestct.evaluation.domain); the distance of an image is its Mahalanobis distance to the nearer class mean, and
the cut is a declared quantile (`evaluate.domain.quantile`) of held-out distances: the validation images', or,
with `evaluate.domain.cut_on: cross_fitted`, those pooled with the training images' own distances measured by
Gaussians fitted without them (chestct.evaluation.domain). At 0.99, about 1 in 100 in-domain images is flagged.
The export carries the fit (`domain.npz`, its digest in metadata.json) and the predictor applies it to the
features every format gives beside the probability.

A distance inside the cut does not make an answer right: an in-domain image can still be misread. It says the
image is not unusual for this model, which is what the validation figures rest on.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from chestct.atomic_io import atomic_path
from chestct.errors import ChestctError

DOMAIN_FILE = "domain.npz"


class FeatureDomainError(ChestctError, ValueError):
    """A feature-domain file that is missing, unreadable or does not fit the model's features."""


@dataclass(frozen=True)
class FeatureDomain:
    """Class means (C, D), the whitening matrix (D, D) of the shared precision (precision = W W^T), and the cut."""

    means: np.ndarray
    whitening: np.ndarray
    cut: float
    quantile: float
    fitted_images: int  # training images the Gaussians were fitted on
    validation_images: int  # validation images the cut was set on
    # what the cut is a quantile of, in words; files written before cut_on existed used validation alone
    cut_basis: str = "the validation images"

    @property
    def feature_dim(self) -> int:
        return int(self.means.shape[1])

    def distances(self, features: np.ndarray) -> np.ndarray:
        """Mahalanobis distance (N,) of each feature vector (N, D) to the nearer class mean."""
        features = np.asarray(features, np.float64).reshape(len(features), -1)
        if features.shape[1] != self.feature_dim:
            raise FeatureDomainError(f"the model gives {features.shape[1]} features, the domain fit expects "
                                     f"{self.feature_dim}: the export's {DOMAIN_FILE} belongs to another model; "
                                     f"rerun `dvc repro export`")
        squared = [np.sum(((features - mean) @ self.whitening) ** 2, axis=1) for mean in self.means]
        return np.sqrt(np.min(squared, axis=0))

    def reason(self, distance: float) -> str | None:
        """The answer's domain_reason for one distance; None when it is within the cut."""
        if distance <= self.cut:
            return None
        return (f"unlike the training images (distance {distance:.1f} > {self.cut:.1f}, the "
                f"{self.quantile:g} quantile of {self.cut_basis}): the model was not validated on images like "
                f"this one")

    def describe(self) -> str:
        return (f"feature distance cut {self.cut:.2f} (the {self.quantile:g} quantile of {self.cut_basis}; "
                f"Gaussians fitted on {self.fitted_images} training images, {self.feature_dim} features)")

    def save(self, path: Path) -> None:
        _save_npz(path, means=self.means, whitening=self.whitening, cut=self.cut, quantile=self.quantile,
                  fitted_images=self.fitted_images, validation_images=self.validation_images,
                  cut_basis=np.array(self.cut_basis))


def _save_npz(path: Path, **arrays) -> None:
    with atomic_path(path) as temp, open(temp, "wb") as handle:  # a handle: np.savez would append ".npz"
        np.savez(handle, **arrays)


def save_disabled(path: Path, why: str) -> None:
    """The evaluate stage's output when no fit was made (evaluate.domain.enabled false): a file saying why."""
    _save_npz(path, disabled=np.array(why))


def load_feature_domain(path: Path) -> FeatureDomain | None:
    """The fit in `path`, or None for a file written with the layer switched off."""
    try:
        with np.load(path, allow_pickle=False) as stored:
            if "disabled" in stored.files:
                return None
            return FeatureDomain(means=stored["means"], whitening=stored["whitening"], cut=float(stored["cut"]),
                                 quantile=float(stored["quantile"]), fitted_images=int(stored["fitted_images"]),
                                 validation_images=int(stored["validation_images"]),
                                 **({"cut_basis": str(stored["cut_basis"])} if "cut_basis" in stored.files else {}))
    except (OSError, ValueError, KeyError) as exc:
        raise FeatureDomainError(f"{path}: not a readable feature-domain file ({exc}); rerun `dvc repro evaluate "
                                 f"export`") from None
