"""Calibration: each method recovers a known miscalibration, decisions are unchanged, the map round-trips."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from pydantic import ValidationError

from chestct.calibration import UNCALIBRATED, CalibrationMap, logit, sigmoid
from chestct.decision import decide
from chestct.evaluation.calibration import (
    CalibrationError,
    calibration_report,
    ece_with_interval,
    expected_calibration_error,
    fit_calibration,
    reachable_ece,
    reliability_curve,
)
from chestct.evaluation.plots import calibration_png, write_calibrated_reliability
from chestct.evaluation.thresholds import choose_threshold
from chestct.params import ThresholdParams


def miscalibrated(n: int, seed: int, temperature: float = 3.0, shift: float = -1.0):
    """Labels drawn from true probabilities, and scores that are those probabilities squashed (logit / T) and
    shifted: an over-cautious model, like ours, whose scores rarely pass 0.5."""
    rng = np.random.default_rng(seed)
    true_logits = rng.normal(0.0, 2.5, n)
    labels = (rng.random(n) < sigmoid(true_logits)).astype(int)
    scores = sigmoid(true_logits / temperature + shift)
    return labels, scores, sigmoid(true_logits)


# Temperature has one parameter: its miscalibration is a squashing alone; the others also undo a shift.
@pytest.mark.parametrize(("method", "shift"), [("temperature", 0.0), ("platt", -1.0), ("isotonic", -1.0)])
def test_each_method_recovers_a_known_miscalibration(method, shift):
    fit_labels, fit_scores, _ = miscalibrated(4000, seed=0, shift=shift)
    test_labels, test_scores, truth = miscalibrated(4000, seed=1, shift=shift)
    fitted = fit_calibration(fit_labels, fit_scores, method, "valid")
    calibrated = fitted.apply(test_scores)
    before = expected_calibration_error(test_labels, test_scores, 10)
    after = expected_calibration_error(test_labels, calibrated, 10)
    assert before > 0.15 and after < 0.03
    # Against the true probabilities, not only on average per bin.
    tolerance = {"temperature": 0.08, "platt": 0.03, "isotonic": 0.05}[method]
    assert np.mean(np.abs(calibrated - truth)) < tolerance


def test_temperature_alone_cannot_undo_a_shift_but_platt_can():
    labels, scores, _ = miscalibrated(4000, seed=2)
    platt = fit_calibration(labels, scores, "platt", "valid")
    assert platt.slope == pytest.approx(3.0, rel=0.1) and platt.intercept == pytest.approx(3.0, rel=0.15)
    unshifted_labels, unshifted_scores, _ = miscalibrated(4000, seed=2, shift=0.0)
    assert fit_calibration(unshifted_labels, unshifted_scores, "temperature", "valid").temperature == \
        pytest.approx(1 / 3.0, rel=0.1)


@pytest.mark.parametrize("method", ["temperature", "platt", "isotonic"])
def test_the_threshold_maps_so_that_every_validation_decision_is_the_same(method):
    labels, scores, _ = miscalibrated(300, seed=3)
    scores = np.round(scores, 3)  # ties, as a small validation split has
    threshold = choose_threshold(labels, scores, ThresholdParams(method="youden", sensitivity=0.9, fixed=0.5,
                                                                 prior=0.5))["threshold"]
    fitted = fit_calibration(labels, scores, method, "valid")
    mapped = fitted.apply(threshold)
    assert np.array_equal(decide(fitted.apply(scores), mapped), decide(scores, threshold))
    assert np.all(np.diff(fitted.apply(np.sort(scores))) >= 0)


def test_the_map_round_trips_through_json_and_refuses_a_broken_one():
    labels, scores, _ = miscalibrated(500, seed=4)
    for method in ("temperature", "platt", "isotonic"):
        fitted = fit_calibration(labels, scores, method, "out_of_fold")
        again = CalibrationMap.model_validate_json(fitted.model_dump_json())
        np.testing.assert_array_equal(again.apply(scores), fitted.apply(scores))
        assert "fitted on 500 out-of-fold scores" in again.describe()
    assert UNCALIBRATED.describe().startswith("uncalibrated")
    np.testing.assert_array_equal(UNCALIBRATED.apply([0.0, 0.3, 1.0]), [0.0, 0.3, 1.0])
    with pytest.raises(ValidationError, match="needs temperature"):
        CalibrationMap(method="temperature")
    with pytest.raises(ValidationError, match="strictly increasing"):
        CalibrationMap(method="isotonic", knots_x=[0.1, 0.2], knots_y=[0.5, 0.5])


def test_scores_that_cannot_be_calibrated_say_what_to_do():
    with pytest.raises(CalibrationError, match="both classes.*method: none"):
        fit_calibration([1, 1, 1], [0.2, 0.3, 0.4], "platt", "valid")
    with pytest.raises(CalibrationError, match="slope"):
        fit_calibration([1, 1, 0, 0], [0.1, 0.2, 0.8, 0.9], "platt", "valid")
    with pytest.raises(CalibrationError, match="unknown method"):
        fit_calibration([0, 1], [0.2, 0.8], "beta", "valid")
    assert fit_calibration([0, 1], [0.2, 0.8], "none", "valid") == UNCALIBRATED


def test_extreme_scores_stay_finite():
    fitted = CalibrationMap(method="platt", slope=2.0, intercept=1.0)
    assert np.all(np.isfinite(fitted.apply([0.0, 1.0]))) and np.all(np.isfinite(logit([0.0, 1.0])))


def test_reliability_bins_hold_equal_mass():
    labels, scores, _ = miscalibrated(103, seed=5)
    predicted, observed, counts = reliability_curve(labels, scores, 10)
    assert counts.sum() == 103 and counts.max() - counts.min() <= 1
    assert np.all(np.diff(predicted) >= 0) and np.all((observed >= 0) & (observed <= 1))


def test_the_report_fits_on_the_fitting_split_and_measures_on_test():
    fit_labels, fit_scores, _ = miscalibrated(600, seed=6)
    test_labels, test_scores, _ = miscalibrated(600, seed=7)
    chosen, report = calibration_report(fit_labels, fit_scores, "valid", test_labels, test_scores, 0.2, "platt",
                                        bins=10, level=0.95, resamples=200, seed=0)
    assert chosen.method == "platt" and report["fitted_images"] == 600
    assert report["test_ece"] < report["test_ece_uncalibrated"]
    assert report["test_brier"] < report["test_brier_uncalibrated"]
    low, high = report["test_ece_ci"]
    assert low <= report["test_ece"] <= high
    assert report["threshold_calibrated"] == pytest.approx(float(chosen.apply(0.2)), abs=1e-6)
    assert set(report["methods"]) == {"temperature", "platt", "isotonic"}
    # Nothing of test reaches the map: refitting on the same fitting scores gives the same map.
    assert chosen == fit_calibration(fit_labels, fit_scores, "platt", "valid")


def test_the_reachable_ece_pools_the_bins_that_rank_the_wrong_way():
    # Four bins of 10 in score order, Cancer shares 0.6, 0.2, 0.7, 1.0: no increasing map can give the first two
    # bins their own shares; the best gives both 0.4 (|0.4 - 0.6| + |0.4 - 0.2| over 4 bins of equal mass).
    shares = [6, 2, 7, 10]
    labels = np.concatenate([[1] * k + [0] * (10 - k) for k in shares])
    scores = np.linspace(0.01, 0.99, 40)
    assert reachable_ece(labels, scores, 4) == pytest.approx(0.4 / 4)
    # Shares already in order: an increasing map reaches every bin's share exactly.
    assert reachable_ece(np.sort(labels), scores, 4) == pytest.approx(0.0)
    # A floor: no increasing map of the same scores does better (random ones, and every fitted method).
    labels, scores, _ = miscalibrated(400, seed=9)
    floor = reachable_ece(labels, scores, 10)
    rng = np.random.default_rng(0)
    for _ in range(50):
        increasing = np.interp(scores, np.sort(rng.random(6)), np.sort(rng.random(6))) + 1e-3 * scores  # strictly
        assert expected_calibration_error(labels, increasing, 10) >= floor - 1e-12
    for method in ("temperature", "platt", "isotonic"):
        fitted = fit_calibration(labels, scores, method, "valid").apply(scores)
        assert expected_calibration_error(labels, fitted, 10) >= floor - 1e-12
    _, report = calibration_report(labels, scores, "valid", labels, scores, 0.5, "platt", bins=10, level=0.95,
                                   resamples=50, seed=0)
    assert report["test_ece_reachable"] == round(floor, 4)


def test_copies_of_one_slice_widen_the_interval_when_slices_are_resampled():
    # 60 distinct slices, each stored 5 times (as the official test split's Normals are): resampling images
    # treats the copies as independent evidence; resampling the groups does not, and its interval is wider.
    labels, scores, _ = miscalibrated(60, seed=8)
    copies = np.repeat(np.arange(60), 5)
    labels, scores = labels[copies], scores[copies]
    ece, by_image = ece_with_interval(labels, scores, 10, 0.95, 400, seed=0)
    same, by_slice = ece_with_interval(labels, scores, 10, 0.95, 400, seed=0, groups=copies)
    assert same == ece and by_slice[0] <= ece <= by_slice[1]
    assert by_slice[1] - by_slice[0] > 1.5 * (by_image[1] - by_image[0])
    # one image per group: the two intervals are the same resampling
    assert ece_with_interval(labels[:60], scores[:60], 10, 0.95, 200, seed=1, groups=np.arange(60))[1] == (
        ece_with_interval(labels[:60], scores[:60], 10, 0.95, 200, seed=1)[1])
    _, report = calibration_report(labels, scores, "valid", labels, scores, 0.5, "platt", bins=10, level=0.95,
                                   resamples=200, seed=0, test_groups=copies)
    assert report["test_distinct_slices"] == 60 and len(report["test_ece_ci_by_slice"]) == 2


def test_a_model_that_does_not_rank_stays_uncalibrated_and_says_why():
    labels = np.array([0, 1] * 20)
    chosen, report = calibration_report(labels, np.full(40, 0.3), "valid", labels, np.full(40, 0.3), 0.3, "platt",
                                        bins=5, level=0.95, resamples=100, seed=0)
    assert not chosen.calibrated and report["method"] == "none" and report["requested_method"] == "platt"
    assert "slope" in report["not_fitted"] and report["test_ece"] == report["test_ece_uncalibrated"]


def test_the_evaluation_plots_show_both_curves(tmp_path):
    labels, scores, _ = miscalibrated(300, seed=8)
    fitted = fit_calibration(labels, scores, "platt", "valid")
    calibration_png(tmp_path / "calibration.png", labels, scores, fitted, 10)
    write_calibrated_reliability(tmp_path, labels, scores, fitted, 10)
    assert (tmp_path / "calibration.png").stat().st_size > 1000
    for name, probabilities in (("uncalibrated", scores), ("calibrated", fitted.apply(scores))):
        table = pd.read_csv(tmp_path / f"reliability_test_{name}.csv")
        assert list(table.columns) == ["mean_predicted", "fraction_cancer", "images"] and table["images"].sum() == 300
        np.testing.assert_allclose(table["mean_predicted"], reliability_curve(labels, probabilities, 10)[0],
                                   rtol=1e-5)


def test_the_methods_benchmark_tables_why_a_method_misses():
    from benchmarks.calibration_methods import methods_table

    figures = {method: {"ece": 0.1, "brier": 0.2} for method in ("none", "temperature", "platt", "isotonic")}
    table = methods_table({"seed 44": figures | {"reachable": {"ece": 0.029}, "unseen": {"cancers": 15, "of": 261}},
                           "seed 43": figures | {"reachable": {"ece": 0.041}, "unseen": {"cancers": 5, "of": 258}}},
                          bins=10)
    assert table["columns"][-2:] == ["reachable (fitted on test)", "test Cancers below every validation Cancer"]
    assert table["rows"][0][-2:] == ["0.029", "15 of 261"] and table["rows"][1][-2:] == ["0.041", "5 of 258"]
    assert table["rows"][-1][0] == "mean of the 2" and table["rows"][-1][-2] == "0.035"
