"""Training-time augmentation on the 0..255 scale, and MixUp.

The original project's augmentation assumed images in 0..1 while the data was 0..255, so its brightness,
contrast and clipping turned training images black. Here every op works on float32 images in 0..255 and ends
with a clip to that range; Keras layers that take a `value_range` get (0, 255).

Each transform is applied PER SAMPLE with its own probability: the whole batch is transformed, then a Bernoulli
mask picks, image by image, the transformed or the untouched version. Order: geometry first (rotation, shift,
zoom, shear, flip), then intensity (pseudo-HU window, brightness, contrast, sharpness), so the black fill that
geometry brings in is treated like the scan's own black background by the intensity ops.

Geometric fill is constant 0: CT slices sit on black air and `preprocess` pads with black, so black is what the
model sees at the borders anyway; "reflect" would mirror ribs and lung into the corners, anatomy no scan has.

Randomness is stateless. Keras layers normally draw from a SeedGenerator, i.e. a tf.Variable they read and
update on every call; inside a parallel `tf.data` map those updates race (run-to-run differences), and with
`tf.config.experimental.enable_op_determinism()` such stateful ops make tf.data run the whole pipeline
serially. Instead every call gets a seed pair derived from (seed, key) - the key identifies the batch - and
the layers' random draws are fed from it through `_StatelessSeed`. Same seed and key, same output.

Keras layer semantics this module relies on (keras 3.15, read from its source):
- RandomSharpness blends `blur + s * (image - blur)` with s = 2 * factor and the 3x3 kernel [[1,1,1],[1,5,1],
  [1,1,1]] / 13 - PIL's ImageEnhance.Sharpness. Our `sharpness.range` is s itself (1 = unchanged), so we draw
  s uniformly in the range and hand the layer factor = s / 2. The layer's documented factor bound [0, 1] would
  cap s at 2.0; the formula is a plain linear extrapolation above that, so s up to 2.2 is meaningful.
- RandomContrast draws c in [1 - lower, 1 + upper] but sorts (lower, upper) first, so a range such as
  [0.3, 1.2] would silently become [0.8, 1.7]. We draw c uniformly in `contrast.range` ourselves and let the
  layer apply `(x - mean) * c + mean` and the clip.
- RandomFlip flips a sample with probability 0.5 on top of any probability we apply, and for
  "horizontal_and_vertical" it flips both axes together (a 180 degree turn). We tell it which samples to flip,
  so `flip.probability` is the chance of a flip; "horizontal_and_vertical" flips each axis independently.
- RandomShear with a float factor f draws x and y shear in [-f, f] (its docstring says [0, f]) about the image
  origin (top-left corner), not its centre, so a shear also shifts the image by up to f * side at the far edge.
- RandomRotation's factor is a fraction of a full turn (degrees / 360); RandomZoom's factor f draws a zoom in
  [1 - f, 1 + f] of the field of view (positive zooms out); RandomTranslation's factor is a fraction of the side;
  RandomBrightness adds delta * 255 with delta in [-d, d].
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import keras
import tensorflow as tf

from chestct.params import AugmentParams
from chestct.training.photometric import acquisition_steps

VALUE_RANGE = (0.0, 255.0)
FILL_MODE = "constant"
FILL_VALUE = 0.0

Transform = Callable[[tf.Tensor, tf.Tensor], tf.Tensor]  # (images, seed pair) -> every image transformed


class _StatelessSeed(keras.random.SeedGenerator):
    """A SeedGenerator without state: each draw gets a new seed folded from one seed tensor.

    Keras' random ops accept only an int or a SeedGenerator and call `.next()` on the latter; this subclass
    answers `.next()` with stateless_fold_in(seed, n) for the n-th draw, so no tf.Variable is created or
    updated. The draw counter advances while the graph is traced, so each draw site gets its own seed.
    """

    def __init__(self, seed: tf.Tensor):  # deliberately no super().__init__: it would create a variable
        self._seed = seed
        self._draws = 0

    def next(self, ordered: bool = True) -> tf.Tensor:
        self._draws += 1
        return tf.random.experimental.stateless_fold_in(self._seed, self._draws)


def seed_pair(seed: int | tf.Tensor, key: int | tf.Tensor = 0) -> tf.Tensor:
    """A stateless seed (int64 tensor of shape (2,)) from an int or an existing pair, with `key` folded in."""
    seed = tf.convert_to_tensor(seed, dtype=tf.int64)
    if seed.shape.rank == 0:
        seed = tf.stack([seed, tf.constant(0, tf.int64)])
    return tf.random.experimental.stateless_fold_in(seed, tf.cast(key, tf.int64))


def _batch_size(images: tf.Tensor) -> tf.Tensor:
    return tf.shape(images)[0]


def _uniform_per_sample(images: tf.Tensor, low: float, high: float, seed: tf.Tensor) -> tf.Tensor:
    """One float per image, shaped (B, 1, 1, 1) to broadcast over the image."""
    values = tf.random.stateless_uniform([_batch_size(images)], seed=seed, minval=low, maxval=high)
    return tf.reshape(values, [-1, 1, 1, 1])


# --- transforms: each maps (images, seed) to the batch with EVERY image transformed ------------------------------


def _keras_layer_transform(layer: keras.layers.Layer) -> Transform:
    """Use a Keras preprocessing layer's own random draw, fed from a stateless seed."""

    def transform(images: tf.Tensor, seed: tf.Tensor) -> tf.Tensor:
        drawn = layer.get_random_transformation(images, training=True, seed=_StatelessSeed(seed))
        return layer.transform_images(images, drawn, training=True)

    return transform


