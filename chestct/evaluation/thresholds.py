"""Choose the decision threshold (the operating point) on the VALIDATION split only.

The decision rule everywhere in chestct is `chestct.decision.decide`: Cancer (1) when ``score >= threshold``.

Choosing the threshold on the test split would make every test metric optimistic, so `choose_threshold` takes
only validation labels and scores; `operating_point` shows the intended use (choose on validation, then apply the
frozen threshold to test scores); the evaluate stage calls `choose_threshold` and applies the result itself. With
`evaluate.threshold.chosen_on: out_of_fold` the same `choose_threshold` runs on out-of-fold scores over train +
valid instead (chestct.evaluation.out_of_fold); test is never among them.

Why the middle of an interval: the validation operating point (sensitivity, specificity) only changes at the
distinct validation scores, so it is constant on each interval between two consecutive distinct scores. The
validation set is small and often perfectly separated, so many thresholds tie. Returning an end of the tied
interval would put the threshold right against one class's score and any small shift on test data would flip
those images; the middle in logit space keeps the largest margin to both classes on the scale the model's
logits live on.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy.special import expit, logit

from chestct.decision import DECISION_RULE, decide
from chestct.errors import ChestctError
from chestct.params import Params, ThresholdParams

# Scores are clipped to [EPS, 1 - EPS] before taking logits so that 0 and 1 stay finite; the interval below
# the lowest score and the one above the highest score are closed off at these bounds.
EPS = 1e-7
# Youden J values are differences of small rationals; compare them with a tolerance so ties stay ties.
_TIE_TOL = 1e-12


def as_labels_and_scores(labels: Sequence[int] | np.ndarray, scores: Sequence[float] | np.ndarray, what: str):
    """Validate and convert to (int labels, float scores); raise ChestctError with a fixable message."""
    y = np.asarray(labels)
    s = np.asarray(scores, dtype=float)
    if y.ndim != 1 or s.ndim != 1:
        raise ChestctError(f"{what}: labels and scores must be 1-D, got shapes {y.shape} and {s.shape}")
    if y.shape != s.shape:
        raise ChestctError(f"{what}: {y.size} labels but {s.size} scores; they must pair up one to one")
    if y.size == 0:
        raise ChestctError(f"{what}: no samples")
    if not np.all(np.isin(y, (0, 1))):
        raise ChestctError(f"{what}: labels must be 0 (Normal) or 1 (Cancer), got {sorted(set(y.tolist()))}")
    if not np.all(np.isfinite(s)) or s.min() < 0.0 or s.max() > 1.0:
        raise ChestctError(f"{what}: scores must be finite probabilities in [0, 1]")
    return y.astype(int), s


def _rates(labels: np.ndarray, predictions: np.ndarray) -> tuple[float, float]:
    positives = labels == 1
    sensitivity = float(np.mean(predictions[positives] == 1))
    specificity = float(np.mean(predictions[~positives] == 0))
    return sensitivity, specificity


def _candidate_intervals(labels: np.ndarray, scores: np.ndarray):
    """Every interval (low, high] of thresholds with a constant validation operating point.

    Interval k runs from the (k-1)-th to the k-th distinct clipped score (ascending); the first starts at EPS
    (everything predicted Cancer), the last ends at 1 - EPS (nothing predicted Cancer). Returns lows, highs,
    per-interval sensitivity and specificity, and logit widths.
    """
    clipped = np.clip(scores, EPS, 1.0 - EPS)
    distinct = np.unique(clipped)
    lows = np.concatenate([[EPS], distinct])
    highs = np.concatenate([distinct, [1.0 - EPS]])
    pos = np.sort(clipped[labels == 1])
    neg = np.sort(clipped[labels == 0])
    # A threshold inside (lows[k], highs[k]] predicts Cancer for exactly the scores >= highs[k] (k < last);
    # the last interval predicts Cancer for none.
    tp = np.append(pos.size - np.searchsorted(pos, distinct, side="left"), 0)
    fp = np.append(neg.size - np.searchsorted(neg, distinct, side="left"), 0)
    sensitivity = tp / pos.size
    specificity = 1.0 - fp / neg.size
    widths = logit(highs) - logit(lows)
    return lows, highs, sensitivity, specificity, widths


def _nearest_to_prior(lows: np.ndarray, highs: np.ndarray, tied: np.ndarray, prior: float) -> int:
    """The tied interval holding the prior, else the one whose nearer end lies closest to it in logit space.

    A small, perfectly separated validation split ties every threshold between the classes: the data cannot
    place the cut, so the prior decides (balanced training batches make 0.5 the equal-prior, equal-cost cut).
    """
    target = logit(prior)
    distance = np.maximum(logit(lows) - target, 0.0) + np.maximum(target - logit(highs), 0.0)
    return int(np.argmin(np.where(tied, distance, np.inf)))


def _logit_middle(low: float, high: float) -> float:
    return float(expit((logit(low) + logit(high)) / 2.0))


def choose_threshold(
    labels: Sequence[int] | np.ndarray, scores: Sequence[float] | np.ndarray, params: ThresholdParams
) -> dict:
    """Choose the threshold on validation labels and scores according to `params.method`.

    Returns {"threshold", "method", "interval": [low, high], "valid_sensitivity", "valid_specificity",
    "valid_youden"}. Every threshold in (low, high] gives the same validation operating point; for "fixed" the
    interval is [fixed, fixed]. The valid_* values come from applying the returned threshold to the raw scores.
    """
    y, s = as_labels_and_scores(labels, scores, "validation split")
    if np.unique(y).size < 2:
        only = "Cancer" if y[0] == 1 else "Normal"
        raise ChestctError(
            f"validation split holds only {only} images ({y.size}); choosing a threshold needs both classes "
            "(check the split fractions and the data source)"
        )

    if params.method == "fixed":
        threshold = float(params.fixed)
        interval = [threshold, threshold]
    else:
        lows, highs, sens, spec, widths = _candidate_intervals(y, s)
        # Zero-width intervals only occur at the clip bounds (a score of exactly 0 or 1) and no threshold can
        # realise them with the raw scores, so they never compete.
        usable = widths > 0
        if params.method == "youden":
            youden = sens + spec - 1.0
            best = youden[usable].max()
            tied = usable & (youden >= best - _TIE_TOL)
            # Widest tied interval in logit space; argmax keeps the lowest such interval on an exact tie.
            k = int(np.argmax(np.where(tied, widths, -np.inf)))
        elif params.method == "youden_prior":
            youden = sens + spec - 1.0
            tied = usable & (youden >= youden[usable].max() - _TIE_TOL)
            k = _nearest_to_prior(lows, highs, tied, params.prior)
        elif params.method == "target_sensitivity":
            reaching = np.flatnonzero(usable & (sens >= params.sensitivity - _TIE_TOL))
            # Sensitivity never increases with the threshold, so the highest reaching interval is the answer.
            # The first interval (everything Cancer) always reaches it unless it has zero width because a
            # score is exactly 0; then only a threshold of 0 predicts that image Cancer.
            k = int(reaching.max()) if reaching.size else None
        else:  # pragma: no cover - ThresholdParams's Literal already rejects other names
            raise ChestctError(f"unknown threshold method {params.method!r}")
        if k is None:
            threshold, interval = 0.0, [0.0, 0.0]
        else:
            interval = [float(lows[k]), float(highs[k])]
            threshold = _logit_middle(*interval)
            if params.method == "youden_prior" and interval[0] < params.prior <= interval[1]:
                threshold = float(params.prior)

    sensitivity, specificity = _rates(y, decide(s, threshold))
    return {
        "threshold": threshold,
        "method": params.method,
        "interval": interval,
        "valid_sensitivity": sensitivity,
        "valid_specificity": specificity,
        "valid_youden": sensitivity + specificity - 1.0,
    }


def threshold_record(choice: dict, params: Params, calibration: dict | None = None) -> dict:
    """models/threshold.json: the validation choice, the decision rule, the calibration map fitted on the same
    scores (a chestct.calibration.CalibrationMap as JSON; None: uncalibrated), and the evaluation settings, which
    travel with the threshold into the export's metadata (external validation reuses them)."""
    settings = params.evaluate
    return {**choice, "chosen_on": choice.get("chosen_on", "valid"), "decision": DECISION_RULE,
            "calibration": calibration or {"method": "none"},
            "settings": {"confidence_level": settings.confidence_level, "seed": params.seed,
                         "bootstrap_resamples": settings.bootstrap_resamples,
                         "gradcam_images": settings.gradcam_images, "histogram_bins": settings.histogram_bins}}


def operating_point(
    valid_labels: Sequence[int] | np.ndarray,
    valid_scores: Sequence[float] | np.ndarray,
    test_scores: Sequence[float] | np.ndarray,
    params: ThresholdParams,
) -> dict:
    """Choose the threshold on validation, then apply it unchanged to the test scores.

    Test labels are deliberately not a parameter: nothing here can tune the threshold to the test split.
    Returns {"threshold", "selection" (choose_threshold's dict), "test_predictions" (int array of 0/1)}.
    """
    selection = choose_threshold(valid_labels, valid_scores, params)
    return {
        "threshold": selection["threshold"],
        "selection": selection,
        "test_predictions": decide(test_scores, selection["threshold"]),
    }
