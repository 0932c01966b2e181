"""Grad-CAM: shape, range and determinism on the real architecture; exact maps on a hand-built model; overlays.

The project model is built with random DenseNet121 weights (varied outputs at random init, unlike MobileNetV3)
at 64 px: at 32 px DenseNet's last map is 1 x 1, which makes every Grad-CAM map constant.
"""

from __future__ import annotations

import keras
import numpy as np
import pytest

from chestct.evaluation.gradcam import gradcam, overlay
from chestct.training.model import build_model

SIZE = 64


def images(count: int = 3, size: int = SIZE, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (count, size, size, 1), dtype=np.uint8)


@pytest.fixture(scope="module")
def densenet(default_params) -> keras.Model:
    # Seeded: at random init a map is either zero everywhere (the weighted sum is negative: no positive
    # evidence) or positive, depending on the draw; seed 3 gives positive, non-constant maps.
    keras.utils.set_random_seed(3)
    model = default_params.model
    params = model.model_copy(
        update={"backbone": "densenet121", "weights": None, "head": model.head.model_copy(update={"units": [8]})}
    )
    return build_model(params, SIZE)


def linear_model(weight: float, size: int = 8) -> keras.Model:
    """uint8 image -> "features" = image / 255 (4-D) -> mean -> sigmoid(weight * mean): dy/dA is positive if
    weight is, so Grad-CAM must return the image itself scaled by its maximum."""
    image = keras.Input((size, size, 1), dtype="uint8")
    features = keras.layers.Rescaling(1 / 255, name="features")(image)
    pooled = keras.layers.GlobalAveragePooling2D()(features)
    output = keras.layers.Dense(1, activation="sigmoid", kernel_initializer=keras.initializers.Constant(weight))(pooled)
    return keras.Model(image, output)


def test_gradcam_on_the_project_model(densenet):
    batch = images()
    heatmaps = gradcam(densenet, batch)
    assert heatmaps.shape == (3, SIZE, SIZE)
    assert heatmaps.dtype == np.float32
    assert np.all(np.isfinite(heatmaps))
    assert heatmaps.min() >= 0.0 and heatmaps.max() <= 1.0
    assert np.ptp(heatmaps[0]) > 0, "seeded random DenseNet weights should give a non-constant map"
    np.testing.assert_array_equal(gradcam(densenet, batch), heatmaps)  # deterministic for the same inputs


def test_gradcam_works_with_every_layer_frozen(densenet):
    # A frozen model has no trainable variables for the tape to watch by itself.
    batch = images(count=2, seed=1)
    before = gradcam(densenet, batch, layer_name="spatial_attention")
    trainable = {layer.name: layer.trainable for layer in densenet.layers}
    try:
        for layer in densenet.layers:
            layer.trainable = False
        np.testing.assert_allclose(gradcam(densenet, batch), before, atol=1e-6)
    finally:
        for layer in densenet.layers:
            layer.trainable = trainable[layer.name]


def test_gradcam_of_a_linear_model_is_the_normalised_input():
    batch = images(count=2, size=8, seed=2)
    heatmaps = gradcam(linear_model(weight=2.0), batch, layer_name="features")
    expected = batch[..., 0] / batch.max(axis=(1, 2, 3))[:, None, None]
    np.testing.assert_allclose(heatmaps, expected, atol=1e-5)


def test_negative_evidence_and_blank_images_give_zero_maps_without_nan():
    negative = gradcam(linear_model(weight=-2.0), images(count=2, size=8), layer_name="features")
    blank = gradcam(linear_model(weight=2.0), np.zeros((1, 8, 8, 1), np.uint8), layer_name="features")
    for heatmaps in (negative, blank):
        assert np.all(np.isfinite(heatmaps)) and np.all(heatmaps == 0)


def test_gradcam_rejects_a_non_spatial_layer_and_bad_images():
    model = linear_model(weight=1.0)
    with pytest.raises(ValueError, match="4-D"):
        gradcam(model, images(count=1, size=8), layer_name=model.layers[-2].name)
    with pytest.raises(ValueError):
        gradcam(model, np.zeros((8, 8, 1), np.uint8), layer_name="features")


def test_overlay_is_rgb_uint8_and_blends_by_alpha():
    image = np.full((SIZE, SIZE, 1), 100, np.uint8)
    heatmap = np.zeros((SIZE, SIZE), np.float32)
    heatmap[:8] = 1.0
    heatmap[-1] = np.nan
    result = overlay(image, heatmap, alpha=0.4)
    assert result.shape == (SIZE, SIZE, 3) and result.dtype == np.uint8
    hot, cold = result[0, 0].astype(int), result[SIZE // 2, 0].astype(int)
    assert hot[0] > hot[2] and cold[2] > cold[0]  # jet: red where the map is high, blue where low
    np.testing.assert_array_equal(overlay(image[..., 0], heatmap, alpha=0.0), np.repeat(image, 3, axis=-1))


def test_overlay_rejects_mismatched_shapes():
    with pytest.raises(ValueError):
        overlay(np.zeros((8, 8), np.uint8), np.zeros((4, 4)))
