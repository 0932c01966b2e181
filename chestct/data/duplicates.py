"""Exact and near-duplicate groups, and which valid/test images leak from another split.

Exact duplicates share a sha256. Near duplicates have perceptual hashes within a Hamming distance (re-saved,
re-encoded or slightly altered copies); near groups are the connected components of that relation, so an
exact group always lies inside one near group.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from scipy.sparse import csr_matrix
from scipy.sparse.csgraph import connected_components

from chestct.data.records import phash_bits


def exact_groups(sha256: pd.Series) -> np.ndarray:
    """Group number per image: images with the same bytes share one (numbered in order of appearance)."""
    codes, _ = pd.factorize(sha256)
    return codes


def near_groups(phashes: pd.Series, max_distance: int) -> np.ndarray:
    """Group number per image: connected components of 'perceptual hashes differ in <= max_distance bits'."""
    if len(phashes) == 0:
        return np.zeros(0, dtype=int)
    # Hamming distance of every pair from two matrix products (exact integers, fast for thousands of images).
    ones = phash_bits(phashes).astype(np.int32)
    distance = ones @ (1 - ones).T + (1 - ones) @ ones.T
    adjacency = csr_matrix(distance <= max_distance)
    _, labels = connected_components(adjacency, directed=False)
    # Renumber in order of first appearance so the numbers are stable and readable.
    codes, _ = pd.factorize(labels)
    return codes


def add_duplicate_columns(table: pd.DataFrame, max_distance: int) -> pd.DataFrame:
    """Add exact_group, near_group and the sizes of both groups."""
    table = table.copy()
    table["exact_group"] = exact_groups(table["sha256"])
    table["near_group"] = near_groups(table["phash"], max_distance)
    table["exact_group_size"] = table.groupby("exact_group")["id"].transform("size")
    table["near_group_size"] = table.groupby("near_group")["id"].transform("size")
    return table


def add_leak_columns(table: pd.DataFrame) -> pd.DataFrame:
    """dup_in_<split>: the image has an exact or near duplicate (another file) in that split."""
    table = table.copy()
    for split in ("train", "valid", "test"):
        members = table["split"] == split
        counts = table.loc[members].groupby("near_group")["id"].size()
        in_split = table["near_group"].map(counts).fillna(0).astype(int)
        # An image is not its own duplicate.
        in_split -= members.astype(int)
        table[f"dup_in_{split}"] = in_split > 0
    return table


def cross_class_groups(table: pd.DataFrame, column: str) -> int:
    """Exact-duplicate groups whose copies sit under more than one value of `column` (subtype or label)."""
    spread = table.groupby("exact_group")[column].nunique()
    return int((spread > 1).sum())


def duplicate_summary(table: pd.DataFrame) -> dict:
    exact_sizes = table.groupby("exact_group").size()
    near_sizes = table.groupby("near_group").size()
    return {
        "exact_groups": int((exact_sizes > 1).sum()),
        "exact_redundant_files": int((exact_sizes - 1).sum()),
        "near_groups": int((near_sizes > 1).sum()),
        "near_redundant_files": int((near_sizes - 1).sum()),
        "largest_near_group": int(near_sizes.max()) if len(near_sizes) else 0,
    }
