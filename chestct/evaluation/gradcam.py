"""Grad-CAM heatmaps of the cancer probability, and colour overlays for PNGs and the web page.

Grad-CAM (Selvaraju et al., 2017): for a 4-D feature map A (B, h, w, C) and the score y, each channel's weight
is the spatial mean of dy/dA; the map is relu(sum_c weight_c * A_c), upsampled to the image size. Here y is
the sigmoid output itself (the cancer probability), and A is by default the attention-weighted backbone map
("spatial_attention", see `chestct.training.model.last_conv_layer_name`), which lives in the outer graph: the model
is split there into image -> A and A -> prediction, and the tape watches A itself.

Heatmaps are normalised per image to [0, 1] by their maximum: they show where, not how strongly, so maps of
different images are not comparable in absolute terms. An all-zero map (no positive evidence) stays zero.
"""

from __future__ import annotations

import keras
import numpy as np
import tensorflow as tf

from chestct.training.model import last_conv_layer_name


def _split_model(model: keras.Model, layer_name: str) -> tuple[keras.Model, keras.Model, bool]:
    """(image -> feature map, head -> prediction, whether the head also takes the image): two models sharing the
    original layers and weights.

    Splitting lets the tape watch the feature map itself. Calling one model that returns both would only
    record the path from the map to the output when something upstream of the map is watched: never for a
    frozen backbone (no trainable variables) or a map computed from the uint8 input by weightless layers.
    The head is feature map -> prediction, or (feature map, image) -> prediction when the prediction also reads
    the image by another path (a lesion-map model pools its map over the lung cells it finds in the input).
    """
    feature = model.get_layer(layer_name).output
    if len(feature.shape) != 4:
        raise ValueError(f"layer {layer_name!r} has a {len(feature.shape)}-D output; Grad-CAM needs a 4-D map")
    output = model.outputs[0]
    try:
        # Keras 3 accepts an intermediate tensor as a model input (it clones the graph nodes).
        return keras.Model(model.inputs, feature), keras.Model(feature, output), False
    except ValueError:
        pass
    try:
        return keras.Model(model.inputs, feature), keras.Model([feature, *model.inputs], output), True
    except ValueError as error:
        raise ValueError(f"the prediction does not depend on layer {layer_name!r} and the image alone: "
                         f"{error}") from error


def _raw_maps(feature_model: keras.Model, head: keras.Model, images: np.ndarray, head_reads_image: bool
              ) -> np.ndarray:
    """Un-normalised Grad-CAM maps (B, h, w) float32 at feature-map resolution."""
    images = tf.convert_to_tensor(images)
    features = feature_model(images, training=False)
    with tf.GradientTape() as tape:
        tape.watch(features)
        outputs = head([features, images] if head_reads_image else features, training=False)
        # Samples do not interact in inference mode, so the gradient of the sum is each sample's own gradient.
        score = tf.reduce_sum(tf.cast(outputs[:, 0], tf.float32))
    gradients = tape.gradient(score, features)
    if gradients is None:
        raise RuntimeError("the prediction does not depend on the chosen feature layer")
    features = tf.cast(features, tf.float32)
    weights = tf.reduce_mean(tf.cast(gradients, tf.float32), axis=(1, 2), keepdims=True)
    return tf.nn.relu(tf.reduce_sum(weights * features, axis=-1)).numpy()


def _upsample_and_normalise(maps: np.ndarray, size: int) -> np.ndarray:
    resized = tf.image.resize(maps[..., None], (size, size), method="bilinear").numpy()[..., 0]
    resized = np.nan_to_num(np.maximum(resized, 0.0), nan=0.0, posinf=0.0)
    peaks = resized.max(axis=(1, 2), keepdims=True)
    # Dividing only where the peak is positive keeps an all-zero map at zero instead of 0/0 = NaN.
    normalised = np.divide(resized, peaks, out=np.zeros_like(resized), where=peaks > 0)
    return np.clip(normalised, 0.0, 1.0).astype(np.float32)


def gradcam(model: keras.Model, images: np.ndarray, layer_name: str | None = None,
            batch_size: int = 16) -> np.ndarray:
    """Grad-CAM of the cancer probability for (N, S, S, 1) uint8 images -> (N, S, S) float32 in [0, 1].

    `layer_name` picks the 4-D feature layer (default: `last_conv_layer_name(model)`). The model is called
    with training=False; images go through in batches of `batch_size` to bound the memory the tape holds.
    """
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[-1] != 1 or images.shape[1] != images.shape[2]:
        raise ValueError(f"images must be (N, S, S, 1), got shape {images.shape}")
    size = images.shape[1]
    if len(images) == 0:
        return np.zeros((0, size, size), np.float32)
    feature_model, head, head_reads_image = _split_model(model, layer_name or last_conv_layer_name(model))
    maps = [
        _upsample_and_normalise(_raw_maps(feature_model, head, images[start:start + batch_size], head_reads_image),
                                size)
        for start in range(0, len(images), batch_size)
    ]
    return np.concatenate(maps, axis=0)


def overlay(image: np.ndarray, heatmap: np.ndarray, alpha: float = 0.4, colormap: str = "jet") -> np.ndarray:
    """Blend a heatmap (S, S) in [0, 1], coloured with a matplotlib colormap, over a grayscale uint8 image.

    Returns (S, S, 3) uint8 RGB: (1 - alpha) * gray + alpha * colour. Values outside [0, 1] are clipped and
    NaN counts as 0, so a bad map never breaks a report.
    """
    from matplotlib import colormaps  # no pyplot: no GUI backend is needed to colour an array

    image = np.asarray(image)
    if image.ndim == 3 and image.shape[-1] == 1:
        image = image[..., 0]
    if image.ndim != 2:
        raise ValueError(f"image must be (S, S) or (S, S, 1), got shape {image.shape}")
    heatmap = np.asarray(heatmap, dtype=np.float64)
    if heatmap.shape != image.shape:
        raise ValueError(f"heatmap shape {heatmap.shape} differs from image shape {image.shape}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be within [0, 1], got {alpha}")
    heat = np.clip(np.nan_to_num(heatmap, nan=0.0), 0.0, 1.0)
    colour = colormaps[colormap](heat)[..., :3] * 255.0
    gray = np.repeat(image.astype(np.float64)[..., None], 3, axis=-1)
    return np.clip(np.rint((1.0 - alpha) * gray + alpha * colour), 0, 255).astype(np.uint8)
