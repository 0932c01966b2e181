"""Clinical metrics of a binary classifier (Normal 0 vs Cancer 1) with confidence intervals.

Test splits are small, so a point estimate alone overstates what is known: every rate comes with an interval.

- AUC: stratified bootstrap (positives and negatives resampled separately, with replacement), percentile
  interval. Stratifying keeps each resample's class counts equal to the data's, so no resample is single-class
  and the interval is not widened by class-count noise that the fixed test split does not have.
  With near-duplicate groups (`auc_interval_by_group`), whole groups are resampled instead, Normal groups and
  Cancer groups separately: copies of one slice are one piece of evidence, and the interval says so.
- Sensitivity / specificity: Wilson score interval, which stays inside [0, 1] and behaves at 0% and 100%.
- Diagnostic odds ratio: Woolf's log interval; when a confusion cell is zero the Haldane-Anscombe correction
  (add 0.5 to every cell) keeps the ratio and its interval finite.

Every returned value is a plain Python float/int/bool/None (or list/dict of them) so it can go to JSON as is.
The decision rule is the project's one: predict Cancer when score >= threshold.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy.stats import binomtest, norm, rankdata
from sklearn.metrics import brier_score_loss, roc_auc_score

from chestct.decision import decide
from chestct.errors import ChestctError
from chestct.evaluation.thresholds import as_labels_and_scores

# Resamples are processed in chunks so that memory stays bounded on large test sets (elements per chunk).
_CHUNK_ELEMENTS = 2_000_000


def _check_level(level: float) -> None:
    if not 0.0 < level < 1.0:
        raise ChestctError(f"confidence level must lie strictly between 0 and 1, got {level}")


def _check_resamples(resamples: int) -> None:
    if int(resamples) < 1:
        raise ChestctError(f"bootstrap resamples must be at least 1, got {resamples}")


def wilson_interval(successes: int, trials: int, level: float) -> list[float] | None:
    """Wilson score interval for a proportion; None when there are no trials."""
    if trials == 0:
        return None
    ci = binomtest(int(successes), int(trials)).proportion_ci(confidence_level=level, method="wilson")
    return [float(ci.low), float(ci.high)]


def _ratio(numerator: int, denominator: int) -> float | None:
    return None if denominator == 0 else float(numerator / denominator)


def _stratified_indices(rng: np.random.Generator, n_pos: int, n_neg: int, count: int):
    """Resampled positive and negative indices, shape (count, n_pos) and (count, n_neg)."""
    return rng.integers(0, n_pos, size=(count, n_pos)), rng.integers(0, n_neg, size=(count, n_neg))


def _chunks(resamples: int, n: int):
    per_chunk = max(1, _CHUNK_ELEMENTS // max(n, 1))
    for start in range(0, resamples, per_chunk):
        yield min(per_chunk, resamples - start)


def bootstrap_auc(
    labels: Sequence[int] | np.ndarray, scores: Sequence[float] | np.ndarray, resamples: int, seed: int
) -> np.ndarray:
    """AUC of `resamples` stratified bootstrap resamples (needs both classes).

    AUC is computed as the Mann-Whitney statistic from average ranks, vectorised over resamples; it equals
    roc_auc_score (ties count one half) without a Python loop per resample.
    """
    y, s = as_labels_and_scores(labels, scores, "bootstrap AUC")
    _check_resamples(resamples)
    pos, neg = s[y == 1], s[y == 0]
    if pos.size == 0 or neg.size == 0:
        raise ChestctError("bootstrap AUC needs both Normal and Cancer samples")
    rng = np.random.default_rng(seed)
    aucs = []
    for count in _chunks(int(resamples), y.size):
        pos_idx, neg_idx = _stratified_indices(rng, pos.size, neg.size, count)
        combined = np.concatenate([pos[pos_idx], neg[neg_idx]], axis=1)
        ranks = rankdata(combined, axis=1)  # average ranks: ties contribute one half
        pos_rank_sum = ranks[:, : pos.size].sum(axis=1)
        aucs.append((pos_rank_sum - pos.size * (pos.size + 1) / 2.0) / (pos.size * neg.size))
    return np.concatenate(aucs)


def percentile_interval(values: np.ndarray, level: float, axis: int = 0) -> tuple[np.ndarray, np.ndarray]:
    alpha = 1.0 - level
    low, high = np.quantile(values, [alpha / 2.0, 1.0 - alpha / 2.0], axis=axis)
    return low, high


def auc_with_interval(labels: np.ndarray, scores: np.ndarray, level: float, resamples: int, seed: int
                      ) -> tuple[float | None, list[float] | None]:
    """ROC AUC and its stratified bootstrap interval at `level`; (None, None) when one class is missing."""
    labels, scores = np.asarray(labels, int), np.asarray(scores, np.float64)
    if len(np.unique(labels)) < 2:
        return None, None
    low, high = percentile_interval(bootstrap_auc(labels, scores, resamples, seed), level)
    return float(roc_auc_score(labels, scores)), [float(low), float(high)]


def auc_interval_by_group(labels, scores, groups, level: float, resamples: int, seed: int) -> list[float] | None:
    """The AUC's bootstrap percentile interval with whole groups resampled (a group: one slice and its
    near-duplicates), the groups of each class separately so that every resample holds both classes; None when
    one class is missing. A resample's images weigh as often as their group was drawn; the AUC is the weighted
    Mann-Whitney statistic (ties count one half), so with one image per group it is the stratified interval."""
    y, s = as_labels_and_scores(labels, scores, "grouped bootstrap AUC")
    _check_level(level)
    _check_resamples(resamples)
    if len(np.unique(y)) < 2:
        return None
    groups = np.asarray(groups).astype(str)
    if groups.shape != y.shape:
        raise ChestctError(f"{groups.size} groups but {y.size} labels; they must pair up one to one")
    # Each class's groups are numbered on their own: a group that straddles the classes is one unit in each.
    members = [np.flatnonzero(y == cls) for cls in (0, 1)]
    unit_of_member = [np.unique(groups[images], return_inverse=True)[1].ravel() for images in members]
    distinct, score_bin = np.unique(s, return_inverse=True)  # equal scores share a bin: ties
    image_bins = np.zeros((y.size, distinct.size))
    image_bins[np.arange(y.size), score_bin.ravel()] = 1.0
    rng = np.random.default_rng(seed)
    aucs = []
    for count in _chunks(int(resamples), y.size + distinct.size):
        image_weights = np.zeros((count, y.size))
        for images, units in zip(members, unit_of_member, strict=True):
            n_units = units.max() + 1
            draws = rng.integers(0, n_units, size=(count, n_units))
            drawn = np.zeros((count, n_units))
            np.add.at(drawn, (np.arange(count)[:, None], draws), 1.0)
            image_weights[:, images] = drawn[:, units]
        positive = (image_weights * (y == 1)) @ image_bins  # (count, bins): drawn Cancer weight at each score
        negative = (image_weights * (y == 0)) @ image_bins
        below = np.cumsum(negative, axis=1) - negative  # Normal weight strictly below each score
        wins = np.sum(positive * (below + 0.5 * negative), axis=1)
        aucs.append(wins / (positive.sum(axis=1) * negative.sum(axis=1)))
    low, high = percentile_interval(np.concatenate(aucs), level)
    return [float(low), float(high)]


def diagnostic_odds_ratio(tp: int, fp: int, fn: int, tn: int, level: float) -> dict:
    """DOR = (tp*tn)/(fp*fn) with Woolf's interval; Haldane-Anscombe +0.5 on every cell if any cell is 0."""
    cells = np.array([tp, fp, fn, tn], dtype=float)
    corrected = bool(np.any(cells == 0))
    if corrected:
        cells = cells + 0.5
    a, b, c, d = cells
    log_dor = np.log(a * d / (b * c))
    half_width = norm.ppf(0.5 + level / 2.0) * np.sqrt(np.sum(1.0 / cells))
    return {
        "dor": float(np.exp(log_dor)),
        "dor_ci": [float(np.exp(log_dor - half_width)), float(np.exp(log_dor + half_width))],
        "dor_corrected": corrected,
    }