def _flip_transform(mode: str) -> Transform:
    """Flip every image along one axis (the per-sample probability decides which images keep it)."""
    layer = keras.layers.RandomFlip(mode)

    def transform(images: tf.Tensor, seed: tf.Tensor) -> tf.Tensor:
        flip_all = tf.ones([_batch_size(images), 1, 1, 1], dtype=tf.bool)
        return layer.transform_images(images, {"flips": flip_all, "input_shape": tf.shape(images)}, training=True)

    return transform


def _contrast_transform(low: float, high: float) -> Transform:
    """RandomContrast's op with the factor drawn uniformly in [low, high] (see the module docstring)."""
    layer = keras.layers.RandomContrast(0.0, value_range=VALUE_RANGE)  # factor unused: we draw it

    def transform(images: tf.Tensor, seed: tf.Tensor) -> tf.Tensor:
        factor = _uniform_per_sample(images, low, high, seed)
        return layer.transform_images(images, {"contrast_factor": factor}, training=True)

    return transform


def _sharpness_transform(low: float, high: float) -> Transform:
    """RandomSharpness's op with enhancement s drawn in [low, high]; the layer's factor is s / 2."""
    layer = keras.layers.RandomSharpness(0.5, value_range=VALUE_RANGE)  # factor unused: we draw it

    def transform(images: tf.Tensor, seed: tf.Tensor) -> tf.Tensor:
        enhancement = tf.random.stateless_uniform([_batch_size(images)], seed=seed, minval=low, maxval=high)
        return layer.transform_images(images, {"factor": enhancement / 2.0}, training=True)

    return transform


def _hu_window_transform(center: tuple[float, float], width: tuple[float, float]) -> Transform:
    """A random display window: map [c - w/2, c + w/2] linearly onto 0..255 and clip, like a CT window."""

    def transform(images: tf.Tensor, seed: tf.Tensor) -> tf.Tensor:
        c = _uniform_per_sample(images, center[0], center[1], seed_pair(seed, 0))
        w = _uniform_per_sample(images, width[0], width[1], seed_pair(seed, 1))
        windowed = (images - (c - w / 2.0)) / w * VALUE_RANGE[1]
        return tf.clip_by_value(windowed, *VALUE_RANGE)

    return transform


# --- the augmenter -----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AugmentStep:
    """One transform and the probability that a given image goes through it."""

    name: str
    probability: float
    transform: Transform
    moves_pixels: bool = False  # geometry: a lesion mask travelling with the image goes through it too


def _flip_axes(mode: str) -> list[str]:
    return ["horizontal", "vertical"] if mode == "horizontal_and_vertical" else [mode]


def _geometric_steps(params: AugmentParams) -> list[AugmentStep]:
    fill = {"fill_mode": FILL_MODE, "fill_value": FILL_VALUE, "interpolation": "bilinear"}
    steps = []
    if params.rotation.degrees > 0:
        turn = params.rotation.degrees / 360.0
        layer = keras.layers.RandomRotation((-turn, turn), **fill)
        steps.append(AugmentStep("rotation", params.rotation.probability, _keras_layer_transform(layer), True))
    if params.shift.fraction > 0:
        f = params.shift.fraction
        layer = keras.layers.RandomTranslation((-f, f), (-f, f), **fill)
        steps.append(AugmentStep("shift", params.shift.probability, _keras_layer_transform(layer), True))
    if params.zoom.fraction > 0:
        f = params.zoom.fraction
        layer = keras.layers.RandomZoom((-f, f), None, **fill)  # width_factor None keeps the aspect ratio
        steps.append(AugmentStep("zoom", params.zoom.probability, _keras_layer_transform(layer), True))
    if params.shear.factor > 0:
        layer = keras.layers.RandomShear(params.shear.factor, params.shear.factor, **fill)
        steps.append(AugmentStep("shear", params.shear.probability, _keras_layer_transform(layer), True))
    for axis in _flip_axes(params.flip.mode):
        steps.append(AugmentStep(f"flip_{axis}", params.flip.probability, _flip_transform(axis), True))
    return steps


