"""Acquisition augmentation: make the stored window, noise and compression useless as cues, then standardise.

These steps run in training only, on the UNSTANDARDISED masked image the preprocess stage caches (0 outside the
body, >= 1 inside; chestct.imaging.standardise): a random window (level and width) and gamma, noise, a blur or
sharpening, and JPEG re-encoding, each with its own probability. Then `standardise_tf` applies the same
intensity standardisation as preprocessing (`preprocess.intensity`), re-implemented with TensorFlow ops so it
runs inside tf.data: a test proves it gives the numpy version's array. What the model sees in training is then
a standardised image whatever window the slice was stored with, exactly as at evaluation and serving time.

Every transform keeps the mask: pixels outside the body stay 0, pixels inside stay within 1..255. Randomness
is stateless (seed pairs), as in chestct.training.augmentation.
"""

from __future__ import annotations

import tensorflow as tf

from chestct.params import AugmentParams, PreprocessParams

GRAY_LEVELS = 256


def _inside(reference: tf.Tensor) -> tf.Tensor:
    return reference > 0.5


def _keep_mask(reference: tf.Tensor, transformed: tf.Tensor) -> tf.Tensor:
    """0 where `reference` is outside the body, `transformed` clipped to 1..255 inside."""
    return tf.where(_inside(reference), tf.clip_by_value(transformed, 1.0, 255.0), 0.0)


def _per_sample(images: tf.Tensor, low: float, high: float, seed: tf.Tensor) -> tf.Tensor:
    values = tf.random.stateless_uniform([tf.shape(images)[0]], seed=seed, minval=low, maxval=high)
    return tf.reshape(values, [-1, 1, 1, 1])


def window_level_transform(shift: float, width: tuple[float, float]):
    """A random re-windowing: level moved by up to `shift` of the grey range, width scaled within `width`."""

    def transform(images: tf.Tensor, seed: tf.Tensor) -> tf.Tensor:
        level = _per_sample(images, -shift, shift, tf.random.experimental.stateless_fold_in(seed, 0)) * 255.0
        scale = _per_sample(images, *width, tf.random.experimental.stateless_fold_in(seed, 1))
        return _keep_mask(images, (images - 127.5 - level) / scale + 127.5)

    return transform


def gamma_transform(low: float, high: float):
    def transform(images: tf.Tensor, seed: tf.Tensor) -> tf.Tensor:
        value = _per_sample(images, low, high, seed)
        return _keep_mask(images, 255.0 * tf.pow(tf.clip_by_value(images, 0.0, 255.0) / 255.0, value))

    return transform


def noise_transform(std: float):
    """Gaussian noise of a random std up to `std` of the grey range."""

    def transform(images: tf.Tensor, seed: tf.Tensor) -> tf.Tensor:
        level = _per_sample(images, 0.0, std * 255.0, tf.random.experimental.stateless_fold_in(seed, 0))
        noise = tf.random.stateless_normal(tf.shape(images), seed=tf.random.experimental.stateless_fold_in(seed, 1))
        return _keep_mask(images, images + level * noise)

    return transform


def _gaussian_kernel(sigma: float) -> tf.Tensor:
    radius = max(1, int(round(3 * sigma)))
    x = tf.range(-radius, radius + 1, dtype=tf.float32)
    kernel_1d = tf.exp(-(x**2) / (2.0 * sigma**2))
    kernel_1d /= tf.reduce_sum(kernel_1d)
    return tf.reshape(tf.tensordot(kernel_1d, kernel_1d, axes=0), [2 * radius + 1, 2 * radius + 1, 1, 1])


def blur_transform(sigma: float, strength: float):
    """Blend towards (a > 0, blur) or away from (a < 0, sharpen) a Gaussian blur: x + a * (blur(x) - x)."""
    kernel = _gaussian_kernel(sigma)

    def transform(images: tf.Tensor, seed: tf.Tensor) -> tf.Tensor:
        amount = _per_sample(images, -strength, strength, seed)
        blurred = tf.nn.conv2d(images, kernel, strides=1, padding="SAME")
        return _keep_mask(images, images + amount * (blurred - images))

    return transform


def jpeg_transform(low: int, high: int):
    """JPEG re-encoding at a random quality in [low, high)."""

    def transform(images: tf.Tensor, seed: tf.Tensor) -> tf.Tensor:
        count = tf.shape(images)[0]
        seeds = tf.random.experimental.stateless_split(seed, num=count)

        def one(args):
            image, image_seed = args
            encoded = tf.cast(tf.clip_by_value(tf.round(image), 0.0, 255.0), tf.uint8)
            changed = tf.image.stateless_random_jpeg_quality(encoded, low, high, image_seed)
            return tf.cast(changed, tf.float32)

        # map_fn cannot stack an empty result without a static element shape: no image chosen, nothing to do.
        recoded = tf.cond(count > 0, lambda: tf.map_fn(one, (images, seeds), fn_output_signature=tf.float32),
                          lambda: images)
        return _keep_mask(images, recoded)

    return transform


# --- the standardisation, in TensorFlow -------------------------------------------------------------------------


