"""The input pipeline of a lesion-map model: lesion targets beside the labels, inserted copies out of the Normal
half, masks moved by the same geometry as their image, and nothing changed when no lesion is inserted."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

from chestct.training.augmentation import _mixup_draws, build_augmenter, mixup, mixup_with_lesion_targets
from chestct.training.input_pipeline import TrainingDataError, training_dataset
from chestct.training.lesion_pool import LesionPool
from tests.test_input_pipeline import SIZE, augment_params, make_arrays, train_params


def _pool(arrays, rate: float) -> LesionPool:
    """Every Normal with a bright square 'lesion' and its mask: an inserted copy is easy to recognise."""
    normals = arrays.images[arrays.labels == 0][..., 0].copy()
    masks = np.zeros(normals.shape, bool)
    masks[:, 20:28, 20:28] = True
    normals[masks] = 250
    return LesionPool(images={"procedural": normals}, masks={"procedural": masks},
                      diameters_px={"procedural": np.full(len(normals), 8.0)}, rates={"procedural": rate})


def _batches(dataset):
    return [(images.numpy(), labels.numpy(), masks.numpy(), weights.numpy())
            for images, (labels, masks), (_, weights) in dataset]


@pytest.mark.parametrize("mix", [0.0, 0.5])
def test_without_inserted_lesions_the_images_and_labels_are_todays(original_params, default_params, mix):
    arrays = make_arrays()
    augment = augment_params(original_params.augment, None, mixup=mix)
    settings = train_params(default_params.train)
    plain = [(images.numpy(), labels.numpy()) for images, labels in training_dataset(arrays, augment, settings, 3)]
    dense = _batches(training_dataset(arrays, augment, settings, 3, lesion_pool=LesionPool()))
    assert len(plain) == len(dense) == settings.steps_per_epoch
    for (images, labels), (dense_images, dense_labels, masks, weights) in zip(plain, dense, strict=True):
        np.testing.assert_array_equal(images, dense_images)
        np.testing.assert_array_equal(labels, dense_labels)
        assert not masks.any()
        if mix == 0.0:  # Normals are known negatives everywhere, real Cancers have no outline
            np.testing.assert_array_equal(weights, 1.0 - labels[:, 0])


def test_inserted_copies_come_out_of_the_normal_half_with_their_masks(original_params, default_params):
    arrays = make_arrays()
    augment = augment_params(original_params.augment, 0.0, mixup=0.0)
    settings = train_params(default_params.train, steps_per_epoch=40)
    inserted = 0
    for images, labels, masks, weights in _batches(training_dataset(arrays, augment, settings, 5,
                                                                     lesion_pool=_pool(arrays, 0.5))):
        real_cancer = (labels[:, 0] == 1) & (weights == 0)
        assert real_cancer.sum() == settings.batch_size // 2  # the Cancer half is untouched
        with_lesion = masks.any(axis=(1, 2, 3))
        assert np.all(labels[with_lesion, 0] == 1) and np.all(weights[with_lesion] == 1)
        assert np.all(images[with_lesion][masks[with_lesion] > 0] == 250)  # the mask is where the lesion is
        assert not masks[real_cancer].any() and np.all(labels[~with_lesion & ~real_cancer, 0] == 0)
        inserted += int(with_lesion.sum())
    share = inserted / (40 * settings.batch_size // 2)
    assert 0.35 < share < 0.65  # procedural_rate 0.5 of the Normal half


def test_geometry_moves_the_mask_with_its_image(original_params):
    augment = augment_params(original_params.augment, 0.0, mixup=0.0)
    augment = augment.model_copy(update={"rotation": augment.rotation.model_copy(update={"probability": 1.0}),
                                         "shift": augment.shift.model_copy(update={"probability": 1.0})})
    images = np.zeros((6, SIZE, SIZE, 1), np.float32)
    images[:, 10:22, 14:30] = 200.0
    masks = (images > 0).astype(np.float32)
    augmenter = build_augmenter(augment, seed=2)
    moved, moved_masks = (x.numpy() for x in augmenter.with_masks(tf.constant(images), tf.constant(masks), key=1))
    assert not np.array_equal(moved_masks, masks)  # it did move
    agree = np.mean((moved > 100) == (moved_masks > 0.5))
    assert agree > 0.98 and set(np.unique(moved_masks)) <= {0.0, 1.0}
    np.testing.assert_array_equal(moved, augmenter(tf.constant(images), key=1).numpy())  # the image as without


def test_mixup_blends_the_masks_and_keeps_an_outline_only_where_both_partners_had_one():
    images = tf.constant(np.arange(4, dtype=np.float32).reshape(4, 1, 1, 1) * np.ones((4, 2, 2, 1), np.float32))
    labels = tf.constant([[0.0], [1.0], [1.0], [0.0]])
    masks = tf.constant(np.stack([np.zeros((2, 2, 1)), np.ones((2, 2, 1)), np.zeros((2, 2, 1)),
                                  np.zeros((2, 2, 1))]).astype(np.float32))
    weights = tf.constant([1.0, 1.0, 0.0, 1.0])
    mixed, mixed_labels, mixed_masks, mixed_weights = mixup_with_lesion_targets(images, labels, masks, weights,
                                                                                0.4, 1.0, seed=7)
    plain_images, plain_labels = mixup(images, labels, 0.4, 1.0, seed=7)
    np.testing.assert_array_equal(mixed.numpy(), plain_images.numpy())  # the same draws as plain MixUp
    np.testing.assert_array_equal(mixed_labels.numpy(), plain_labels.numpy())
    lam, partner = (x.numpy() for x in _mixup_draws(tf.constant(4), 0.4, 1.0, 7))
    assert np.all(lam < 1.0)  # probability 1: every sample blended
    # Sample 2 is a real Cancer (no outline): a blend with it has none either; the others keep theirs.
    expected = np.minimum(weights.numpy(), weights.numpy()[partner])
    np.testing.assert_array_equal(mixed_weights.numpy(), expected)
    np.testing.assert_allclose(mixed_masks.numpy()[:, 0, 0, 0],
                               lam * masks.numpy()[:, 0, 0, 0] + (1 - lam) * masks.numpy()[partner, 0, 0, 0],
                               atol=1e-6)


def test_a_lesion_pool_needs_balanced_batches(original_params, default_params):
    settings = train_params(default_params.train, balanced_batches=False)
    with pytest.raises(TrainingDataError, match="balanced_batches: true"):
        training_dataset(make_arrays(), original_params.augment, settings, 0, lesion_pool=LesionPool())
