"""Calibration: fitted on the scores the threshold is chosen on, reported on test before and after.

The map (chestct.calibration) is fitted on validation, or on the out-of-fold scores when the threshold is chosen
there (`evaluate.threshold.chosen_on`); test only measures it. Reported on test, before and after:
- ECE, the expected calibration error over equal-mass bins (each holds about n / bins images, so no bin is a
  handful of images), with a bootstrap percentile interval;
- the Brier score;
- the reliability curve (mean probability against the share of Cancer, per equal-mass bin);
- the ECE an increasing map could reach on test (`test_ece_reachable`), which tells a map fitted on too few or
  unrepresentative scores (ECE far above it) from a model whose test ranking leaves no map calibrated (both high).
Every method is fitted and reported side by side (`methods`), so the default is chosen by measurement; the one
`evaluate.calibration.method` names is the one exported.
"""

from __future__ import annotations

import numpy as np
from scipy.optimize import minimize_scalar
from sklearn.isotonic import IsotonicRegression
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import brier_score_loss

from chestct.calibration import CalibrationMap, logit, sigmoid
from chestct.errors import ChestctError
from chestct.evaluation.metrics import percentile_interval
from chestct.evaluation.thresholds import as_labels_and_scores

METHODS = ("temperature", "platt", "isotonic")
ISOTONIC_RAMP = 1e-6  # added per knot so the isotonic map is strictly increasing (decisions cannot change)


class CalibrationError(ChestctError, ValueError):
    """The scores cannot be calibrated (one class, or no spread); the message says which and what to do."""


def _fit_temperature(labels: np.ndarray, scores: np.ndarray) -> dict:
    logits = logit(scores)

    def negative_log_likelihood(log_temperature: float) -> float:
        probabilities = np.clip(sigmoid(logits / np.exp(log_temperature)), 1e-12, 1 - 1e-12)
        return -float(np.mean(labels * np.log(probabilities) + (1 - labels) * np.log1p(-probabilities)))

    best = minimize_scalar(negative_log_likelihood, bounds=(-5.0, 5.0), method="bounded")
    return {"temperature": float(np.exp(best.x))}


def _fit_platt(labels: np.ndarray, scores: np.ndarray) -> dict:
    regression = LogisticRegression(C=np.inf).fit(logit(scores)[:, np.newaxis], labels)
    slope = float(regression.coef_[0, 0])
    if slope <= 0:
        raise CalibrationError(f"platt calibration: the scores rank Cancer below Normal on the fitting split "
                               f"(slope {slope:.3g}); use evaluate.calibration.method: temperature or none")
    return {"slope": slope, "intercept": float(regression.intercept_[0])}


def _fit_isotonic(labels: np.ndarray, scores: np.ndarray) -> dict:
    regression = IsotonicRegression(y_min=0.0, y_max=1.0, out_of_bounds="clip").fit(scores, labels)
    x, y = np.asarray(regression.X_thresholds_, float), np.asarray(regression.y_thresholds_, float)
    if len(x) < 2:
        raise CalibrationError("isotonic calibration: every fitting score is the same; use method: none")
    steps = np.arange(len(y))
    y = y * (1.0 - ISOTONIC_RAMP * (len(y) - 1)) + ISOTONIC_RAMP * steps  # strictly increasing, still in [0, 1]
    return {"knots_x": x.tolist(), "knots_y": y.tolist()}


_FITS = {"temperature": _fit_temperature, "platt": _fit_platt, "isotonic": _fit_isotonic}


def fit_calibration(labels, scores, method: str, fitted_on: str) -> CalibrationMap:
    """The `method` map fitted on (labels, scores) of the `fitted_on` split; method none gives the identity."""
    labels, scores = as_labels_and_scores(labels, scores, f"calibration ({fitted_on})")
    if method == "none":
        return CalibrationMap()
    if method not in _FITS:
        raise CalibrationError(f"evaluate.calibration.method: unknown method {method!r} "
                               f"(none, {', '.join(METHODS)})")
    if len(np.unique(labels)) < 2:
        raise CalibrationError(f"calibration needs both classes on the {fitted_on} scores; use method: none")
    return CalibrationMap(method=method, fitted_on=fitted_on, fitted_images=len(labels),
                          **_FITS[method](labels.astype(float), scores))


def _equal_mass_bins(probabilities: np.ndarray, bins: int) -> list[np.ndarray]:
    order = np.argsort(probabilities, kind="stable")
    return [members for members in np.array_split(order, min(bins, len(order))) if len(members)]