def _level_counts(levels: tf.Tensor) -> tf.Tensor:
    """(B, 256) int64 counts of each grey level among the masked (> 0) pixels of int32 images (B, S, S, 1)."""
    batch = tf.shape(levels)[0]
    flat = tf.reshape(levels, [batch, -1])
    offsets = tf.range(batch)[:, None] * GRAY_LEVELS
    counts = tf.math.bincount(tf.reshape(flat + offsets, [-1]), minlength=batch * GRAY_LEVELS,
                              maxlength=batch * GRAY_LEVELS, dtype=tf.int64)
    counts = tf.reshape(counts, [batch, GRAY_LEVELS])
    return tf.concat([tf.zeros([batch, 1], tf.int64), counts[:, 1:]], axis=1)  # level 0 is outside the mask


def equalise_in_mask_tf(images: tf.Tensor) -> tf.Tensor:
    """chestct.imaging.standardise.equalise_in_mask for a batch (B, S, S, 1) of 0..255 values, float32 out."""
    levels = tf.cast(tf.clip_by_value(tf.round(images), 0.0, 255.0), tf.int32)
    counts = _level_counts(levels)
    below = tf.cumsum(counts, axis=1, exclusive=True)
    total = tf.reduce_sum(counts, axis=1, keepdims=True)
    table = 1 + (254 * (2 * below + counts)) // tf.maximum(2 * total, 1)
    table = tf.where(tf.range(GRAY_LEVELS)[None, :] == 0, tf.zeros_like(table), table)
    table = tf.where(total > 0, table, tf.zeros_like(table))
    mapped = tf.gather(table, tf.reshape(levels, [tf.shape(levels)[0], -1]), batch_dims=1)
    return tf.cast(tf.reshape(mapped, tf.shape(images)), tf.float32)


def _percentile_level(counts: tf.Tensor, position: tf.Tensor) -> tf.Tensor:
    """The grey level of the order statistic at integer index `position` (B,) given level counts (B, 256)."""
    cumulative = tf.cumsum(counts, axis=1)
    return tf.cast(tf.searchsorted(cumulative, tf.cast(position, tf.int64)[:, None], side="right")[:, 0],
                   tf.float64)


def percentile_in_mask_tf(images: tf.Tensor, low: float, high: float) -> tf.Tensor:
    """chestct.imaging.standardise.percentile_in_mask for a batch (linear interpolation between order statistics,
    as numpy's default); float32 out."""
    levels = tf.cast(tf.clip_by_value(tf.round(images), 0.0, 255.0), tf.int32)
    counts = _level_counts(levels)
    total = tf.reduce_sum(counts, axis=1)

    def percentile(q: float) -> tf.Tensor:
        position = tf.cast(tf.maximum(total - 1, 0), tf.float64) * (q / 100.0)
        below, above = tf.floor(position), tf.math.ceil(position)
        low_level = _percentile_level(counts, tf.cast(below, tf.int64))
        high_level = _percentile_level(counts, tf.cast(above, tf.int64))
        return low_level + (position - below) * (high_level - low_level)

    p_low, p_high = percentile(low), percentile(high)
    scale = 254.0 / tf.maximum(p_high - p_low, 1.0)
    values = tf.cast(levels, tf.float64)
    mapped = tf.clip_by_value(tf.round(1.0 + (values - p_low[:, None, None, None]) * scale[:, None, None, None]),
                              1.0, 255.0)
    inside = levels > 0
    mapped = tf.where(inside, mapped, 0.0)
    return tf.cast(tf.where(tf.reduce_any(inside, axis=[1, 2, 3], keepdims=True), mapped, tf.cast(levels, tf.float64)),
                   tf.float32)


def standardise_tf(params: PreprocessParams):
    """The TensorFlow version of `preprocess.intensity` (images float32 (B, S, S, 1) -> float32), or None when
    the preprocessing cannot be redone in TensorFlow after augmentation (CLAHE or a window after the crop)."""
    # Every key is read up front, whatever the mode: the stages that call this declare them all in dvc.yaml.
    intensity, (low, high) = params.intensity, params.percentile
    clahe, window = params.clahe.enabled, params.window.enabled
    if clahe or window:
        return None
    if intensity == "equalise_in_mask":
        return equalise_in_mask_tf
    if intensity == "percentile":
        return lambda images: percentile_in_mask_tf(images, low, high)
    return lambda images: images


def acquisition_steps(params: AugmentParams) -> list[tuple[str, float, object]]:
    """(name, probability, transform) of every acquisition step, in order: window, gamma, noise, blur, JPEG."""
    return [
        ("window_level", params.window_level.probability,
         window_level_transform(params.window_level.shift, params.window_level.width)),
        ("gamma", params.gamma.probability, gamma_transform(*params.gamma.range)),
        ("noise", params.noise.probability, noise_transform(params.noise.std)),
        ("blur", params.blur.probability, blur_transform(params.blur.sigma, params.blur.strength)),
        ("jpeg", params.jpeg.probability, jpeg_transform(*params.jpeg.quality)),
    ]
