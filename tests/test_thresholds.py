"""Threshold selection: hand-checked operating points, and proof that the test split cannot move the threshold."""

from __future__ import annotations

import inspect

import numpy as np
import pytest
from scipy.special import expit, logit

from chestct.decision import decide
from chestct.errors import ChestctError
from chestct.evaluation.metrics import binary_metrics
from chestct.evaluation.thresholds import EPS, choose_threshold, operating_point
from chestct.params import ThresholdParams


def _params(method: str, sensitivity: float = 0.9, fixed: float = 0.5, prior: float = 0.5) -> ThresholdParams:
    return ThresholdParams(method=method, sensitivity=sensitivity, fixed=fixed, prior=prior)


def _logit_mid(low: float, high: float) -> float:
    return float(expit((logit(low) + logit(high)) / 2))


# Overlapping hand case: normals 0.1 0.3 0.5 0.6, cancers 0.4 0.7 0.8 0.9. On (0.6, 0.7] sensitivity 3/4 and
# specificity 4/4 give J = 0.75; every other interval gives at most 0.5.
OVERLAP_LABELS = [0, 0, 0, 0, 1, 1, 1, 1]
OVERLAP_SCORES = [0.1, 0.3, 0.5, 0.6, 0.4, 0.7, 0.8, 0.9]


def test_perfectly_separated_uses_logit_midpoint_of_the_gap():
    labels = [0] * 13 + [1] * 5
    normals = np.linspace(0.01, 0.2, 13)
    cancers = [0.9, 0.95, 0.97, 0.99, 0.999]
    scores = np.r_[normals, cancers]
    chosen = choose_threshold(labels, scores, _params("youden"))
    assert chosen["threshold"] == pytest.approx(_logit_mid(0.2, 0.9))
    assert chosen["interval"] == pytest.approx([0.2, 0.9])
    assert 0.2 < chosen["threshold"] < 0.9  # strictly inside: neither class sits on the threshold
    assert chosen["method"] == "youden"
    assert (chosen["valid_sensitivity"], chosen["valid_specificity"], chosen["valid_youden"]) == (1.0, 1.0, 1.0)
    np.testing.assert_array_equal(decide(scores, chosen["threshold"]), labels)


def test_youden_prior_takes_the_prior_when_validation_cannot_place_the_cut():
    labels = [0] * 13 + [1] * 5
    scores = np.r_[np.linspace(0.01, 0.2, 13), [0.9, 0.95, 0.97, 0.99, 0.999]]
    chosen = choose_threshold(labels, scores, _params("youden_prior"))
    assert chosen["threshold"] == 0.5 and chosen["interval"] == pytest.approx([0.2, 0.9])
    assert chosen["valid_youden"] == 1.0
    # The prior outside every best interval: the middle of the best interval nearest to it.
    shifted = choose_threshold(labels, scores, _params("youden_prior", prior=0.95))
    assert shifted["threshold"] == pytest.approx(_logit_mid(0.2, 0.9))
    # Overlapping classes: the Youden-best interval wins whatever the prior says.
    overlap = choose_threshold(OVERLAP_LABELS, OVERLAP_SCORES, _params("youden_prior", prior=0.2))
    assert overlap["interval"] == pytest.approx([0.6, 0.7]) and overlap["valid_youden"] == 0.75


def test_youden_overlapping_hand_case():
    chosen = choose_threshold(OVERLAP_LABELS, OVERLAP_SCORES, _params("youden"))
    assert chosen["interval"] == pytest.approx([0.6, 0.7])
    assert chosen["threshold"] == pytest.approx(_logit_mid(0.6, 0.7))
    assert chosen["valid_sensitivity"] == 0.75
    assert chosen["valid_specificity"] == 1.0
    assert chosen["valid_youden"] == pytest.approx(0.75)


def test_youden_tie_picks_the_widest_interval_in_logit_space():
    # (0.1, 0.4]: sens 2/2, spec 1/2 -> J 0.5; (0.45, 0.9]: sens 1/2, spec 2/2 -> J 0.5.
    # logit widths: 1.79 vs 2.40, so the upper interval wins.
    chosen = choose_threshold([0, 0, 1, 1], [0.1, 0.45, 0.4, 0.9], _params("youden"))
    assert logit(0.9) - logit(0.45) > logit(0.4) - logit(0.1)
    assert chosen["interval"] == pytest.approx([0.45, 0.9])
    assert chosen["threshold"] == pytest.approx(_logit_mid(0.45, 0.9))
    assert chosen["valid_youden"] == pytest.approx(0.5)


