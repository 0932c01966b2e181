"""Clinical metrics against hand-computed values; bootstrap behaviour; ROC band shape."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from chestct.errors import ChestctError
from chestct.evaluation.metrics import (
    auc_interval_by_group,
    binary_metrics,
    bootstrap_auc,
    diagnostic_odds_ratio,
    roc_band,
    wilson_interval,
)

Z95 = 1.959963984540054

# Ten samples, threshold 0.5: predictions 1 1 1 0 0 | 1 0 0 0 0 -> tp 3, fn 2, fp 1, tn 4.
LABELS = [1, 1, 1, 1, 1, 0, 0, 0, 0, 0]
SCORES = [0.9, 0.8, 0.7, 0.4, 0.2, 0.6, 0.3, 0.2, 0.1, 0.05]


def _plain(value) -> bool:
    """True when value is built only of JSON-native Python types (no numpy scalars)."""
    if isinstance(value, dict):
        return all(isinstance(k, str) and _plain(v) for k, v in value.items())
    if isinstance(value, list):
        return all(_plain(v) for v in value)
    return value is None or type(value) in (bool, int, float, str)


def test_confusion_matrix_and_rates_by_hand():
    m = binary_metrics(LABELS, SCORES, 0.5, resamples=200)
    assert (m["n"], m["n_normal"], m["n_cancer"]) == (10, 5, 5)
    assert (m["tp"], m["fn"], m["fp"], m["tn"]) == (3, 2, 1, 4)
    assert m["sensitivity"] == pytest.approx(3 / 5)
    assert m["specificity"] == pytest.approx(4 / 5)
    assert m["ppv"] == pytest.approx(3 / 4)
    assert m["npv"] == pytest.approx(4 / 6)
    assert m["f1"] == pytest.approx(2 * 3 / (2 * 3 + 1 + 2))
    assert m["accuracy"] == pytest.approx(7 / 10)
    assert m["balanced_accuracy"] == pytest.approx(0.7)
    assert m["threshold"] == 0.5
    # AUC by pair counting: 5 + 5 + 5 + 4 + (2 + one tie at 0.2 counted 1/2) = 21.5 of 25 pairs.
    assert m["auc"] == pytest.approx(21.5 / 25)
    # Brier: positives (0.01 + 0.04 + 0.09 + 0.36 + 0.64) + negatives (0.36 + 0.09 + 0.04 + 0.01 + 0.0025).
    assert m["brier"] == pytest.approx(1.6425 / 10)
    assert _plain(m)
    json.dumps(m)


def test_wilson_interval_matches_textbook():
    low, high = wilson_interval(9, 10, 0.95)
    assert low == pytest.approx(0.5958, abs=1e-4)
    assert high == pytest.approx(0.9821, abs=1e-4)
    assert wilson_interval(0, 0, 0.95) is None
    m = binary_metrics(LABELS, SCORES, 0.5, resamples=100)
    assert m["sensitivity_ci"] == pytest.approx(wilson_interval(3, 5, 0.95))
    assert m["specificity_ci"] == pytest.approx(wilson_interval(4, 5, 0.95))


def test_dor_without_zero_cells_is_uncorrected():
    m = binary_metrics(LABELS, SCORES, 0.5, resamples=100)
    assert m["dor_corrected"] is False
    assert m["dor"] == pytest.approx(3 * 4 / (1 * 2))  # 6
    half = Z95 * math.sqrt(1 / 3 + 1 / 1 + 1 / 2 + 1 / 4)
    assert m["dor_ci"] == pytest.approx([math.exp(math.log(6) - half), math.exp(math.log(6) + half)])
    assert m["dor_ci"] == pytest.approx([0.3544, 101.57], rel=1e-3)


def test_dor_with_a_zero_cell_uses_haldane_anscombe():
    # tp 5, fp 0, fn 1, tn 4 -> (5.5 * 4.5) / (0.5 * 1.5) = 33.
    result = diagnostic_odds_ratio(tp=5, fp=0, fn=1, tn=4, level=0.95)
    assert result["dor_corrected"] is True
    assert result["dor"] == pytest.approx(33.0)
    half = Z95 * math.sqrt(1 / 5.5 + 1 / 0.5 + 1 / 1.5 + 1 / 4.5)
    assert result["dor_ci"] == pytest.approx([33 * math.exp(-half), 33 * math.exp(half)])
    m = binary_metrics([1] * 6 + [0] * 4, [0.9] * 5 + [0.1] + [0.2] * 4, 0.5, resamples=100)
    assert (m["tp"], m["fp"], m["fn"], m["tn"]) == (5, 0, 1, 4)
    assert m["dor_corrected"] is True and m["dor"] == pytest.approx(33.0)


def test_perfect_separation_gives_auc_one_with_degenerate_interval():
    labels = [0] * 13 + [1] * 20
    scores = np.r_[np.linspace(0.01, 0.3, 13), np.linspace(0.7, 0.99, 20)]
    m = binary_metrics(labels, scores, 0.5, resamples=500)
    assert m["auc"] == 1.0
    assert m["auc_ci"] == [1.0, 1.0]
    assert m["sensitivity"] == m["specificity"] == 1.0
    assert m["dor_corrected"] is True  # fp = fn = 0


def test_single_class_input_reports_none_without_crashing():
    m = binary_metrics([1, 1, 1, 1], [0.9, 0.8, 0.3, 0.6], 0.5, resamples=100)
    assert m["auc"] is None and m["auc_ci"] is None
    assert m["dor"] is None and m["dor_ci"] is None
    assert m["specificity"] is None and m["specificity_ci"] is None
    assert m["balanced_accuracy"] is None
    assert m["npv"] == 0.0  # the one negative prediction is a missed cancer
    assert m["sensitivity"] == 0.75
    assert m["brier"] == pytest.approx((0.01 + 0.04 + 0.49 + 0.16) / 4)
    assert _plain(m)
    json.dumps(m)


def test_undefined_ratios_are_none():
    m = binary_metrics([0, 0, 1, 1], [0.1, 0.2, 0.3, 0.4], 0.9, resamples=100)  # nothing predicted Cancer
    assert m["ppv"] is None
    assert m["npv"] == 0.5


def test_bootstrap_is_seeded_stratified_and_contains_the_estimate():
    rng = np.random.default_rng(7)
    labels = np.r_[np.zeros(30, int), np.ones(40, int)]
    scores = np.round(np.clip(rng.normal(0.35 + 0.3 * labels, 0.2), 0, 1), 2)  # rounding makes ties
    first = binary_metrics(labels, scores, 0.5, resamples=1000, seed=11)
    again = binary_metrics(labels, scores, 0.5, resamples=1000, seed=11)
    other = binary_metrics(labels, scores, 0.5, resamples=1000, seed=12)
    assert first == again
    assert first["auc_ci"] != other["auc_ci"]
    assert first["auc_ci"][0] < first["auc"] < first["auc_ci"][1]
    assert first["sensitivity_ci"][0] <= first["sensitivity"] <= first["sensitivity_ci"][1]
    assert first["dor_ci"][0] <= first["dor"] <= first["dor_ci"][1]
    narrow = binary_metrics(labels, scores, 0.5, level=0.5, resamples=1000, seed=11)
    assert first["auc_ci"][0] <= narrow["auc_ci"][0] <= narrow["auc_ci"][1] <= first["auc_ci"][1]

    # Each resample keeps the class counts and its rank-based AUC equals sklearn's (ties count 1/2).
    aucs = bootstrap_auc(labels, scores, resamples=20, seed=5)
    replay = np.random.default_rng(5)
    pos, neg = scores[labels == 1], scores[labels == 0]
    pos_idx, neg_idx = replay.integers(0, 40, (20, 40)), replay.integers(0, 30, (20, 30))
    for i in range(20):
        expected = roc_auc_score(np.r_[np.ones(40), np.zeros(30)], np.r_[pos[pos_idx[i]], neg[neg_idx[i]]])
        assert aucs[i] == pytest.approx(expected)


def test_the_auc_interval_by_group_counts_copies_of_a_slice_once():
    rng = np.random.default_rng(3)
    labels = np.r_[np.zeros(12, int), np.ones(30, int)]
    scores = np.round(np.clip(rng.normal(0.4 + 0.25 * labels, 0.2), 0, 1), 2)  # rounding makes ties
    slices = np.arange(labels.size)
    by_image = binary_metrics(labels, scores, 0.5, resamples=2000, seed=4)["auc_ci"]
    one_per_group = auc_interval_by_group(labels, scores, slices, 0.95, 2000, 4)
    # With one image per group it is the stratified interval, up to the resampling's own noise.
    assert one_per_group == pytest.approx(by_image, abs=0.03)
    assert one_per_group[0] < roc_auc_score(labels, scores) < one_per_group[1]

    # Every Normal stored five times: resampling images reads 60 Normals and narrows the interval; resampling
    # groups reads the 12 slices they are and gives the interval of the data without copies.
    copies = np.r_[np.repeat(np.arange(12), 5), np.arange(12, 42)]
    copied_labels, copied_scores = labels[copies], scores[copies]
    narrow = binary_metrics(copied_labels, copied_scores, 0.5, resamples=2000, seed=4)["auc_ci"]
    grouped = auc_interval_by_group(copied_labels, copied_scores, slices[copies], 0.95, 2000, 4)
    assert grouped == pytest.approx(one_per_group)
    assert grouped[1] - grouped[0] > 1.3 * (narrow[1] - narrow[0])

    # Ties count one half: a Normal and a Cancer of equal score in every resample give an AUC of one half.
    assert auc_interval_by_group([0, 1], [0.5, 0.5], [7, 8], 0.95, 50, 0) == [0.5, 0.5]
    assert auc_interval_by_group([1, 1], [0.2, 0.9], [0, 1], 0.95, 50, 0) is None  # one class: no interval
    with pytest.raises(ChestctError, match="pair up"):
        auc_interval_by_group([0, 1], [0.2, 0.9], [0], 0.95, 50, 0)


def test_sensitivity_by_subtype():
    labels = [1, 1, 1, 1, 1, 0, 0]
    scores = [0.9, 0.2, 0.8, 0.7, 0.1, 0.6, 0.1]
    subtypes = ["adenocarcinoma", "adenocarcinoma", "squamous", "large_cell", "large_cell", "normal", "normal"]
    m = binary_metrics(labels, scores, 0.5, resamples=100, subtypes=subtypes)
    assert m["sensitivity_by_subtype"] == {
        "adenocarcinoma": {"n": 2, "sensitivity": 0.5},
        "large_cell": {"n": 2, "sensitivity": 0.5},
        "squamous": {"n": 1, "sensitivity": 1.0},
    }
    assert binary_metrics(labels, scores, 0.5, resamples=100)["sensitivity_by_subtype"] is None
    with pytest.raises(ChestctError, match="subtypes"):
        binary_metrics(labels, scores, 0.5, resamples=100, subtypes=["a"])


def test_bad_inputs_are_clear_errors():
    with pytest.raises(ChestctError, match="pair up"):
        binary_metrics([0, 1, 1], [0.1, 0.2], 0.5)
    with pytest.raises(ChestctError, match="0 \\(Normal\\) or 1"):
        binary_metrics([0, 2], [0.1, 0.2], 0.5)
    with pytest.raises(ChestctError, match="level"):
        binary_metrics([0, 1], [0.1, 0.2], 0.5, level=1.0)


def test_roc_band_shapes_and_monotone_curves():
    rng = np.random.default_rng(2)
    labels = np.r_[np.zeros(25, int), np.ones(35, int)]
    scores = np.clip(rng.normal(0.4 + 0.2 * labels, 0.15), 0, 1)
    band = roc_band(labels, scores, resamples=300, seed=0, level=0.95, grid=51)
    for key in ("fpr", "tpr", "tpr_low", "tpr_high"):
        assert len(band[key]) == 51
        assert np.all(np.diff(band[key]) >= -1e-12), key
    assert band["fpr"][0] == 0.0 and band["fpr"][-1] == 1.0
    assert band["tpr"][-1] == 1.0 and band["tpr_high"][-1] == 1.0
    assert np.all(np.asarray(band["tpr_low"]) <= np.asarray(band["tpr_high"]))
    assert band["auc"] == pytest.approx(roc_auc_score(labels, scores))
    # The trapezoid area under the interpolated curve is close to the AUC (grid error only).
    assert np.trapezoid(band["tpr"], band["fpr"]) == pytest.approx(band["auc"], abs=0.03)
    assert band == roc_band(labels, scores, resamples=300, seed=0, level=0.95, grid=51)
    assert _plain(band)

    perfect = roc_band([0, 0, 1, 1], [0.1, 0.2, 0.8, 0.9], resamples=50, seed=0, level=0.95, grid=11)
    assert perfect["tpr"] == [1.0] * 11 and perfect["tpr_low"] == [1.0] * 11
    with pytest.raises(ChestctError, match="both"):
        roc_band([1, 1], [0.2, 0.3], resamples=50, seed=0, level=0.95)
