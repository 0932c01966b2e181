"""Augmentation works on the 0..255 scale, per sample, reproducibly; MixUp mixes per sample."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

from chestct.params import AugmentParams
from chestct.training.augmentation import build_augmenter, mixup

SIZE = 48
TRANSFORMS = ("rotation", "shift", "zoom", "shear", "flip", "brightness", "contrast", "sharpness", "hu_window")


def phantom_batch(count: int = 16, seed: int = 0) -> np.ndarray:
    """Mid-gray off-centre disks on black with noise: float32 (count, 48, 48, 1) in 0..255."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:SIZE, :SIZE]
    images = []
    for _ in range(count):
        cy, cx = rng.integers(18, 26, size=2)
        disk = ((yy - cy) ** 2 + ((xx - cx) / 0.8) ** 2 < 15**2) * rng.uniform(110, 150)
        images.append(np.clip(disk + rng.normal(0, 8, disk.shape), 0, 255))
    return np.stack(images)[..., None].astype(np.float32)


def with_probability(augment: AugmentParams, probability: float, only: str | None = None) -> AugmentParams:
    """Set every transform's probability (or only one's, the others to 0); MixUp is left alone."""
    updates = {}
    for name in TRANSFORMS:
        p = probability if only in (None, name) else 0.0
        updates[name] = getattr(augment, name).model_copy(update={"probability": p})
    return augment.model_copy(update=updates)


def with_setting(augment: AugmentParams, name: str, **values) -> AugmentParams:
    return augment.model_copy(update={name: getattr(augment, name).model_copy(update=values)})


@pytest.fixture(scope="module")
def images() -> np.ndarray:
    return phantom_batch()


@pytest.fixture(scope="module")
def augment(original_params) -> AugmentParams:
    """The original augmentation (intensity steps on, acquisition steps off): what these tests pin down."""
    return original_params.augment


def test_all_probabilities_zero_is_the_identity(augment, images):
    augmenter = build_augmenter(with_probability(augment, 0.0), seed=1)
    assert augmenter.step_names == []
    np.testing.assert_array_equal(augmenter(images, 7).numpy(), images)


@pytest.mark.parametrize("name", TRANSFORMS)
def test_each_transform_changes_every_image_at_probability_one(augment, images, name):
    out = build_augmenter(with_probability(augment, 1.0, only=name), seed=1)(images, 3).numpy()
    assert out.shape == images.shape and out.dtype == np.float32
    changed = np.abs(out - images).reshape(len(images), -1).max(axis=1) > 1.0
    assert changed.all(), f"{name} left {np.sum(~changed)} images unchanged"


def test_augmented_images_are_not_blank(augment, images):
    # The original project's 0..1-vs-0..255 mix-up turned every training image black; this catches it.
    out = build_augmenter(with_probability(augment, 1.0), seed=1)(images, 5).numpy()
    assert out.min() >= 0.0 and out.max() <= 255.0
    assert abs(out.mean() - images.mean()) < 0.35 * images.mean()
    assert out.std(axis=(1, 2, 3)).mean() > 0.5 * images.std(axis=(1, 2, 3)).mean()
    # Per image, all nine transforms stacked at their extremes may dim an image a lot, but never blank it.
    assert (out.std(axis=(1, 2, 3)) > 0.15 * images.std(axis=(1, 2, 3))).all(), "an augmented image went flat"
    assert (out.reshape(len(out), -1) >= 250).mean() < 0.2, "augmentation saturates the images"


def test_probability_applies_per_sample(augment):
    batch = np.repeat(phantom_batch(1), 64, axis=0)
    out = build_augmenter(with_probability(augment, 0.5, only="rotation"), seed=2)(batch, 0).numpy()
    changed = np.abs(out - batch).reshape(64, -1).max(axis=1) > 1.0
    assert 12 <= changed.sum() <= 52, f"{changed.sum()} of 64 rotated at probability 0.5"


def test_same_seed_and_key_repeat_and_others_differ(augment, images):
    params = with_probability(augment, 1.0)
    first = build_augmenter(params, seed=4)(images, 1).numpy()
    np.testing.assert_array_equal(build_augmenter(params, seed=4)(images, 1).numpy(), first)
    assert not np.allclose(build_augmenter(params, seed=5)(images, 1).numpy(), first)
    assert not np.allclose(build_augmenter(params, seed=4)(images, 2).numpy(), first)


def test_flip_probability_one_mirrors_every_image(augment, images):
    params = with_setting(with_probability(augment, 1.0, only="flip"), "flip", mode="horizontal")
    np.testing.assert_array_equal(build_augmenter(params, seed=0)(images, 0).numpy(), images[:, :, ::-1])


def _blur(image: np.ndarray) -> np.ndarray:
    """The 3x3 smoothing of PIL's and Keras' sharpness op, on the interior pixels."""
    kernel = np.ones((3, 3)) / 13.0
    kernel[1, 1] = 5.0 / 13.0
    h, w = image.shape
    return sum(kernel[i, j] * image[i : h - 2 + i, j : w - 2 + j] for i in range(3) for j in range(3))


