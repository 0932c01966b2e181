"""Out-of-fold scores over train + valid, for an operating point that rests on more than validation's few slices.

With `split.dedup: regroup` validation holds 2-3 distinct Normal slices, so a threshold chosen on it rests on two
or three images. Here train and valid are pooled and cut into k folds that keep whole near-duplicate groups
together (stratified by class); for each fold the pipeline's own two-phase recipe trains on the other folds,
selects its epochs on the held-out fold (and on a perturbed copy of it, under train.selection val_auc_robust),
and scores the held-out fold. Every train + valid image gets one score from a model that never trained on it or
on a copy of it, and the threshold can then be chosen on all the distinct slices outside test.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path

import keras
import numpy as np
from sklearn.model_selection import StratifiedGroupKFold

from chestct.errors import ChestctError
from chestct.imaging.processed import SplitArrays
from chestct.params import Params
from chestct.training.loop import compile_for_phase, exact_auc, train_phase
from chestct.training.model import build_model, load_trained_model, unfreeze_for_finetuning


class FoldError(ChestctError, ValueError):
    """The pooled images cannot be cut into the folds asked for; the message says what to change."""


def pool(first: SplitArrays, second: SplitArrays) -> SplitArrays:
    """Two splits as one in-memory split, `first`'s rows first."""
    first, second = first.in_memory(), second.in_memory()
    names = ["images", "labels", "subtypes", "ids"]
    if first.unstandardised is not None and second.unstandardised is not None:
        names.append("unstandardised")
    return SplitArrays(**{name: np.concatenate([getattr(first, name), getattr(second, name)]) for name in names})


def fold_rows(labels: np.ndarray, groups: np.ndarray, folds: int, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """(training rows, held-out rows) per fold: every row held out once, a group never on both sides, each
    held-out fold holding both classes."""
    labels, groups = np.asarray(labels), np.asarray(groups)
    for label, name in ((0, "Normal"), (1, "Cancer")):
        distinct = np.unique(groups[labels == label]).size
        if distinct < folds:
            raise FoldError(f"train + valid hold {distinct} distinct {name} slices (near-duplicate groups), fewer "
                            f"than evaluate.threshold.folds ({folds}): lower it or use "
                            "evaluate.threshold.chosen_on: valid")
    splitter = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed)
    cuts = list(splitter.split(np.zeros(len(labels)), labels, groups))
    for index, (_, held) in enumerate(cuts):
        if np.unique(labels[held]).size < 2:  # grouping can still leave a fold with one class
            raise FoldError(f"out-of-fold fold {index + 1} of {folds} holds one class only: lower "
                            "evaluate.threshold.folds")
    return cuts


def train_fold(params: Params, train: SplitArrays, held: SplitArrays, held_perturbed: SplitArrays | None,
               fold: int) -> keras.Model:
    """Both training phases on `train`, epochs selected on `held` (and `held_perturbed`): the best phase-2 model.

    Each fold has its own weight initialisation and shuffling seeds, derived from params.seed."""
    keras.utils.set_random_seed(params.seed + 1000 * (fold + 1))
    workdir = Path(tempfile.mkdtemp(prefix=f"chestct-fold{fold + 1}-"))
    try:
        model = build_model(params.model, train.image_size)
        phase = params.train.phase1
        train_phase(model, compile_for_phase(model, params, phase), train, held, params, phase,
                    f"fold {fold + 1} phase1", workdir / "phase1.keras", workdir / "live1",
                    seed_offset=10 * (fold + 1), robust_valid=held_perturbed)
        model = load_trained_model(workdir / "phase1.keras", keep_lesion_map=True)
        unfreeze_for_finetuning(model, params.model)
        phase = params.train.phase2
        train_phase(model, compile_for_phase(model, params, phase), train, held, params, phase,
                    f"fold {fold + 1} phase2", workdir / "phase2.keras", workdir / "live2",
                    seed_offset=10 * (fold + 1) + 1, robust_valid=held_perturbed)
        return load_trained_model(workdir / "phase2.keras")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def out_of_fold_scores(params: Params, images: SplitArrays, perturbed: SplitArrays | None, groups: np.ndarray,
                       predict) -> tuple[np.ndarray, np.ndarray]:
    """(scores, fold) for every row of `images`: each from the fold model that held it out.

    `perturbed` is the same rows under the robustness suite (for train.selection val_auc_robust, else None);
    `predict(model, images)` returns cancer probabilities."""
    folds = params.evaluate.threshold.folds
    scores, fold_of = np.full(len(images), np.nan), np.zeros(len(images), dtype=int)
    for fold, (train_rows, held_rows) in enumerate(fold_rows(images.labels, groups, folds, params.seed)):
        started = time.perf_counter()
        model = train_fold(params, images.take(train_rows), images.take(held_rows),
                           None if perturbed is None else perturbed.take(held_rows), fold)
        scores[held_rows] = predict(model, np.asarray(images.images[held_rows]))
        fold_of[held_rows] = fold + 1
        print(f"out_of_fold: fold {fold + 1}/{folds}: trained on {len(train_rows)}, scored {len(held_rows)} held "
              f"out (AUC {exact_auc(images.labels[held_rows], scores[held_rows]):.3f}), "
              f"{time.perf_counter() - started:.0f} s", flush=True)
    return scores, fold_of
