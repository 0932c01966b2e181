"""Read a processed split folder (`data/processed/<split>/`) into plain arrays, for tests that inspect it."""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import numpy as np

from chestct.imaging.processed import load_split


@contextmanager
def split_arrays(folder: str | Path):
    """{"images", "labels", "subtypes", "ids"[, "unstandardised"]} as numpy arrays, in index (manifest) order."""
    split = load_split(folder)
    arrays = {"images": np.asarray(split.images), "labels": split.labels, "subtypes": split.subtypes,
              "ids": split.ids}
    if split.unstandardised is not None:
        arrays["unstandardised"] = np.asarray(split.unstandardised)
    yield arrays