@pytest.mark.parametrize(
    ("target", "interval", "sensitivity", "specificity"),
    [
        (0.75, (0.6, 0.7), 0.75, 1.0),
        (0.7, (0.6, 0.7), 0.75, 1.0),
        (1.0, (0.3, 0.4), 1.0, 0.5),
        (0.5, (0.7, 0.8), 0.5, 1.0),
    ],
)
def test_target_sensitivity_hand_cases(target, interval, sensitivity, specificity):
    chosen = choose_threshold(OVERLAP_LABELS, OVERLAP_SCORES, _params("target_sensitivity", sensitivity=target))
    assert chosen["method"] == "target_sensitivity"
    assert chosen["interval"] == pytest.approx(list(interval))
    assert chosen["threshold"] == pytest.approx(_logit_mid(*interval))
    assert chosen["valid_sensitivity"] == sensitivity
    assert chosen["valid_specificity"] == specificity


def test_target_sensitivity_reaches_a_cancer_scored_exactly_zero():
    chosen = choose_threshold([0, 1, 1], [0.5, 0.0, 0.9], _params("target_sensitivity", sensitivity=1.0))
    assert chosen["threshold"] == 0.0
    assert chosen["valid_sensitivity"] == 1.0


def test_extreme_scores_stay_finite_and_consistent():
    chosen = choose_threshold([0, 0, 1, 1], [0.0, 0.0, 1.0, 1.0], _params("youden"))
    assert chosen["interval"] == pytest.approx([EPS, 1 - EPS])
    assert chosen["threshold"] == pytest.approx(0.5)
    assert chosen["valid_youden"] == 1.0


def test_fixed_threshold():
    chosen = choose_threshold(OVERLAP_LABELS, OVERLAP_SCORES, _params("fixed", fixed=0.55))
    assert chosen["threshold"] == 0.55
    assert chosen["interval"] == [0.55, 0.55]
    assert chosen["valid_sensitivity"] == 0.75  # 0.7 0.8 0.9 of the cancers
    assert chosen["valid_specificity"] == 0.75  # 0.6 is the one normal above


def test_one_class_validation_is_a_clear_error():
    with pytest.raises(ChestctError, match="only Normal"):
        choose_threshold([0, 0, 0], [0.1, 0.2, 0.3], _params("youden"))
    with pytest.raises(ChestctError, match="pair up"):
        choose_threshold([0, 1], [0.1], _params("youden"))
    with pytest.raises(ChestctError, match="probabilities"):
        choose_threshold([0, 1], [0.1, np.nan], _params("youden"))


def test_threshold_selection_never_reads_test_data():
    # The API itself: the chooser sees validation arrays only and the stage helper takes no test labels.
    assert list(inspect.signature(choose_threshold).parameters) == ["labels", "scores", "params"]
    assert "test_labels" not in inspect.signature(operating_point).parameters

    rng = np.random.default_rng(3)
    valid_labels = np.r_[np.zeros(13, int), np.ones(20, int)]
    valid_scores = np.clip(rng.normal(0.3 + 0.4 * valid_labels, 0.15), 0, 1)
    test_labels = rng.integers(0, 2, 60)
    test_scores = rng.uniform(0, 1, 60)

    for method in ("youden", "target_sensitivity", "fixed"):
        params = _params(method)
        results = []
        # Used the way the evaluate stage uses it: choose on valid, apply to test, score against test labels.
        for labels in (test_labels, 1 - test_labels):
            point = operating_point(valid_labels, valid_scores, test_scores, params)
            metrics = binary_metrics(labels, test_scores, point["threshold"], resamples=100)
            results.append((point, metrics))
        (first, first_metrics), (flipped, flipped_metrics) = results
        assert first["threshold"] == flipped["threshold"]
        assert first_metrics["threshold"] == flipped_metrics["threshold"] == first["threshold"]
        np.testing.assert_array_equal(first["test_predictions"], flipped["test_predictions"])
        np.testing.assert_array_equal(first["test_predictions"], decide(test_scores, first["threshold"]))
        # Different test scores cannot move it either; it equals choosing on validation alone.
        other = operating_point(valid_labels, valid_scores, rng.uniform(0, 1, 7), params)
        assert other["threshold"] == first["threshold"]
        assert first["selection"] == choose_threshold(valid_labels, valid_scores, params)
