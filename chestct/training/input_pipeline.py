"""tf.data pipelines that stream the processed splits (`data/processed/<split>/` shards) to the model.

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

Streaming: a split read from disk is never loaded whole. Each class stream visits its class's shards in a
seeded order that changes every pass, reads `SHARD_CYCLE` shards at a time (one `read_file` each, interleaved
image by image) and shuffles within a buffer of `train.shuffle_buffer` images, so memory is bounded by those
two, not by the dataset. A split of at most `shuffle_buffer` images per class is shuffled whole, as before.
Arrays built in memory (tests, benchmarks) go through the same shuffles from `from_tensor_slices`.

Lesion targets (a model with a lesion map, chestct.training.lesion_map): the batches also carry a lesion mask
and a mask weight per image, and the dataset yields (images, (labels, masks), (1, mask weights)): targets and
sample weights in the model's output order, prediction then lesion_map. A Normal's mask is all zero (weight 1:
every position is a known negative); a Normal with an inserted lesion (chestct.training.lesion_pool) has the
lesion's mask, label 1 and weight 1, and so has a LIDC nodule crop at its own scale; a real Cancer has no
outline (weight 0: only the pooled image-level loss reaches it). The inserted copies and crops come out of the
Normal half at their rates, so every batch still holds batch_size / 2 real Cancers. Geometry moves image and
mask together; MixUp blends them alike.

Distribution: every worker builds the same global batches and tf.data's DATA auto-sharding hands each replica
its slice of each one, so N workers take the same optimisation steps as one process with the same batch.

Options: every dataset here carries `chestct.tf_data.pipeline_options()`: tf.data's autotuning off (its thread
idled both cores at the end of every fit and validation pass) and DATA auto-sharding.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import tensorflow as tf

from chestct.errors import ChestctError
from chestct.imaging.processed import SplitArrays
from chestct.labels import CANCER, NORMAL
from chestct.params import AugmentParams, TrainParams
from chestct.tf_data import pipeline_options
from chestct.training.augmentation import build_augmenter, mixup, mixup_with_lesion_targets, seed_pair
from chestct.training.lesion_pool import LesionPool

SHARD_CYCLE = 4  # shards of one stream read at a time (each is read whole: at most shard_images images)

# Salts that give each random stream of the training pipeline its own seed derived from the one global seed.
_NORMAL_SHUFFLE, _CANCER_SHUFFLE, _ALL_SHUFFLE, _BATCH_KEYS, _AUGMENT, _MIX, _SHARD_ORDER = range(7)
_POOL_SHUFFLE, _NORMAL_HALF = 7, 8


class TrainingDataError(ChestctError, ValueError):
    """The training split cannot fill the batches the params ask for."""


def _derived_seed(seed: int, salt: int) -> int:
    """A 31-bit seed for one random stream, so the streams of one global seed are independent."""
    return int(np.random.SeedSequence([seed, salt]).generate_state(1)[0] >> 1)


def _to_model_inputs(images: tf.Tensor, labels: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    """uint8 images -> float32 0..255; int labels -> float32 (B, 1)."""
    return tf.cast(images, tf.float32), tf.reshape(tf.cast(labels, tf.float32), [-1, 1])


def _read_shard(path: tf.Tensor, count: tf.Tensor, label: tf.Tensor, image_shape: tuple[int, ...]):
    """One whole .npy shard as (count, *image_shape) uint8 with its labels; the pixels are its last bytes."""
    raw = tf.io.decode_raw(tf.io.read_file(path), tf.uint8)
    pixels = raw[tf.size(raw) - count * int(np.prod(image_shape)):]
    images = tf.reshape(pixels, [count, *image_shape])
    if len(image_shape) == 2:  # the unstandardised field is stored without its channel axis
        images = images[..., tf.newaxis]
    return images, tf.fill([count], label)


def _stream(arrays: SplitArrays, field: str, label: int | None, seed: int, shuffle_shards: bool) -> tf.data.Dataset:
    """(image (S, S, 1) uint8, label int64) for every image of the split (or of one class), read from its shards
    SHARD_CYCLE at a time (shard order reshuffled every pass when `shuffle_shards`), or from memory."""
    if arrays.layout is None:
        images = arrays.images if field == "images" else arrays.unstandardised[..., np.newaxis]
        members = np.ones(len(arrays), bool) if label is None else arrays.labels == label
        return tf.data.Dataset.from_tensor_slices((images[members], arrays.labels[members]))
    layout = arrays.layout
    shards = layout.shards if label is None else layout.shards_of(label)
    image_shape = (layout.image_size, layout.image_size, 1) if field == "images" else (layout.image_size,) * 2
    files = tf.data.Dataset.from_tensor_slices((
        tf.constant([str(shard.file(layout.folder, field)) for shard in shards], tf.string),
        tf.constant([shard.count for shard in shards], tf.int32),
        tf.constant([shard.label for shard in shards], tf.int64)))
    if shuffle_shards and len(shards) > 1:
        files = files.shuffle(len(shards), seed=_derived_seed(seed, _SHARD_ORDER), reshuffle_each_iteration=True)
    return files.interleave(
        lambda path, count, shard_label: tf.data.Dataset.from_tensor_slices(
            _read_shard(path, count, shard_label, image_shape)),
        cycle_length=max(1, min(SHARD_CYCLE, len(shards))), num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)


def _shuffled(data: tf.data.Dataset, count: int, buffer: int, seed: int) -> tf.data.Dataset:
    return data.shuffle(max(1, min(count, buffer)), seed=seed, reshuffle_each_iteration=True)


def _class_stream(arrays: SplitArrays, field: str, label: int, buffer: int, seed: int) -> tf.data.Dataset:
    """Endless images of one class, reshuffled on every pass over the class."""
    count = int(np.sum(arrays.labels == label))
    data = _stream(arrays, field, label, seed, shuffle_shards=True)
    if count <= buffer and arrays.layout is not None:
        data = data.cache()  # the class fits in the shuffle buffer anyway: read its shards once, not every pass
    return _shuffled(data, count, buffer, seed).repeat()


def _class_batches(arrays: SplitArrays, field: str, label: int, half: int, buffer: int, seed: int) -> tf.data.Dataset:
    """Endless batches of `half` images of one class."""
    return _class_stream(arrays, field, label, buffer, seed).batch(half, drop_remainder=True)


def _balanced_batches(arrays: SplitArrays, field: str, batch_size: int, buffer: int, seed: int) -> tf.data.Dataset:
    """Endless uint8 batches with exactly batch_size / 2 Normal then batch_size / 2 Cancer images."""
    half = batch_size // 2
    normal = _class_batches(arrays, field, NORMAL, half, buffer, _derived_seed(seed, _NORMAL_SHUFFLE))
    cancer = _class_batches(arrays, field, CANCER, half, buffer, _derived_seed(seed, _CANCER_SHUFFLE))
    return tf.data.Dataset.zip(normal, cancer).map(
        lambda n, c: (tf.concat([n[0], c[0]], axis=0), tf.concat([n[1], c[1]], axis=0))
    )


def _with_targets(mask_weight: float):
    """(image, label) -> (image, label, all-zero mask, mask weight)."""
    return lambda image, label: (image, label, tf.zeros_like(image), tf.constant(mask_weight, tf.float32))


def _pool_stream(images: np.ndarray, masks: np.ndarray, seed: int) -> tf.data.Dataset:
    """Endless (image, label 1, mask, weight 1) from one source of inserted copies, reshuffled every pass."""
    data = tf.data.Dataset.from_tensor_slices((images[..., np.newaxis], masks[..., np.newaxis].astype(np.uint8)))
    data = data.shuffle(len(images), seed=seed, reshuffle_each_iteration=True).repeat()
    return data.map(lambda image, mask: (image, tf.constant(CANCER, tf.int64), mask, tf.constant(1.0)))


def _lesion_batches(arrays: SplitArrays, field: str, batch_size: int, buffer: int, seed: int,
                    pool: LesionPool) -> tf.data.Dataset:
    """Endless (images, labels, masks, mask weights) batches: half Cancer, half Normal with inserted copies
    drawn into the Normal half at the pool's rates."""
    half = batch_size // 2
    normal = _class_stream(arrays, field, NORMAL, buffer, _derived_seed(seed, _NORMAL_SHUFFLE)).map(_with_targets(1.0))
    cancer = _class_stream(arrays, field, CANCER, buffer, _derived_seed(seed, _CANCER_SHUFFLE)).map(_with_targets(0.0))
    sources, rates = [normal], [1.0 - sum(pool.rates.values())]
    for index, (source, rate) in enumerate(sorted(pool.rates.items())):
        sources.append(_pool_stream(pool.images[source], pool.masks[source],
                                    _derived_seed(seed, _POOL_SHUFFLE * 100 + index)))
        rates.append(rate)
    if len(sources) > 1:
        normal = tf.data.Dataset.sample_from_datasets(sources, weights=rates, seed=_derived_seed(seed, _NORMAL_HALF))
    normal, cancer = normal.batch(half, drop_remainder=True), cancer.batch(half, drop_remainder=True)
    return tf.data.Dataset.zip(normal, cancer).map(
        lambda n, c: tuple(tf.concat([a, b], axis=0) for a, b in zip(n, c, strict=True)))