@pytest.mark.parametrize("enhancement", [1.0, 0.5, 2.2])
def test_sharpness_range_is_the_pil_enhancement_factor(augment, images, enhancement):
    params = with_setting(
        with_probability(augment, 1.0, only="sharpness"), "sharpness", range=(enhancement, enhancement)
    )
    out = build_augmenter(params, seed=0)(images, 0).numpy()
    source = images[0, :, :, 0].astype(np.float64)
    blurred = _blur(source)
    expected = np.clip(blurred + enhancement * (source[1:-1, 1:-1] - blurred), 0, 255)
    np.testing.assert_allclose(out[0, 1:-1, 1:-1, 0], expected, atol=0.01)


def test_contrast_range_is_honoured_below_one(augment, images):
    # Keras' own factor sorting would turn [0.3, 0.4] into [1.6, 1.7]; we must shrink the contrast instead.
    params = with_setting(with_probability(augment, 1.0, only="contrast"), "contrast", range=(0.3, 0.4))
    out = build_augmenter(params, seed=0)(images, 0).numpy()
    ratio = out.std(axis=(1, 2, 3)) / images.std(axis=(1, 2, 3))
    assert ((ratio > 0.3 - 1e-3) & (ratio < 0.4 + 1e-3)).all(), ratio


def test_hu_window_maps_the_window_onto_0_255(augment):
    params = with_setting(with_probability(augment, 1.0, only="hu_window"), "hu_window", center=(100, 100))
    params = with_setting(params, "hu_window", width=(100, 100))
    ramp = np.linspace(0, 255, SIZE * SIZE, dtype=np.float32).reshape(1, SIZE, SIZE, 1)
    out = build_augmenter(params, seed=0)(ramp, 0).numpy()
    np.testing.assert_allclose(out, np.clip((ramp - 50.0) / 100.0 * 255.0, 0, 255), atol=1e-3)


def test_augmenter_runs_inside_a_parallel_tf_data_map(augment, images):
    augmenter = build_augmenter(with_probability(augment, 1.0), seed=3)
    data = tf.data.Dataset.from_tensors(images).repeat(3).enumerate()
    data = data.map(lambda key, batch: augmenter(batch, key), num_parallel_calls=3, deterministic=True)
    batches = [batch.numpy() for batch in data]
    np.testing.assert_allclose(batches[1], augmenter(images, 1).numpy(), atol=1e-3)
    assert not np.allclose(batches[0], batches[1])


# --- MixUp -------------------------------------------------------------------------------------------------------


def test_mixup_draws_a_lambda_per_sample():
    images = phantom_batch(16)
    labels = np.array([0, 1] * 8, dtype=np.int64)
    mixed, mixed_labels = mixup(images, labels, alpha=0.2, probability=1.0, seed=11)
    mixed, mixed_labels = mixed.numpy(), mixed_labels.numpy()
    assert mixed_labels.shape == (16,) and mixed_labels.dtype == np.float32
    assert ((mixed_labels >= 0) & (mixed_labels <= 1)).all()
    assert len(np.unique(np.round(mixed_labels, 6))) > 2
    assert mixed.min() >= 0 and mixed.max() <= 255
    assert not np.allclose(mixed, images)


def test_mixup_probability_zero_changes_nothing_and_keeps_label_shape():
    images = phantom_batch(8)
    labels = np.array([[0], [1]] * 4, dtype=np.float32)
    mixed, mixed_labels = mixup(images, labels, alpha=0.2, probability=0.0, seed=11)
    np.testing.assert_array_equal(mixed.numpy(), images)
    np.testing.assert_array_equal(mixed_labels.numpy(), labels)


def test_mixup_is_reproducible_for_a_seed():
    images, labels = phantom_batch(8), np.array([0, 1] * 4)
    first = mixup(images, labels, 0.4, 1.0, seed=3)[1].numpy()
    np.testing.assert_array_equal(mixup(images, labels, 0.4, 1.0, seed=3)[1].numpy(), first)
    assert not np.array_equal(mixup(images, labels, 0.4, 1.0, seed=4)[1].numpy(), first)


def test_augmenter_and_mixup_use_only_stateless_ops(augment):
    # Stateful ops (seed-generator variables, stateful RNGs) would race in a parallel tf.data map and make
    # tf.data run serially under op determinism.
    augmenter = build_augmenter(with_probability(augment, 0.5), seed=0)

    def augment_and_mix(images, key):
        return mixup(augmenter(images, key), tf.zeros([4]), 0.2, 0.5, seed=key)

    spec = (tf.TensorSpec([4, SIZE, SIZE, 1], tf.float32), tf.TensorSpec([], tf.int64))
    graph = tf.function(augment_and_mix).get_concrete_function(*spec).graph
    stateful = sorted({op.type for op in graph.get_operations() if op.op_def and op.op_def.is_stateful})
    assert stateful == [], f"stateful ops in the augmentation graph: {stateful}"
