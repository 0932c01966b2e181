"""The one decision rule of chestct: Cancer (1) when the probability is at least the threshold, else Normal (0).

Evaluation, the export parity check, the predictor, external validation and the plots all call `decide`, and
every report that states the rule quotes DECISION_RULE, so the rule cannot differ between two places.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

DECISION_RULE = "Cancer when probability >= threshold"


def decide(scores: Sequence[float] | np.ndarray | float, threshold: float) -> np.ndarray:
    """1 (Cancer) where score >= threshold, else 0 (Normal); an array of ints shaped like `scores`."""
    return (np.asarray(scores, dtype=float) >= threshold).astype(int)