def _plain_batches(arrays: SplitArrays, field: str, batch_size: int, buffer: int, seed: int) -> tf.data.Dataset:
    """Endless uint8 batches drawn from the whole split in its natural class proportions."""
    seed = _derived_seed(seed, _ALL_SHUFFLE)
    data = _stream(arrays, field, None, seed, shuffle_shards=True)
    if len(arrays) <= buffer and arrays.layout is not None:
        data = data.cache()  # as in _class_batches
    return _shuffled(data, len(arrays), buffer, seed).repeat().batch(batch_size, drop_remainder=True)


def _check_trainable(arrays: SplitArrays, train_params: TrainParams, pool: LesionPool | None = None) -> None:
    if len(arrays) == 0:
        raise TrainingDataError("the training split is empty; check the split stage's output")
    if pool is not None and not train_params.balanced_batches:
        raise TrainingDataError("a lesion-map model trains on balanced batches (inserted lesions replace part of "
                                "the Normal half): set train.balanced_batches: true")
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
    standardise: Callable[[tf.Tensor], tf.Tensor] | None = None, lesion_pool: LesionPool | None = None,
) -> tf.data.Dataset:
    """Augmented (balanced) training batches: (images float32 (B, S, S, 1) 0..255, labels float32 (B, 1)).

    With `standardise` (chestct.training.photometric.standardise_tf) the batches start from the unstandardised
    images, go through the acquisition steps and are standardised again; otherwise they start from the images.
    With `lesion_pool` (a lesion-map model; the pool may be empty) they carry lesion targets (module docstring).
    One iteration yields exactly `train_params.steps_per_epoch` batches; iterate again for the next epoch.
    """
    _check_trainable(arrays, train_params, lesion_pool)
    if lesion_pool is not None:
        return _lesion_training_dataset(arrays, augment_params, train_params, seed, standardise, lesion_pool)
    if standardise is not None and arrays.unstandardised is None:
        raise TrainingDataError("re-standardising needs the unstandardised images; rerun `dvc repro preprocess`")
    field = "images" if standardise is None else "unstandardised"
    batch_size, buffer = train_params.batch_size, train_params.shuffle_buffer
    if train_params.balanced_batches:
        batches = _balanced_batches(arrays, field, batch_size, buffer, seed)
    else:
        batches = _plain_batches(arrays, field, batch_size, buffer, seed)
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
    return batches.prefetch(tf.data.AUTOTUNE).with_options(pipeline_options())


