"""The focal loss against values computed by hand, its per-sample shape, and the loss factory."""

from __future__ import annotations

import math

import keras
import numpy as np
import pytest

from chestct.params import LossParams
from chestct.training.losses import BinaryFocalLoss, make_loss


def per_sample(loss: keras.losses.Loss, y_true, y_pred) -> np.ndarray:
    return keras.ops.convert_to_numpy(loss.call(np.asarray(y_true, "float32"), np.asarray(y_pred, "float32")))


@pytest.mark.parametrize(
    ("y", "p", "expected"),
    [
        # positive, confident and right: alpha * (1 - p)^2 * -ln(p)
        (1.0, 0.9, 0.25 * 0.1**2 * -math.log(0.9)),
        # positive, wrong: the (1 - p)^2 factor barely damps it
        (1.0, 0.2, 0.25 * 0.8**2 * -math.log(0.2)),
        # negative, right: (1 - alpha) * p^2 * -ln(1 - p)
        (0.0, 0.1, 0.75 * 0.1**2 * -math.log(0.9)),
        # negative, wrong
        (0.0, 0.7, 0.75 * 0.7**2 * -math.log(0.3)),
        # soft label (MixUp): both terms, weighted by y and 1 - y
        (0.3, 0.6, 0.25 * 0.3 * 0.4**2 * -math.log(0.6) + 0.75 * 0.7 * 0.6**2 * -math.log(0.4)),
    ],
)
def test_focal_loss_matches_hand_computed_values(y, p, expected):
    loss = BinaryFocalLoss(gamma=2.0, alpha=0.25)
    np.testing.assert_allclose(per_sample(loss, [[y]], [[p]]), [expected], rtol=1e-5)


def test_focal_loss_is_per_sample_before_reduction():
    loss = BinaryFocalLoss(gamma=2.0, alpha=0.25)
    y_true = np.array([[1.0], [0.0], [1.0], [0.0]], "float32")
    y_pred = np.array([[0.9], [0.1], [0.2], [0.7]], "float32")
    values = per_sample(loss, y_true, y_pred)
    expected = [
        0.25 * 0.1**2 * -math.log(0.9),
        0.75 * 0.1**2 * -math.log(0.9),
        0.25 * 0.8**2 * -math.log(0.2),
        0.75 * 0.7**2 * -math.log(0.3),
    ]
    assert values.shape == (4,)
    np.testing.assert_allclose(values, expected, rtol=1e-5)
    # (batch,) labels against a (batch, 1) prediction must not broadcast into (batch, batch)
    assert per_sample(loss, y_true[:, 0], y_pred).shape == (4,)
    # the reduced loss is the mean of the per-sample values, and sample weights apply per sample
    reduced = keras.ops.convert_to_numpy(loss(y_true, y_pred))
    np.testing.assert_allclose(reduced, np.mean(expected), rtol=1e-5)
    weighted = keras.ops.convert_to_numpy(loss(y_true, y_pred, sample_weight=np.array([1, 0, 0, 0], "float32")))
    np.testing.assert_allclose(weighted, expected[0] / 4, rtol=1e-5)


def test_gamma_zero_alpha_half_is_half_the_binary_cross_entropy():
    y_true = np.array([[1.0], [0.0], [0.4], [1.0]], "float32")
    y_pred = np.array([[0.8], [0.35], [0.5], [0.999]], "float32")
    focal = per_sample(BinaryFocalLoss(gamma=0.0, alpha=0.5), y_true, y_pred)
    bce = keras.ops.convert_to_numpy(keras.losses.binary_crossentropy(y_true, y_pred))
    np.testing.assert_allclose(focal, 0.5 * bce, rtol=1e-5)


def test_label_smoothing_moves_labels_towards_one_half():
    # s = 0.2: y = 1 becomes 0.9, y = 0 becomes 0.1
    loss = BinaryFocalLoss(gamma=2.0, alpha=0.25, label_smoothing=0.2)
    values = per_sample(loss, [[1.0], [0.0]], [[0.9], [0.1]])
    expected = [
        0.25 * 0.9 * 0.1**2 * -math.log(0.9) + 0.75 * 0.1 * 0.9**2 * -math.log(0.1),
        0.25 * 0.1 * 0.9**2 * -math.log(0.1) + 0.75 * 0.9 * 0.1**2 * -math.log(0.9),
    ]
    np.testing.assert_allclose(values, expected, rtol=1e-5)


def test_probabilities_are_clipped_so_the_loss_stays_finite():
    values = per_sample(BinaryFocalLoss(), [[1.0], [0.0]], [[0.0], [1.0]])
    assert np.all(np.isfinite(values))
    # float32 rounds 1 - 1e-7 to 1 - 1.19e-7, hence the loose tolerance on the second value
    np.testing.assert_allclose(values, [0.25 * -math.log(1e-7), 0.75 * -math.log(1e-7)], rtol=2e-2)


def test_float16_predictions_are_computed_in_float32():
    loss = BinaryFocalLoss(gamma=2.0, alpha=0.25)
    value = loss.call(np.array([[1.0]], "float32"), np.array([[0.9]], "float16"))
    assert keras.backend.standardize_dtype(value.dtype) == "float32"


def test_config_round_trip_and_registration():
    loss = BinaryFocalLoss(gamma=1.5, alpha=0.4, label_smoothing=0.1, reduction="sum", name="focal")
    config = loss.get_config()
    clone = BinaryFocalLoss.from_config(config)
    assert clone.get_config() == config
    assert (clone.gamma, clone.alpha, clone.label_smoothing, clone.reduction) == (1.5, 0.4, 0.1, "sum")
    restored = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(loss))
    assert isinstance(restored, BinaryFocalLoss)
    assert restored.get_config() == config


def test_make_loss_builds_the_named_loss():
    focal = make_loss(LossParams(name="focal", gamma=3.0, alpha=0.6, label_smoothing=0.05))
    assert isinstance(focal, BinaryFocalLoss)
    assert (focal.gamma, focal.alpha, focal.label_smoothing) == (3.0, 0.6, 0.05)
    bce = make_loss(LossParams(name="bce", gamma=2.0, alpha=0.25, label_smoothing=0.1))
    assert isinstance(bce, keras.losses.BinaryCrossentropy)
    assert bce.get_config()["label_smoothing"] == 0.1
