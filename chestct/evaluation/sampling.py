"""Which train images the evaluation's audits read: all of them, or a seeded sample that keeps the class shares.

The shortcut audit fits its trivial rules on train, the histogram-matching reference is train's grey levels, and
both read every train image twice (the processed array and the raw file). On this dataset that is 700 images;
on a hospital archive it is hundreds of thousands, more than fits in memory and hours of decoding, while a linear
rule on a few numbers is fitted as well from a few thousand. `evaluate.audit_max_train_images` caps it.
"""

from __future__ import annotations

import numpy as np


def audit_rows(labels: np.ndarray, max_images: int | None, seed: int) -> np.ndarray:
    """Row indices (ascending) of at most `max_images` train images, drawn per class in proportion to its share.

    None, or a cap at or above the split's size, keeps every row, so small datasets give exactly today's audit.
    Each class present keeps at least one image, so the rules still see both classes.
    """
    labels = np.asarray(labels)
    count = len(labels)
    if max_images is None or max_images >= count:
        return np.arange(count)
    rng = np.random.default_rng(seed)
    picked = []
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        share = max(1, int(round(max_images * len(members) / count)))
        picked.append(rng.choice(members, size=min(share, len(members)), replace=False))
    return np.sort(np.concatenate(picked))