def _lesion_training_dataset(arrays: SplitArrays, augment_params: AugmentParams, train_params: TrainParams,
                             seed: int, standardise, pool: LesionPool) -> tf.data.Dataset:
    """training_dataset for a lesion-map model: the same shuffles, augmentation and MixUp, with lesion targets."""
    field = "images" if standardise is None else "unstandardised"
    batch_size = train_params.batch_size
    batches = _lesion_batches(arrays, field, batch_size, train_params.shuffle_buffer, seed, pool)
    keys = tf.data.Dataset.random(seed=_derived_seed(seed, _BATCH_KEYS), rerandomize_each_iteration=True)
    batches = tf.data.Dataset.zip(batches.take(train_params.steps_per_epoch), keys)
    augmenter = build_augmenter(augment_params, _derived_seed(seed, _AUGMENT), standardise)
    mix = augment_params.mixup
    mix_seed = _derived_seed(seed, _MIX)

    def augment_batch(batch, key):
        images, labels = _to_model_inputs(batch[0], batch[1])
        masks, weights = tf.cast(batch[2], tf.float32), batch[3]
        batch_seed = seed_pair(mix_seed, key)
        order = tf.argsort(tf.random.stateless_uniform([batch_size], seed=seed_pair(batch_seed, 0)))
        images, labels, masks, weights = (tf.gather(t, order) for t in (images, labels, masks, weights))
        images, masks = augmenter.with_masks(images, masks, key)
        if mix.probability > 0:
            images, labels, masks, weights = mixup_with_lesion_targets(
                images, labels, masks, weights, mix.alpha, mix.probability, seed_pair(batch_seed, 1))
        return images, (labels, masks), (tf.ones([batch_size]), weights)

    batches = batches.map(augment_batch, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    return batches.prefetch(tf.data.AUTOTUNE).with_options(pipeline_options())


def validation_dataset(arrays: SplitArrays, batch_size: int) -> tf.data.Dataset:
    """Every image exactly once, unaugmented: (images float32 0..255, labels float32 (B, 1)).

    From memory in index order; from disk shard by shard (each read once, in layout order): read the labels from
    the dataset, not from `arrays.labels`, when the order matters.
    """
    data = _stream(arrays, "images", None, seed=0, shuffle_shards=False).batch(batch_size)
    data = data.map(_to_model_inputs, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    return data.prefetch(tf.data.AUTOTUNE).with_options(pipeline_options())