def _subtype_sensitivity(labels: np.ndarray, predictions: np.ndarray, subtypes) -> dict:
    subtypes = np.asarray([str(subtype) for subtype in subtypes], dtype=object)
    if subtypes.shape != labels.shape:
        raise ChestctError(f"{subtypes.size} subtypes but {labels.size} labels; they must pair up one to one")
    result = {}
    positives = labels == 1
    for subtype in sorted(set(subtypes[positives].tolist())):
        mask = positives & (subtypes == subtype)
        n = int(mask.sum())
        result[subtype] = {"n": n, "sensitivity": float(predictions[mask].mean())}
    return result


def binary_metrics(
    labels: Sequence[int] | np.ndarray,
    scores: Sequence[float] | np.ndarray,
    threshold: float,
    level: float = 0.95,
    resamples: int = 2000,
    seed: int = 0,
    subtypes: Sequence[str] | None = None,
) -> dict:
    """Every clinical metric at `threshold`, with confidence intervals at `level`.

    Keys: n, n_normal, n_cancer, auc, auc_ci, tp, fp, tn, fn, sensitivity, sensitivity_ci, specificity,
    specificity_ci, ppv, npv, f1, accuracy, balanced_accuracy, dor, dor_ci, dor_corrected, brier, threshold,
    sensitivity_by_subtype. A metric that is undefined for this input (e.g. AUC with one class, PPV with no
    positive predictions) is None rather than an error, so evaluating a degenerate split still reports.
    `subtypes` (one per sample, only read for Cancer samples) gives sensitivity_by_subtype; else it is None.
    """
    y, s = as_labels_and_scores(labels, scores, "metrics")
    _check_level(level)
    _check_resamples(resamples)
    predictions = decide(s, threshold)
    n_cancer = int(y.sum())
    n_normal = int(y.size - n_cancer)
    both_classes = n_cancer > 0 and n_normal > 0

    tp = int(np.sum((predictions == 1) & (y == 1)))
    fn = n_cancer - tp
    fp = int(np.sum((predictions == 1) & (y == 0)))
    tn = n_normal - fp

    auc, auc_ci = auc_with_interval(y, s, level, resamples, seed)
    if both_classes:
        dor = diagnostic_odds_ratio(tp, fp, fn, tn, level)
    else:  # one class: AUC is undefined and a DOR would only measure the 0.5 correction
        dor = {"dor": None, "dor_ci": None, "dor_corrected": None}

    sensitivity = _ratio(tp, n_cancer)
    specificity = _ratio(tn, n_normal)
    balanced = None if not both_classes else float((sensitivity + specificity) / 2.0)
    return {
        "n": int(y.size),
        "n_normal": n_normal,
        "n_cancer": n_cancer,
        "auc": auc,
        "auc_ci": auc_ci,
        "tp": tp,
        "fp": fp,
        "tn": tn,
        "fn": fn,
        "sensitivity": sensitivity,
        "sensitivity_ci": wilson_interval(tp, n_cancer, level),
        "specificity": specificity,
        "specificity_ci": wilson_interval(tn, n_normal, level),
        "ppv": _ratio(tp, tp + fp),
        "npv": _ratio(tn, tn + fn),
        "f1": _ratio(2 * tp, 2 * tp + fp + fn),
        "accuracy": float((tp + tn) / y.size),
        "balanced_accuracy": balanced,
        **dor,
        "brier": float(brier_score_loss(y, s, labels=[0, 1])),
        "threshold": float(threshold),
        "sensitivity_by_subtype": None if subtypes is None else _subtype_sensitivity(y, predictions, subtypes),
    }