def _intensity_steps(params: AugmentParams) -> list[AugmentStep]:
    window = params.hu_window
    steps = [AugmentStep("hu_window", window.probability, _hu_window_transform(window.center, window.width))]
    if params.brightness.delta > 0:
        d = params.brightness.delta
        layer = keras.layers.RandomBrightness((-d, d), value_range=VALUE_RANGE)
        steps.append(AugmentStep("brightness", params.brightness.probability, _keras_layer_transform(layer)))
    steps.append(AugmentStep("contrast", params.contrast.probability, _contrast_transform(*params.contrast.range)))
    steps.append(AugmentStep("sharpness", params.sharpness.probability, _sharpness_transform(*params.sharpness.range)))
    return steps


class Augmenter:
    """Maps a batch (B, S, S, 1) float32 in 0..255 to an augmented batch of the same shape, dtype and range.

    Call it as `augmenter(images, key)`: `key` (an int or int64 scalar tensor, e.g. the batch's index or a
    random draw) picks the random stream, so the same seed and key always give the same batch. Pure TensorFlow
    ops only, so it runs inside `tf.data` maps and `tf.function`s.
    """

    def __init__(self, steps: list[AugmentStep], seed: int):
        self.steps = [step for step in steps if step.probability > 0]  # probability 0: skip the work
        self.seed = seed

    @property
    def step_names(self) -> list[str]:
        return [step.name for step in self.steps]

    def __call__(self, images: tf.Tensor, key: int | tf.Tensor = 0) -> tf.Tensor:
        images = tf.cast(images, tf.float32)
        batch_seed = seed_pair(self.seed, key)
        for index, step in enumerate(self.steps):
            images = _apply_per_sample(step, images, seed_pair(batch_seed, index))
        return tf.clip_by_value(images, *VALUE_RANGE)

    def with_masks(self, images: tf.Tensor, masks: tf.Tensor, key: int | tf.Tensor = 0) -> tuple[tf.Tensor, tf.Tensor]:
        """The augmented batch and its lesion masks (B, S, S, 1), moved by the same geometry (the masks skip
        every intensity step) and thresholded back to 0 / 1 after interpolation."""
        images = tf.cast(images, tf.float32)
        masks = tf.cast(masks, tf.float32)
        batch_seed = seed_pair(self.seed, key)
        for index, step in enumerate(self.steps):
            seed = seed_pair(batch_seed, index)
            if step.moves_pixels:
                both = _apply_per_sample(step, tf.concat([images, masks * 255.0], axis=-1), seed)
                images, masks = both[..., :1], both[..., 1:] / 255.0
            else:
                images = _apply_per_sample(step, images, seed)
        return tf.clip_by_value(images, *VALUE_RANGE), tf.cast(masks >= 0.5, tf.float32)


def _apply_per_sample(step: AugmentStep, images: tf.Tensor, seed: tf.Tensor) -> tf.Tensor:
    if step.probability >= 1.0:
        return tf.cast(step.transform(images, seed_pair(seed, 0)), tf.float32)
    draws = tf.random.stateless_uniform([_batch_size(images)], seed=seed_pair(seed, 1))
    # Transform only the chosen samples: at probabilities of 0.3-0.5 this saves most of the work, which on a
    # CPU competes with the training step for the same cores.
    chosen = tf.where(draws < step.probability)
    transformed = tf.cast(step.transform(tf.gather_nd(images, chosen), seed_pair(seed, 0)), tf.float32)
    return tf.tensor_scatter_nd_update(images, chosen, transformed)


