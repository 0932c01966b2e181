"""The inserted-lesion check: can the model tell a Normal slice with a lesion put in from the same slice without?

Each Normal of a held-out split (validation in training, test in evaluate) gets one procedural lesion
(chestct.training.lesion_insertion, seeded), inserted before the pipeline's own intensity standardisation as
in training; the check is the ROC AUC of the model's scores on the inserted copies against the originals. Only
the lesion differs between the two, so no storage, brightness or scanner rule can score above 0.5 here.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from chestct.imaging.preprocess import standardise
from chestct.imaging.processed import SplitArrays
from chestct.labels import NORMAL
from chestct.params import LesionInsertionParams, PreprocessParams
from chestct.training.lesion_insertion import insert

CHECK_SALT = 7919  # the check's lesions come from a seed of their own, never the training pool's


@dataclass(frozen=True)
class LesionCheckSet:
    clean: np.ndarray  # (N, S, S, 1) uint8, the Normals as the model sees them
    inserted: np.ndarray  # (N, S, S, 1) uint8, the same Normals with one lesion each
    masks: np.ndarray  # (N, S, S) bool, where the lesion went

    def __len__(self) -> int:
        return len(self.clean)


def build_lesion_check(split: SplitArrays, insertion: LesionInsertionParams, preprocess: PreprocessParams,
                       seed: int) -> LesionCheckSet | None:
    """The check's image pairs from the Normals of `split` (None when no Normal has room for a lesion)."""
    rows = np.flatnonzero(np.asarray(split.labels) == NORMAL)
    normals = split.take(rows)
    images = np.asarray(normals.images)[..., 0]
    hosts = images if normals.unstandardised is None else np.asarray(normals.unstandardised)
    rng = np.random.default_rng([seed, CHECK_SALT])
    clean, inserted, masks = [], [], []
    for image, host in zip(images, hosts, strict=True):
        result = insert(host, rng, insertion)
        if result is None:
            continue
        restandardised = result.image if normals.unstandardised is None else standardise(result.image, preprocess)
        clean.append(image)
        inserted.append(restandardised)
        masks.append(result.mask)
    if not clean:
        return None
    return LesionCheckSet(np.stack(clean)[..., np.newaxis], np.stack(inserted)[..., np.newaxis], np.stack(masks))


def lesion_check_auc(check: LesionCheckSet, predict) -> float:
    """ROC AUC of `predict(images) -> probabilities` on the inserted copies (positive) against the originals."""
    from sklearn.metrics import roc_auc_score

    scores = np.concatenate([np.ravel(predict(check.clean)), np.ravel(predict(check.inserted))])
    labels = np.r_[np.zeros(len(check)), np.ones(len(check))]
    return float(roc_auc_score(labels, scores))
