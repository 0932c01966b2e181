"""A fitted calibration map: the model's score -> a probability that means what it says.

The evaluate stage fits the map on the scores the threshold is chosen on (validation, or the out-of-fold scores;
never test: chestct.evaluation.calibration) and writes it beside the threshold; the export carries it in its
metadata and the predictor applies it, so every format and route shows the same calibrated probability.

Every map is strictly increasing over the scores it was fitted on, so the decision is unchanged: it is still
taken on the model's score against the threshold, and `apply(threshold)` is that threshold on the calibrated
scale (a score passes the threshold exactly when its calibrated probability passes the mapped threshold).

- none: the identity (an export without a map, or `evaluate.calibration.method: none`).
- temperature: sigmoid(logit(p) / T), one parameter.
- platt: sigmoid(a * logit(p) + b), two parameters (a > 0).
- isotonic: a piecewise-linear, strictly increasing interpolation through the fitted knots (x, y).
"""

from __future__ import annotations

from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

CalibrationMethod = Literal["none", "temperature", "platt", "isotonic"]
LOGIT_EPSILON = 1e-7  # scores are clipped to [eps, 1 - eps] before the logit: a score of exactly 0 or 1 stays finite


def logit(scores: np.ndarray) -> np.ndarray:
    clipped = np.clip(np.asarray(scores, np.float64), LOGIT_EPSILON, 1.0 - LOGIT_EPSILON)
    return np.log(clipped) - np.log1p(-clipped)


def sigmoid(values: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * np.asarray(values, np.float64)))  # overflow-free


class CalibrationMap(BaseModel):
    """The map and what it was fitted on, as it travels in models/threshold.json and the export's metadata."""

    # Unknown keys are ignored, as in every metadata record: a newer minor schema may add some.
    model_config = ConfigDict(extra="ignore", frozen=True)

    method: CalibrationMethod = "none"
    temperature: float | None = Field(default=None, gt=0.0)
    slope: float | None = Field(default=None, gt=0.0)
    intercept: float | None = None
    knots_x: list[float] | None = None
    knots_y: list[float] | None = None
    fitted_on: str | None = None  # "valid" or "out_of_fold"
    fitted_images: int | None = None

    @model_validator(mode="after")
    def _parameters(self) -> CalibrationMap:
        needed = {"none": (), "temperature": ("temperature",), "platt": ("slope", "intercept"),
                  "isotonic": ("knots_x", "knots_y")}[self.method]
        missing = [name for name in needed if getattr(self, name) is None]
        if missing:
            raise ValueError(f"calibration {self.method!r} needs {', '.join(missing)}")
        if self.method == "isotonic":
            x, y = np.asarray(self.knots_x), np.asarray(self.knots_y)
            if len(x) < 2 or len(x) != len(y) or np.any(np.diff(x) <= 0) or np.any(np.diff(y) <= 0):
                raise ValueError("isotonic calibration needs at least 2 knots, strictly increasing in x and y")
        return self

    @property
    def calibrated(self) -> bool:
        return self.method != "none"

    def apply(self, scores) -> np.ndarray:
        """Calibrated probabilities of `scores` (any shape), float64 in [0, 1]."""
        scores = np.asarray(scores, np.float64)
        if self.method == "temperature":
            return sigmoid(logit(scores) / self.temperature)
        if self.method == "platt":
            return sigmoid(self.slope * logit(scores) + self.intercept)
        if self.method == "isotonic":
            return np.interp(scores, self.knots_x, self.knots_y)
        return np.clip(scores, 0.0, 1.0)

    def describe(self) -> str:
        """One line for answers, model cards and logs."""
        if not self.calibrated:
            return "uncalibrated: the model's score, not a probability"
        where = {"valid": "validation", "out_of_fold": "out-of-fold"}.get(self.fitted_on or "", self.fitted_on)
        return f"calibrated ({self.method}, fitted on {self.fitted_images} {where} scores)"


UNCALIBRATED = CalibrationMap()