def build_augmenter(params: AugmentParams, seed: int, standardise: Callable[[tf.Tensor], tf.Tensor] | None = None
                    ) -> Augmenter:
    """The training augmenter described by params.yaml's `augment` section (MixUp is separate: `mixup`).

    Order: geometry, then the acquisition steps (chestct.training.photometric: window, gamma, noise, blur, JPEG),
    then `standardise` (the preprocessing's intensity standardisation redone in TensorFlow, when training starts
    from the unstandardised images), then the intensity steps.
    """
    acquisition = [AugmentStep(name, probability, transform)
                   for name, probability, transform in acquisition_steps(params)]
    middle = [] if standardise is None else [AugmentStep("standardise", 1.0, lambda images, seed: standardise(images))]
    return Augmenter(_geometric_steps(params) + acquisition + middle + _intensity_steps(params), seed)


# --- MixUp -------------------------------------------------------------------------------------------------------


def _beta(alpha: float, size: tf.Tensor, seed: tf.Tensor) -> tf.Tensor:
    """Beta(alpha, alpha) draws as G1 / (G1 + G2) of two Gamma(alpha) draws."""
    g1 = tf.random.stateless_gamma([size], seed=seed_pair(seed, 0), alpha=alpha)
    g2 = tf.random.stateless_gamma([size], seed=seed_pair(seed, 1), alpha=alpha)
    total = g1 + g2
    # Small alphas can underflow both draws to 0; call that an even mix rather than NaN.
    return tf.where(total > 0, g1 / tf.maximum(total, 1e-30), 0.5)


def _broadcast_like(per_sample: tf.Tensor, tensor: tf.Tensor) -> tf.Tensor:
    shape = tf.concat([[-1], tf.ones([tf.rank(tensor) - 1], tf.int32)], axis=0)
    return tf.reshape(per_sample, shape)


def mixup(
    images: tf.Tensor, labels: tf.Tensor, alpha: float, probability: float, seed: int | tf.Tensor
) -> tuple[tf.Tensor, tf.Tensor]:
    """MixUp a batch: each sample is blended with a random partner from the same batch.

    lambda ~ Beta(alpha, alpha) is drawn afresh for every sample; samples not picked (with `probability`) keep
    lambda = 1, i.e. stay unchanged. Returns float32 images (still within 0..255: a convex blend) and float32
    labels in [0, 1] of the labels' shape ((B,) or (B, 1)). `seed` is an int or a stateless seed pair.
    """
    images = tf.cast(images, tf.float32)
    labels = tf.cast(labels, tf.float32)
    lam, partner = _mixup_draws(_batch_size(images), alpha, probability, seed)
    mixed_images = _mix(images, partner, _broadcast_like(lam, images))
    mixed_labels = _mix(labels, partner, _broadcast_like(lam, labels))
    return mixed_images, mixed_labels


def mixup_with_lesion_targets(
    images: tf.Tensor, labels: tf.Tensor, masks: tf.Tensor, mask_weights: tf.Tensor, alpha: float,
    probability: float, seed: int | tf.Tensor,
) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor, tf.Tensor]:
    """MixUp as `mixup` (the same draws for the same seed), the lesion masks blended like the labels; a blend
    has a known outline only when both partners have one, so its mask weight is the smaller of the two."""
    images, labels = tf.cast(images, tf.float32), tf.cast(labels, tf.float32)
    masks, mask_weights = tf.cast(masks, tf.float32), tf.cast(mask_weights, tf.float32)
    lam, partner = _mixup_draws(_batch_size(images), alpha, probability, seed)
    mixed_weights = tf.where(lam < 1.0, tf.minimum(mask_weights, tf.gather(mask_weights, partner)), mask_weights)
    return (_mix(images, partner, _broadcast_like(lam, images)), _mix(labels, partner, _broadcast_like(lam, labels)),
            _mix(masks, partner, _broadcast_like(lam, masks)), mixed_weights)


def _mixup_draws(size: tf.Tensor, alpha: float, probability: float, seed: int | tf.Tensor
                 ) -> tuple[tf.Tensor, tf.Tensor]:
    """(lambda per sample, 1 for samples left unmixed; the partner permutation)."""
    seed = seed_pair(seed)
    lam = _beta(alpha, size, seed_pair(seed, 0))
    chosen = tf.random.stateless_uniform([size], seed=seed_pair(seed, 1)) < probability
    lam = tf.where(chosen, lam, 1.0)
    partner = tf.argsort(tf.random.stateless_uniform([size], seed=seed_pair(seed, 2)))  # a random permutation
    return lam, partner


def _mix(values: tf.Tensor, partner: tf.Tensor, lam: tf.Tensor) -> tf.Tensor:
    return lam * values + (1.0 - lam) * tf.gather(values, partner)
