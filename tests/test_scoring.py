"""The evaluate stage's scoring helpers: distinct slices per class, the leak-free subset."""

from __future__ import annotations

import numpy as np
import pandas as pd

from chestct.evaluation.scoring import distinct_slices, leak_free_mask
from chestct.imaging.processed import SplitArrays


def _split(ids: list[str], labels: list[int]) -> SplitArrays:
    count = len(ids)
    return SplitArrays(images=np.zeros((count, 4, 4, 1), np.uint8), labels=np.asarray(labels),
                       subtypes=np.asarray(["x"] * count), ids=np.asarray(ids))


def test_distinct_slices_count_near_duplicate_groups_not_images():
    # six copies of one Normal slice, one other Normal, and three Cancer slices of which two are copies
    manifest = pd.DataFrame({
        "id": [f"n{i}" for i in range(7)] + ["c0", "c1", "c2"],
        "near_group": [5, 5, 5, 5, 5, 5, 9, 1, 1, 2],
        "dup_in_train": ["False"] * 10, "dup_in_valid": ["False"] * 10,
    })
    split = _split([f"n{i}" for i in range(7)] + ["c0", "c1", "c2"], [0] * 7 + [1] * 3)
    assert distinct_slices(split, manifest) == {"normal_slices": 2, "cancer_slices": 2}
    # only the members of this split count, in any order
    subset = _split(["c2", "n6", "n0"], [1, 0, 0])
    assert distinct_slices(subset, manifest) == {"normal_slices": 2, "cancer_slices": 1}


def test_leak_free_mask_drops_images_with_a_duplicate_in_train_or_valid():
    manifest = pd.DataFrame({"id": ["a", "b", "c"], "near_group": [0, 1, 2],
                             "dup_in_train": ["True", "False", "False"], "dup_in_valid": ["False", "False", "True"]})
    np.testing.assert_array_equal(leak_free_mask(_split(["a", "b", "c"], [0, 1, 0]), manifest), [False, True, False])
