"""tf.data pipelines that feed the cached `data/processed/<split>.npz` arrays to the model.

What the model receives, in training and in validation alike:
- images: float32 (B, S, S, 1) holding values in 0..255. The model takes uint8-valued grayscale and does its own
  scaling, casting whatever it gets; float32 lets MixUp and the interpolating augmentations keep fractions.
- labels: float32 (B, 1), 0 Normal / 1 Cancer (fractions after MixUp), shaped like a sigmoid output so a loss
  never broadcasts (B,) against (B, 1) into (B, B).

Training: exactly `train.steps_per_epoch` batches per iteration of the dataset (`take(steps)`), so model.fit
works with or without `steps_per_epoch=`; each new iteration (Keras starts one per epoch when the dataset's
length is known) reshuffles and redraws the augmentation, deterministically for a given seed. Balanced batches
are EXACTLY half Normal, half Cancer: each class is shuffled, repeated and batched by batch_size / 2 on its
own, and the two halves are concatenated and shuffled within the batch. Then augmentation, then MixUp, then
prefetch. Every random op is seeded or stateless, so the pipeline stays parallel and reproducible, also with
`tf.config.experimental.enable_op_determinism()`.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import tensorflow as tf

from chestct.errors import ChestctError
from chestct.imaging.processed import SplitArrays
from chestct.labels import CANCER, NORMAL
from chestct.params import AugmentParams, TrainParams
from chestct.training.augmentation import build_augmenter, mixup, seed_pair

# Salts that give each random stream of the training pipeline its own seed derived from the one global seed.
_NORMAL_SHUFFLE, _CANCER_SHUFFLE, _ALL_SHUFFLE, _BATCH_KEYS, _AUGMENT, _MIX = range(6)


class TrainingDataError(ChestctError, ValueError):
    """The training split cannot fill the batches the params ask for."""


def _derived_seed(seed: int, salt: int) -> int:
    """A 31-bit seed for one random stream, so the streams of one global seed are independent."""
    return int(np.random.SeedSequence([seed, salt]).generate_state(1)[0] >> 1)


def _to_model_inputs(images: tf.Tensor, labels: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    """uint8 images -> float32 0..255; int labels -> float32 (B, 1)."""
    return tf.cast(images, tf.float32), tf.reshape(tf.cast(labels, tf.float32), [-1, 1])


def _class_batches(images: np.ndarray, arrays: SplitArrays, label: int, half: int, seed: int) -> tf.data.Dataset:
    """Endless batches of `half` images of one class, reshuffled on every pass over the class."""
    members = arrays.labels == label
    data = tf.data.Dataset.from_tensor_slices((images[members], arrays.labels[members]))
    data = data.shuffle(int(members.sum()), seed=seed, reshuffle_each_iteration=True)
    return data.repeat().batch(half, drop_remainder=True)


def _balanced_batches(images: np.ndarray, arrays: SplitArrays, batch_size: int, seed: int) -> tf.data.Dataset:
    """Endless uint8 batches with exactly batch_size / 2 Normal then batch_size / 2 Cancer images."""
    half = batch_size // 2
    normal = _class_batches(images, arrays, NORMAL, half, _derived_seed(seed, _NORMAL_SHUFFLE))
    cancer = _class_batches(images, arrays, CANCER, half, _derived_seed(seed, _CANCER_SHUFFLE))
    return tf.data.Dataset.zip(normal, cancer).map(
        lambda n, c: (tf.concat([n[0], c[0]], axis=0), tf.concat([n[1], c[1]], axis=0))
    )


def _plain_batches(images: np.ndarray, arrays: SplitArrays, batch_size: int, seed: int) -> tf.data.Dataset:
    """Endless uint8 batches drawn from the whole split in its natural class proportions."""
    data = tf.data.Dataset.from_tensor_slices((images, arrays.labels))
    data = data.shuffle(len(arrays), seed=_derived_seed(seed, _ALL_SHUFFLE), reshuffle_each_iteration=True)
    return data.repeat().batch(batch_size, drop_remainder=True)


def _check_trainable(arrays: SplitArrays, train_params: TrainParams) -> None:
    if len(arrays) == 0:
        raise TrainingDataError("the training split is empty; check the split stage's output")
    if not train_params.balanced_batches:
        return
    if train_params.batch_size % 2:
        raise TrainingDataError(
            f"train.batch_size must be even when train.balanced_batches is true, got {train_params.batch_size}"
        )
    for label, name in ((NORMAL, "Normal"), (CANCER, "Cancer")):
        if not np.any(arrays.labels == label):
            raise TrainingDataError(
                f"train.balanced_batches needs both classes, but the training split has no {name} image"
            )


def training_dataset(
    arrays: SplitArrays, augment_params: AugmentParams, train_params: TrainParams, seed: int,
    standardise: Callable[[tf.Tensor], tf.Tensor] | None = None,
) -> tf.data.Dataset:
    """Augmented (balanced) training batches: (images float32 (B, S, S, 1) 0..255, labels float32 (B, 1)).

    With `standardise` (chestct.training.photometric.standardise_tf) the batches start from the unstandardised
    images, go through the acquisition steps and are standardised again; otherwise they start from the images.
    One iteration yields exactly `train_params.steps_per_epoch` batches; iterate again for the next epoch.
    """
    _check_trainable(arrays, train_params)
    if standardise is not None and arrays.unstandardised is None:
        raise TrainingDataError("re-standardising needs the unstandardised images; rerun `dvc repro preprocess`")
    source = arrays.images if standardise is None else arrays.unstandardised[..., np.newaxis]
    batch_size = train_params.batch_size
    if train_params.balanced_batches:
        batches = _balanced_batches(source, arrays, batch_size, seed)
    else:
        batches = _plain_batches(source, arrays, batch_size, seed)
    # One random key per batch, redrawn on every iteration: it seeds that batch's augmentation and MixUp.
    keys = tf.data.Dataset.random(seed=_derived_seed(seed, _BATCH_KEYS), rerandomize_each_iteration=True)
    batches = tf.data.Dataset.zip(batches.take(train_params.steps_per_epoch), keys)

    augmenter = build_augmenter(augment_params, _derived_seed(seed, _AUGMENT), standardise)
    mix = augment_params.mixup
    mix_seed = _derived_seed(seed, _MIX)
    shuffle_within = train_params.balanced_batches  # the two halves arrive Normal-first, Cancer-second

    def augment_batch(batch: tuple[tf.Tensor, tf.Tensor], key: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        images, labels = _to_model_inputs(*batch)
        batch_seed = seed_pair(mix_seed, key)
        if shuffle_within:
            order = tf.argsort(tf.random.stateless_uniform([batch_size], seed=seed_pair(batch_seed, 0)))
            images, labels = tf.gather(images, order), tf.gather(labels, order)
        images = augmenter(images, key)
        if mix.probability > 0:
            images, labels = mixup(images, labels, mix.alpha, mix.probability, seed_pair(batch_seed, 1))
        return images, labels

    batches = batches.map(augment_batch, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    return batches.prefetch(tf.data.AUTOTUNE)


def validation_dataset(arrays: SplitArrays, batch_size: int) -> tf.data.Dataset:
    """Every image exactly once, in file order, unaugmented: (images float32 0..255, labels float32 (B, 1))."""
    data = tf.data.Dataset.from_tensor_slices((arrays.images, arrays.labels)).batch(batch_size)
    data = data.map(_to_model_inputs, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    return data.prefetch(tf.data.AUTOTUNE)
