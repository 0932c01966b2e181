"""Apply split.dedup to the scanned records: keep, drop_leaks or regroup.

- keep: the official split untouched; leaks are only reported.
- drop_leaks: remove from valid/test every image whose (near-)duplicate group reaches train.
- regroup: pool everything and split again with whole duplicate groups kept together, stratified by subtype.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from sklearn.model_selection import StratifiedGroupKFold

from chestct.data.duplicates import add_leak_columns
from chestct.params import SplitParams

# regroup assigns folds of 1/REGROUP_FOLDS of the data, so fractions are honoured to the nearest 5%.
REGROUP_FOLDS = 20


def _drop_leaks(table: pd.DataFrame) -> tuple[pd.DataFrame, dict]:
    flagged = add_leak_columns(table)
    leaking = flagged["split"].isin(["valid", "test"]) & flagged["dup_in_train"]
    dropped = {split: int((leaking & (flagged["split"] == split)).sum()) for split in ("valid", "test")}
    return table.loc[~leaking].reset_index(drop=True), dropped


def _fold_counts(fractions: dict[str, float]) -> dict[str, int]:
    """Whole folds per split that add up to REGROUP_FOLDS, each split getting at least one."""
    raw = {split: fraction * REGROUP_FOLDS for split, fraction in fractions.items()}
    counts = {split: max(1, int(np.floor(value))) for split, value in raw.items()}
    while sum(counts.values()) < REGROUP_FOLDS:
        split = max(raw, key=lambda s: raw[s] - counts[s])
        counts[split] += 1
    while sum(counts.values()) > REGROUP_FOLDS:
        split = max((s for s in counts if counts[s] > 1), key=lambda s: counts[s] - raw[s])
        counts[split] -= 1
    return counts


def _regroup(table: pd.DataFrame, params: SplitParams, seed: int) -> pd.DataFrame:
    n_folds = min(REGROUP_FOLDS, table["near_group"].nunique(), int(table["subtype"].value_counts().min()))
    if n_folds < 3:
        raise ValueError("split.dedup regroup needs at least 3 duplicate groups per class; use keep instead")
    splitter = StratifiedGroupKFold(n_splits=n_folds, shuffle=True, random_state=seed)
    fold_of = np.empty(len(table), dtype=int)
    for fold, (_, members) in enumerate(splitter.split(table, table["subtype"], groups=table["near_group"])):
        fold_of[members] = fold
    counts = _fold_counts(params.fractions.model_dump())
    # Scale fold boundaries when there are fewer folds than REGROUP_FOLDS.
    boundaries = np.cumsum([counts["train"], counts["valid"]]) * n_folds / REGROUP_FOLDS
    train_end, valid_end = (int(round(b)) for b in boundaries)
    train_end = min(max(train_end, 1), n_folds - 2)
    valid_end = min(max(valid_end, train_end + 1), n_folds - 1)
    new_split = np.where(fold_of < train_end, "train", np.where(fold_of < valid_end, "valid", "test"))
    regrouped = table.copy()
    regrouped["split"] = new_split
    return regrouped


def apply_dedup(table: pd.DataFrame, params: SplitParams, seed: int) -> tuple[pd.DataFrame, dict]:
    """Return the final split table (with original_split and dup_in_* columns) and what dedup changed."""
    table = table.copy()
    table["original_split"] = table["split"]
    dropped = {"valid": 0, "test": 0}
    if params.dedup == "drop_leaks":
        table, dropped = _drop_leaks(table)
    elif params.dedup == "regroup":
        table = _regroup(table, params, seed)
    moved = int((table["split"] != table["original_split"]).sum())
    return add_leak_columns(table), {"mode": params.dedup, "dropped": dropped, "moved": moved}