def _roc_points(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """ROC vertices (fpr, tpr) from (0, 0) to (1, 1), one per distinct score, lowering the threshold."""
    order = np.argsort(-scores, kind="mergesort")
    sorted_scores, sorted_labels = scores[order], labels[order]
    # The last index of each run of equal scores: tied scores move the curve diagonally, in one step.
    last = np.r_[np.flatnonzero(np.diff(sorted_scores)), sorted_scores.size - 1]
    tps = np.cumsum(sorted_labels)[last]
    fps = (last + 1) - tps
    tpr = np.r_[0.0, tps / tps[-1]]
    fpr = np.r_[0.0, fps / fps[-1]]
    return fpr, tpr


def _tpr_on_grid(fpr: np.ndarray, tpr: np.ndarray, grid: np.ndarray) -> np.ndarray:
    """Linear interpolation of the ROC at `grid`; on a vertical segment take its top (the best tpr at that fpr)."""
    unique_fpr, inverse = np.unique(fpr, return_inverse=True)
    top = np.full(unique_fpr.size, -np.inf)
    np.maximum.at(top, inverse, tpr)
    return np.interp(grid, unique_fpr, top)


def roc_band(
    labels: Sequence[int] | np.ndarray,
    scores: Sequence[float] | np.ndarray,
    resamples: int,
    seed: int,
    level: float,
    grid: int = 101,
) -> dict:
    """ROC curve on a fixed fpr grid with a stratified-bootstrap percentile band, for plotting.

    Returns {"fpr", "tpr", "tpr_low", "tpr_high"} (lists of `grid` floats; tpr from the full data) plus
    "auc", "level" and "resamples". Every curve is non-decreasing in fpr, and so are the band's percentiles.
    Needs both classes (ChestctError otherwise): a single-class split has no ROC curve.
    """
    y, s = as_labels_and_scores(labels, scores, "ROC band")
    _check_level(level)
    _check_resamples(resamples)
    if int(grid) < 2:
        raise ChestctError(f"ROC grid must have at least 2 points, got {grid}")
    pos, neg = s[y == 1], s[y == 0]
    if pos.size == 0 or neg.size == 0:
        raise ChestctError("a ROC curve needs both Normal and Cancer samples in the split")
    fpr_grid = np.linspace(0.0, 1.0, int(grid))
    tpr = _tpr_on_grid(*_roc_points(y, s), fpr_grid)

    rng = np.random.default_rng(seed)
    boot_labels = np.r_[np.ones(pos.size, dtype=int), np.zeros(neg.size, dtype=int)]
    curves = np.empty((int(resamples), fpr_grid.size))
    row = 0
    for count in _chunks(int(resamples), y.size):
        pos_idx, neg_idx = _stratified_indices(rng, pos.size, neg.size, count)
        for i in range(count):
            boot_scores = np.r_[pos[pos_idx[i]], neg[neg_idx[i]]]
            curves[row] = _tpr_on_grid(*_roc_points(boot_labels, boot_scores), fpr_grid)
            row += 1
    low, high = percentile_interval(curves, level, axis=0)
    return {
        "fpr": fpr_grid.tolist(),
        "tpr": tpr.tolist(),
        "tpr_low": low.tolist(),
        "tpr_high": high.tolist(),
        "auc": float(roc_auc_score(y, s)),
        "level": float(level),
        "resamples": int(resamples),
    }
