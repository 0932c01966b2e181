"""The threshold chosen on out-of-fold scores (`evaluate.threshold.chosen_on: out_of_fold`).

The out_of_fold stage scores every train + valid image with a fold model that never trained on it
(chestct/training/folds.py) and writes data/out_of_fold/scores.csv. Here those scores are checked against the
current split and the threshold is chosen on them, by the same `evaluate.threshold.method` and code as on
validation. The pipeline's own model then uses that threshold: it is trained by the same recipe on train, so its
scores are on a similar scale, and the threshold rests on every distinct Normal slice outside test instead of
validation's few. Test is never read here.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.metrics import roc_auc_score

from chestct.errors import ChestctError
from chestct.evaluation.thresholds import choose_threshold
from chestct.params import ThresholdParams

RERUN = "rerun `dvc repro out_of_fold` (evaluate.threshold.chosen_on: out_of_fold)"


class OutOfFoldError(ChestctError, ValueError):
    """The out-of-fold scores are missing, stale or malformed; the message names the file and what to run."""


def read_scores(path: Path, expected_ids: set[str]) -> pd.DataFrame:
    """data/out_of_fold/scores.csv as a table (id, label, fold, score), checked to cover `expected_ids` (train +
    valid) exactly once each, with a finite score in [0, 1] for every row."""
    try:
        table = pd.read_csv(path, dtype={"id": str}, keep_default_na=False)
    except FileNotFoundError:
        raise OutOfFoldError(f"{path}: not found; {RERUN}") from None
    missing_columns = {"id", "label", "fold", "score"} - set(table.columns)
    if missing_columns:
        raise OutOfFoldError(f"{path}: missing columns {sorted(missing_columns)}; {RERUN}")
    if table.empty:
        raise OutOfFoldError(f"{path} is empty: it was written with chosen_on valid; {RERUN}")
    scores = pd.to_numeric(table["score"], errors="coerce").to_numpy(dtype=float)
    if not np.all(np.isfinite(scores)) or scores.min() < 0 or scores.max() > 1:
        raise OutOfFoldError(f"{path}: every score must be a probability in [0, 1]; {RERUN}")
    ids = table["id"].astype(str)
    if ids.duplicated().any() or set(ids) != expected_ids:
        raise OutOfFoldError(f"{path} does not score exactly the current train + valid images "
                             f"({len(table)} rows for {len(expected_ids)} images): it is stale; {RERUN}")
    return table.assign(score=scores, label=table["label"].astype(int))


def choose_out_of_fold_threshold(table: pd.DataFrame, groups: pd.Series, params: ThresholdParams) -> dict:
    """choose_threshold on the out-of-fold scores; its rates are named out_of_fold_* and the pool is described
    (images, distinct Normal slices, folds, pooled AUC). `groups` maps image id to its near-duplicate group."""
    labels, scores = table["label"].to_numpy(), table["score"].to_numpy()
    choice = choose_threshold(labels, scores, params)
    renamed = {key.replace("valid_", "out_of_fold_", 1) if key.startswith("valid_") else key: value
               for key, value in choice.items()}
    normals = groups.loc[table.loc[labels == 0, "id"]].nunique()
    return renamed | {"chosen_on": "out_of_fold", "out_of_fold": {
        "images": len(table), "normal_images": int((labels == 0).sum()), "normal_slices": int(normals),
        "folds": int(table["fold"].nunique()), "auc": float(roc_auc_score(labels, scores))}}
