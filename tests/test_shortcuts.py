"""Shortcut audit: trivial features by hand, the train-only linear shortcut, and histogram matching."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
from scipy.stats import spearmanr

from chestct.evaluation import shortcuts
from chestct.evaluation.shortcuts import (
    GeometryFeatures,
    geometry_features,
    histogram_features,
    intensity_features,
    match_batch,
    match_to_reference,
    reference_quantiles,
    shortcut_auc,
)

SIZE = 32


def structure(rng: np.random.Generator, size: int = SIZE) -> np.ndarray:
    """A smooth random 'anatomy' with zero mean and unit std."""
    coarse = rng.uniform(-1, 1, (5, 5)).astype(np.float32)
    smooth = cv2.resize(coarse, (size, size), interpolation=cv2.INTER_CUBIC) + rng.normal(0, 0.15, (size, size))
    return (smooth - smooth.mean()) / smooth.std()


def render(shape: np.ndarray, mean: float, std: float) -> np.ndarray:
    return np.clip(np.rint(mean + std * shape), 0, 255).astype(np.uint8)[..., None]


def confounded_set(count: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Like the real data: the classes differ only in global brightness/contrast (Normal brighter, wider)."""
    rng = np.random.default_rng(seed)
    labels = np.arange(count) % 2
    images = []
    for label in labels:
        mean, std = (90.0, 25.0) if label else (150.0, 45.0)
        images.append(render(structure(rng), mean + rng.normal(0, 5), std + rng.normal(0, 3)))
    return np.stack(images), labels


# --- features ----------------------------------------------------------------------------------------------


def test_intensity_features_by_hand():
    images = [np.array([[0, 2], [4, 6]], np.uint8), np.full((3, 5), 7, np.uint8)]
    features = intensity_features(images)
    assert features.shape == (2, 2)
    np.testing.assert_allclose(features, [[3.0, np.sqrt(5.0)], [7.0, 0.0]])


def test_intensity_features_accept_a_stacked_array():
    images = np.zeros((3, 4, 4, 1), np.uint8)
    images[1] = 10
    np.testing.assert_allclose(intensity_features(images), [[0, 0], [10, 0], [0, 0]])


def test_histogram_features_by_hand():
    image = np.array([[0, 63, 64, 255]], np.uint8)  # bins of width 64: [0, 64), [64, 128), [128, 192), [192, 256)
    features = histogram_features([image, np.full((2, 2), 130, np.uint8)], bins=4)
    np.testing.assert_allclose(features, [[0.5, 0.25, 0.0, 0.25], [0.0, 0.0, 1.0, 0.0]])
    np.testing.assert_allclose(histogram_features([image], bins=256).sum(axis=1), [1.0])


def test_histogram_features_reject_zero_bins():
    with pytest.raises(ValueError):
        histogram_features([np.zeros((2, 2), np.uint8)], bins=0)


def test_geometry_features_fit_formats_on_train_and_ignore_unknown_ones():
    encoder = GeometryFeatures().fit(["png", "JPEG", "PNG"])
    assert encoder.feature_names == ["width", "height", "aspect", "format_JPEG", "format_PNG"]
    train = geometry_features([200, 100], [100, 100], ["png", "jpeg"])
    np.testing.assert_allclose(train, [[200, 100, 2.0, 0, 1], [100, 100, 1.0, 1, 0]])
    test = geometry_features([50], [100], ["gif"], encoder=encoder)
    np.testing.assert_allclose(test, [[50, 100, 0.5, 0, 0]])


# --- the linear shortcut --------------------------------------------------------------------------------------


def test_a_separating_feature_reaches_auc_one_and_a_random_one_chance():
    rng = np.random.default_rng(0)
    train_y, test_y = np.arange(400) % 2, np.arange(400) % 2
    separating = shortcut_auc(train_y + rng.normal(0, 0.1, 400), train_y, test_y + rng.normal(0, 0.1, 400), test_y)
    assert separating == pytest.approx(1.0)
    random_auc = shortcut_auc(rng.normal(size=(400, 2)), train_y, rng.normal(size=(400, 2)), test_y)
    assert abs(random_auc - 0.5) < 0.1


def test_shortcut_auc_is_none_for_a_single_class_test_set():
    assert shortcut_auc(np.arange(4.0), [0, 1, 0, 1], np.arange(3.0), [1, 1, 1]) is None