def reliability_curve(labels, probabilities, bins: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(mean probability, share of Cancer, images) per equal-mass bin, in increasing probability."""
    labels, probabilities = np.asarray(labels, float), np.asarray(probabilities, float)
    groups = _equal_mass_bins(probabilities, bins)
    return (np.array([probabilities[g].mean() for g in groups]), np.array([labels[g].mean() for g in groups]),
            np.array([len(g) for g in groups]))


def expected_calibration_error(labels, probabilities, bins: int) -> float:
    predicted, observed, counts = reliability_curve(labels, probabilities, bins)
    return float(np.sum(counts * np.abs(predicted - observed)) / np.sum(counts))


def ece_with_interval(labels, probabilities, bins: int, level: float, resamples: int, seed: int,
                      groups=None) -> tuple[float, list[float]]:
    """ECE and its bootstrap percentile interval, bins redrawn each time. Images are resampled with replacement;
    with `groups` (one id per image: its near-duplicate group), whole groups are, so that copies of one slice
    count as the one piece of evidence they are (the official test split's 54 Normals are 14 slices)."""
    labels, probabilities = np.asarray(labels, float), np.asarray(probabilities, float)
    _, inverse = np.unique(np.arange(len(labels)) if groups is None else np.asarray(groups), return_inverse=True)
    units = [np.flatnonzero(inverse == unit) for unit in range(inverse.max() + 1)]
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, len(units), size=(int(resamples), len(units)))
    values = []
    for draw in draws:
        picked = np.concatenate([units[unit] for unit in draw])
        values.append(expected_calibration_error(labels[picked], probabilities[picked], bins))
    low, high = percentile_interval(np.array(values), level)
    return expected_calibration_error(labels, probabilities, bins), [float(low), float(high)]


def reachable_ece(labels, scores, bins: int) -> float:
    """The lowest ECE any increasing map of `scores` reaches on (labels, scores): such a map keeps the images'
    order, so its equal-mass bins hold the same images, and the best it can give each bin is the share of Cancer
    made non-decreasing across bins (weighted isotonic regression of the bins' shares, i.e. pooling the adjacent
    bins that rank the wrong way). For reading a test ECE only: it is fitted on the labels it is measured on."""
    _, observed, counts = reliability_curve(labels, scores, bins)
    positions = np.arange(len(observed))
    best = IsotonicRegression().fit(positions, observed, sample_weight=counts).predict(positions)
    return float(np.sum(counts * np.abs(best - observed)) / np.sum(counts))


def _figures(labels: np.ndarray, probabilities: np.ndarray, bins: int) -> dict:
    return {"ece": round(expected_calibration_error(labels, probabilities, bins), 4),
            "brier": round(float(brier_score_loss(labels, probabilities)), 4)}


def calibration_report(fit_labels, fit_scores, fitted_on: str, test_labels, test_scores, threshold: float,
                       method: str, bins: int, level: float, resamples: int, seed: int,
                       test_groups=None) -> tuple[CalibrationMap, dict]:
    """The chosen map and what metrics/eval.json reports of it (names as in docs/calibration-domain.md). Scores
    that cannot be calibrated by `method` (a model that does not rank on the fitting split) leave the export
    uncalibrated, with the reason in `not_fitted`, rather than stopping the evaluation. With `test_groups` (the
    test images' near-duplicate groups) the calibrated ECE also gets the interval over distinct slices."""
    not_fitted = None
    try:
        chosen = fit_calibration(fit_labels, fit_scores, method, fitted_on)
    except CalibrationError as error:
        chosen, not_fitted = CalibrationMap(), str(error)
    test_labels = np.asarray(test_labels, int)
    raw, calibrated = np.asarray(test_scores, float), chosen.apply(test_scores)
    ece, ece_ci = ece_with_interval(test_labels, calibrated, bins, level, resamples, seed)
    raw_ece, raw_ece_ci = ece_with_interval(test_labels, raw, bins, level, resamples, seed)
    methods = {}
    for name in METHODS:  # side by side, each fitted on the same scores: the default is chosen on these
        if name == chosen.method:  # fitted above already
            methods[name] = _figures(test_labels, calibrated, bins)
            continue
        try:
            methods[name] = _figures(test_labels, fit_calibration(fit_labels, fit_scores, name, fitted_on)
                                     .apply(raw), bins)
        except CalibrationError as error:
            methods[name] = {"error": str(error)}
    report = {
        "method": chosen.method, "fitted_on": fitted_on, "fitted_images": len(np.asarray(fit_labels)),
        "threshold": float(threshold), "threshold_calibrated": round(float(chosen.apply(threshold)), 6),
        "bins": bins,
        "test_ece": round(ece, 4), "test_ece_ci": [round(v, 4) for v in ece_ci],
        "test_ece_uncalibrated": round(raw_ece, 4), "test_ece_uncalibrated_ci": [round(v, 4) for v in raw_ece_ci],
        "test_ece_reachable": round(reachable_ece(test_labels, raw, bins), 4),
        "test_brier": round(float(brier_score_loss(test_labels, calibrated)), 4),
        "test_brier_uncalibrated": round(float(brier_score_loss(test_labels, raw)), 4),
        "methods": methods,
    }
    if test_groups is not None:
        _, by_slice = ece_with_interval(test_labels, calibrated, bins, level, resamples, seed, groups=test_groups)
        report |= {"test_ece_ci_by_slice": [round(v, 4) for v in by_slice],
                   "test_distinct_slices": int(np.unique(np.asarray(test_groups)).size)}
    if not_fitted is not None:
        report |= {"requested_method": method, "not_fitted": not_fitted}
    return chosen, report
