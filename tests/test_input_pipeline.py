"""The tf.data pipelines: loading, exact class balance, epochs, determinism, and the untouched validation set."""

from __future__ import annotations

import warnings

import keras
import numpy as np
import pytest
import tensorflow as tf
from tensorflow.python.framework import config as tf_config

from chestct.imaging.processed import SplitArrays
from chestct.params import AugmentParams, TrainParams
from chestct.training.input_pipeline import training_dataset, validation_dataset

SIZE = 48
COUNT = 40  # 14 Normal, 26 Cancer: unequal on purpose, so balance is the pipeline's doing
TRANSFORMS = ("rotation", "shift", "zoom", "shear", "flip", "brightness", "contrast", "sharpness", "hu_window")


def make_arrays(count: int = COUNT, normals: int = 14, seed: int = 0) -> SplitArrays:
    """Mid-gray disks on black with noise; every image distinct, so a batch can be traced back to its source."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:SIZE, :SIZE]
    disk = ((yy - 24) ** 2 + (xx - 24) ** 2 < 15**2) * 128.0
    images = np.clip(disk + rng.normal(0, 10, (count, SIZE, SIZE)), 0, 255).astype(np.uint8)[..., None]
    labels = np.array([0] * normals + [1] * (count - normals), dtype=np.int64)
    subtypes = np.where(labels == 0, "normal", "adenocarcinoma")
    ids = np.array([f"img{i:03d}" for i in range(count)])
    return SplitArrays(images, labels, subtypes, ids)


def augment_params(augment: AugmentParams, probability: float | None, mixup: float) -> AugmentParams:
    """Every transform at `probability` (None keeps params.yaml's) and MixUp at `mixup`."""
    updates = {"mixup": augment.mixup.model_copy(update={"probability": mixup})}
    if probability is not None:
        for name in TRANSFORMS:
            updates[name] = getattr(augment, name).model_copy(update={"probability": probability})
    return augment.model_copy(update=updates)


def train_params(base: TrainParams, **changes) -> TrainParams:
    settings = {"batch_size": 16, "steps_per_epoch": 5, "balanced_batches": True} | changes
    return base.model_copy(update=settings)


@pytest.fixture(scope="module")
def arrays() -> SplitArrays:
    return make_arrays()


@pytest.fixture(scope="module")
def no_augment(original_params) -> AugmentParams:
    return augment_params(original_params.augment, 0.0, mixup=0.0)


@pytest.fixture(scope="module")
def full_augment(original_params) -> AugmentParams:
    return augment_params(original_params.augment, None, mixup=0.5)


def source_index(arrays: SplitArrays, image: np.ndarray) -> int:
    matches = np.flatnonzero((arrays.images == image.astype(np.uint8)).all(axis=(1, 2, 3)))
    assert len(matches) == 1, "a batch image is not one of the source images"
    return int(matches[0])


# --- training ----------------------------------------------------------------------------------------------------


def test_balanced_batches_are_exactly_half_and_half(arrays, no_augment, default_params):
    params = train_params(default_params.train)
    batches = list(training_dataset(arrays, no_augment, params, seed=1).as_numpy_iterator())
    assert len(batches) == params.steps_per_epoch
    orders = set()
    for images, labels in batches:
        assert images.shape == (16, SIZE, SIZE, 1) and images.dtype == np.float32
        assert labels.shape == (16, 1) and labels.dtype == np.float32
        assert labels.sum() == 8
        # Unaugmented, each image is a source image and carries that image's label.
        sources = [source_index(arrays, image) for image in images]
        np.testing.assert_array_equal(arrays.labels[sources], labels[:, 0])
        orders.add(tuple(labels[:, 0]))
    assert len(orders) > 1, "the two class halves are not shuffled within the batch"


def test_unbalanced_batches_follow_the_data(arrays, no_augment, default_params):
    params = train_params(default_params.train, balanced_batches=False, batch_size=10, steps_per_epoch=8)
    batches = list(training_dataset(arrays, no_augment, params, seed=1).as_numpy_iterator())
    assert len(batches) == 8 and all(images.shape == (10, SIZE, SIZE, 1) for images, _ in batches)
    seen = [source_index(arrays, image) for images, _ in batches[:4] for image in images]
    assert len(set(seen)) == COUNT, "one pass over 40 images should show each once"


def test_every_epoch_has_the_same_length_and_new_batches(arrays, full_augment, default_params):
    data = training_dataset(arrays, full_augment, train_params(default_params.train, steps_per_epoch=3), seed=1)
    first, second = (list(data.as_numpy_iterator()) for _ in range(2))
    assert len(first) == len(second) == 3
    assert not np.allclose(first[0][0], second[0][0])


@pytest.fixture(scope="module")
def first_batch(arrays, full_augment, default_params):
    """The first (images, labels) batch of a fully augmented pipeline for a given seed."""

    def build(seed: int) -> tuple[np.ndarray, np.ndarray]:
        images, labels = next(iter(training_dataset(arrays, full_augment, train_params(default_params.train), seed)))
        return images.numpy(), labels.numpy()

    return build


def test_augmented_training_batches_are_sane(arrays, first_batch):
    images, labels = first_batch(2)
    assert images.min() >= 0 and images.max() <= 255
    assert abs(images.mean() - arrays.images.mean()) < 0.35 * arrays.images.mean()
    assert ((labels >= 0) & (labels <= 1)).all()


def test_same_seed_same_batches_other_seed_other_batches(first_batch):
    images, labels = first_batch(3)
    again_images, again_labels = first_batch(3)
    np.testing.assert_array_equal(again_images, images)
    np.testing.assert_array_equal(again_labels, labels)
    assert not np.allclose(first_batch(4)[0], images)


def test_pipeline_works_and_agrees_under_op_determinism(first_batch):
    # Training turns op determinism on; stateful random ops would then fail or serialise the pipeline.
    was_enabled = tf_config.is_op_determinism_enabled()
    tf.config.experimental.enable_op_determinism()
    try:
        images, labels = first_batch(2)
    finally:
        if not was_enabled:
            tf_config.disable_op_determinism()  # no public switch-off: keep the other tests' world unchanged
    expected_images, expected_labels = first_batch(2)
    np.testing.assert_allclose(images, expected_images, atol=1e-3)
    np.testing.assert_allclose(labels, expected_labels, atol=1e-6)


def test_balanced_batches_need_an_even_batch_and_both_classes(arrays, no_augment, default_params):
    with pytest.raises(ValueError, match="batch_size must be even"):
        training_dataset(arrays, no_augment, train_params(default_params.train, batch_size=15), seed=0)
    normals_only = make_arrays(count=10, normals=10)
    with pytest.raises(ValueError, match="no Cancer image"):
        training_dataset(normals_only, no_augment, train_params(default_params.train), seed=0)


def test_keras_fit_runs_every_epoch_without_running_out(arrays, full_augment, default_params):
    params = train_params(default_params.train, steps_per_epoch=3)
    model = keras.Sequential(
        [keras.Input((SIZE, SIZE, 1)), keras.layers.GlobalAveragePooling2D(), keras.layers.Dense(1, "sigmoid")]
    )
    model.compile("sgd", "binary_crossentropy")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        history = model.fit(
            training_dataset(arrays, full_augment, params, seed=0), epochs=2, steps_per_epoch=3, verbose=0
        )
    assert len(history.history["loss"]) == 2
    assert not [w for w in caught if "ran out of data" in str(w.message)]


# --- validation --------------------------------------------------------------------------------------------------


def test_validation_yields_every_image_once_in_order_unchanged(arrays):
    batches = list(validation_dataset(arrays, batch_size=16).as_numpy_iterator())
    assert [len(images) for images, _ in batches] == [16, 16, 8]
    images = np.concatenate([images for images, _ in batches])
    labels = np.concatenate([labels for _, labels in batches])
    assert images.dtype == np.float32 and labels.shape == (COUNT, 1)
    np.testing.assert_array_equal(images, arrays.images.astype(np.float32))
    np.testing.assert_array_equal(labels[:, 0], arrays.labels)


# --- training from the unstandardised images: acquisition steps, then the standardisation in TensorFlow ---------

ACQUISITION = ("window_level", "gamma", "noise", "blur", "jpeg")


def masked_arrays(count: int = 24, normals: int = 10) -> SplitArrays:
    """Disks of tissue (>= 1 inside, 0 outside) with a random window each; images = their equalisation."""
    from chestct.imaging.standardise import equalise_in_mask

    rng = np.random.default_rng(4)
    yy, xx = np.mgrid[:SIZE, :SIZE]
    inside = (yy - 24) ** 2 + (xx - 24) ** 2 < 18**2
    raw = rng.normal(90, 25, (count, SIZE, SIZE)) * rng.uniform(0.5, 1.5, (count, 1, 1))
    unstandardised = np.where(inside, np.clip(raw, 1, 255), 0).astype(np.uint8)
    images = np.stack([equalise_in_mask(image) for image in unstandardised])[..., None]
    labels = np.array([0] * normals + [1] * (count - normals), dtype=np.int64)
    return SplitArrays(images, labels, np.where(labels == 0, "normal", "adenocarcinoma"),
                       np.array([f"m{i:03d}" for i in range(count)]), unstandardised)


def acquisition_params(augment: AugmentParams, probability: float) -> AugmentParams:
    updates = {name: getattr(augment, name).model_copy(update={"probability": probability}) for name in ACQUISITION}
    return augment.model_copy(update=updates)


def test_restandardised_batches_equal_the_cached_images_when_nothing_is_perturbed(no_augment, default_params):
    from chestct.training.photometric import equalise_in_mask_tf

    arrays = masked_arrays()
    settings = train_params(default_params.train, batch_size=8, steps_per_epoch=3)
    cached = {image.tobytes() for image in arrays.images.astype(np.float32)}
    dataset = training_dataset(arrays, no_augment, settings, seed=1, standardise=equalise_in_mask_tf)
    for images, _ in dataset:
        for image in images.numpy():
            assert image.tobytes() in cached  # the TF standardisation rebuilt exactly the cached input


def test_acquisition_steps_change_the_window_but_the_model_still_gets_standardised_images(no_augment,
                                                                                          default_params):
    from chestct.training.photometric import equalise_in_mask_tf

    arrays = masked_arrays()
    settings = train_params(default_params.train, batch_size=8, steps_per_epoch=3)
    augment = acquisition_params(no_augment, 1.0)
    first = [b[0].numpy() for b in training_dataset(arrays, augment, settings, 1, equalise_in_mask_tf)]
    again = [b[0].numpy() for b in training_dataset(arrays, augment, settings, 1, equalise_in_mask_tf)]
    for images, repeat in zip(first, again, strict=True):
        np.testing.assert_array_equal(images, repeat)  # seeded: the same batches every run
        inside = images > 0
        assert inside.any() and images[inside].min() >= 1 and images.max() <= 255
        # Equalised: within each image the inside pixels spread over the whole range, whatever the window.
        for image in images:
            values = image[image > 0]
            assert values.min() < 40 and values.max() > 215
    cached = {image.tobytes() for image in arrays.images.astype(np.float32)}
    assert any(image.tobytes() not in cached for images in first for image in images)


def test_restandardising_without_the_unstandardised_images_is_refused(no_augment, default_params, arrays):
    from chestct.training.input_pipeline import TrainingDataError
    from chestct.training.photometric import equalise_in_mask_tf

    with pytest.raises(TrainingDataError, match="dvc repro preprocess"):
        training_dataset(arrays, no_augment, train_params(default_params.train), 1, equalise_in_mask_tf)


def test_acquisition_steps_at_low_probabilities_leave_some_batches_untouched(no_augment, default_params):
    """A step that picks no image of a batch (JPEG's per-image map over an empty batch included) is a no-op."""
    from chestct.training.photometric import equalise_in_mask_tf

    arrays = masked_arrays()
    settings = train_params(default_params.train, batch_size=4, steps_per_epoch=6)
    batches = list(training_dataset(arrays, acquisition_params(no_augment, 0.05), settings, 3, equalise_in_mask_tf))
    assert len(batches) == 6 and all(images.shape == (4, SIZE, SIZE, 1) for images, _ in batches)