def test_shortcut_model_is_fitted_on_train_only(monkeypatch):
    fitted = []

    def recording_fit(train_X, train_y):
        model = original(train_X, train_y)
        fitted.append(model)
        return model

    original = shortcuts.fit_shortcut_model
    monkeypatch.setattr(shortcuts, "fit_shortcut_model", recording_fit)
    rng = np.random.default_rng(1)
    train_y = np.arange(60) % 2
    train_X = train_y[:, None] + rng.normal(0, 0.8, (60, 2))
    test_y = np.arange(40) % 2
    test_X = test_y[:, None] + rng.normal(0, 0.8, (40, 2))

    first = shortcut_auc(train_X, train_y, test_X, test_y)
    # Shuffled test labels and shifted test features change the score, never the fitted model.
    second = shortcut_auc(train_X, train_y, test_X * 3 + 10, rng.permutation(test_y))
    assert first != second
    (scaler_a, logistic_a), (scaler_b, logistic_b) = (model.named_steps.values() for model in fitted)
    np.testing.assert_array_equal(scaler_a.mean_, scaler_b.mean_)
    np.testing.assert_array_equal(logistic_a.coef_, logistic_b.coef_)
    np.testing.assert_array_equal(logistic_a.intercept_, logistic_b.intercept_)
    np.testing.assert_allclose(scaler_a.mean_, train_X.mean(axis=0))


# --- histogram matching -------------------------------------------------------------------------------------


def test_matching_removes_brightness_and_contrast_but_keeps_structure():
    rng = np.random.default_rng(2)
    shape = structure(rng)
    dark_flat, bright_wide = render(shape, 70, 15), render(shape, 160, 50)
    reference = reference_quantiles(np.stack([render(structure(rng), 120, 35) for _ in range(8)]))
    matched = [match_to_reference(image, reference) for image in (dark_flat, bright_wide)]
    for original, result in zip((dark_flat, bright_wide), matched, strict=True):
        assert result.dtype == np.uint8 and result.shape == original.shape
        rho = spearmanr(original.ravel(), result.ravel()).statistic
        assert rho > 0.999
    (mean_a, std_a), (mean_b, std_b) = intensity_features(matched)
    assert abs(mean_a - mean_b) < 2 and abs(std_a - std_b) < 2
    # Before matching they were far apart.
    (raw_mean_a, raw_std_a), (raw_mean_b, raw_std_b) = intensity_features([dark_flat, bright_wide])
    assert abs(raw_mean_a - raw_mean_b) > 50 and abs(raw_std_a - raw_std_b) > 20


def test_matching_keeps_ties_and_order_exactly():
    image = np.array([[10, 10, 200], [50, 50, 50]], np.uint8)
    result = match_to_reference(image, np.linspace(0, 255, 256))
    assert result.shape == (2, 3) and result.dtype == np.uint8
    assert result[0, 0] == result[0, 1] and result[1, 0] == result[1, 1] == result[1, 2]
    assert result[0, 0] < result[1, 0] < result[0, 2]
    # Mean ranks over n - 1 = 5: the two 10s 0.5 -> 0.1, the three 50s 3 -> 0.6, the single 200 5 -> 1.0.
    np.testing.assert_array_equal(result, [[26, 26, 255], [153, 153, 153]])


def test_matching_a_constant_image_gives_the_reference_median():
    result = match_to_reference(np.full((4, 4, 1), 3, np.uint8), np.linspace(0, 200, 101))
    assert np.all(result == 100)


def test_reference_quantiles_average_each_images_quantiles():
    images = np.stack([np.arange(16, dtype=np.uint8).reshape(4, 4, 1), np.full((4, 4, 1), 100, np.uint8)])
    reference = reference_quantiles(images, points=3)
    np.testing.assert_allclose(reference, [(0 + 100) / 2, (7.5 + 100) / 2, (15 + 100) / 2])


def test_match_batch_rejects_non_uint8_and_bad_shapes():
    with pytest.raises(ValueError):
        match_to_reference(np.zeros((4, 4, 1), np.float32), np.linspace(0, 255, 8))
    with pytest.raises(ValueError):
        match_batch(np.zeros((4, 4), np.uint8), np.linspace(0, 255, 8))


def test_matching_defeats_the_intensity_std_shortcut():
    train_images, train_y = confounded_set(160, seed=3)
    test_images, test_y = confounded_set(160, seed=4)

    def std_auc(train, test):
        return shortcut_auc(intensity_features(train)[:, 1:], train_y, intensity_features(test)[:, 1:], test_y)

    assert std_auc(train_images, test_images) > 0.99
    reference = reference_quantiles(train_images)
    matched_train, matched_test = match_batch(train_images, reference), match_batch(test_images, reference)
    assert matched_train.shape == train_images.shape and matched_train.dtype == np.uint8
    assert abs(std_auc(matched_train, matched_test) - 0.5) < 0.15
    full_auc = shortcut_auc(
        histogram_features(matched_train, 16), train_y, histogram_features(matched_test, 16), test_y
    )
    assert abs(full_auc - 0.5) < 0.15
