"""out_of_fold stage: with `evaluate.threshold.chosen_on: out_of_fold`, score every train + valid image with a
fold model that never saw it or a copy of it (chestct/training/folds.py); the evaluate stage chooses the threshold
on those scores. With `chosen_on: valid` it writes the header of the scores file only and trains nothing.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from chestct.atomic_io import atomic_path
from chestct.evaluation.robustness import perturbed_split
from chestct.evaluation.scoring import near_groups, predict_scores
from chestct.imaging.processed import load_split
from chestct.params import load_params
from chestct.training.folds import out_of_fold_scores, pool
from chestct.training.loop import configure_determinism, configure_precision
from stages.errors import run_stage

PROCESSED = Path("data/processed")
RAW_DATA = Path("data/raw/Data")
MANIFEST = Path("data/split/manifest.csv")
SCORES = Path("data/out_of_fold/scores.csv")
COLUMNS = ["id", "label", "fold", "score"]


def _write(table: pd.DataFrame) -> None:
    with atomic_path(SCORES) as temp:
        table.to_csv(temp, index=False, float_format="%.9g")


def main() -> None:
    params = load_params()
    threshold = params.evaluate.threshold
    if threshold.chosen_on != "out_of_fold":
        _write(pd.DataFrame(columns=COLUMNS))
        print(f"out_of_fold: evaluate.threshold.chosen_on is {threshold.chosen_on}: nothing to train -> {SCORES}")
        return
    configure_determinism(params.seed, params.train.deterministic)
    configure_precision(params.train.precision)
    manifest = pd.read_csv(MANIFEST, keep_default_na=False)
    images = pool(load_split(PROCESSED / "train"), load_split(PROCESSED / "valid"))
    groups = near_groups(images, manifest)
    perturbed = None
    if params.train.selection == "val_auc_robust":  # the held-out folds' perturbed copies, as robust_valid's
        train_ids = manifest.loc[manifest["split"] == "train", "id"].to_numpy()
        perturbed, _ = perturbed_split(images, RAW_DATA, train_ids, params)
    print(f"out_of_fold: {threshold.folds} folds of {len(images)} train + valid images "
          f"({np.unique(groups[images.labels == 0]).size} distinct Normal slices), one training each", flush=True)
    batch = params.train.validation_batch_size
    scores, fold_of = out_of_fold_scores(params, images, perturbed, groups,
                                         lambda model, arrays: predict_scores(model, arrays, batch))
    _write(pd.DataFrame({"id": images.ids, "label": images.labels, "fold": fold_of, "score": scores}))
    print(f"out_of_fold: {len(images)} out-of-fold scores -> {SCORES}")


if __name__ == "__main__":
    run_stage("out_of_fold", main)
