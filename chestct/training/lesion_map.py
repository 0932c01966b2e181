"""The lesion map: a per-position lesion probability on the lung field, and the slice score pooled from it.

    backbone feature maps (stride 32, after attention; stride 16 and 8 from inside the backbone)
      -> light decoder: 1x1 reduce, then per skip: upsample x2, concat the skip's 1x1 reduction, 3x3 conv
      -> "lesion_logits" (B, S/stride, S/stride, 1) -> sigmoid -> "lesion_map" (the model's explanation)
      -> MaskedMapPooling over the cells inside the lung field -> "prediction" (B, 1), the slice's probability

The pooling (`model.lesion_map.pooling`) runs on the logits: max, the mean of the top k, or log-sum-exp (a
smooth max whose sharpness r goes from the mean, r -> 0, to the max, r -> inf). Only cells that are mostly
inside what preprocess kept (the lung fields: the input is 0 elsewhere) count, so the slice score is a
statement about some position inside the lungs: multiple-instance learning for a Cancer slice with no outline.

LesionMapLoss is the dense loss: binary cross-entropy between the map and the lesion mask reduced to the map's
cells (a cell is lesion when any of its pixels is), averaged per sample so sample weights switch it off for a
slice whose lesion is not outlined.
"""

from __future__ import annotations

import keras
from keras import layers, ops

from chestct.params import LesionMapParams

LESION_MAP_NAME = "lesion_map"
LESION_LOGITS_NAME = "lesion_logits"
LESION_DECODER_PREFIX = "lesion_fuse_"  # the decoder's fusing convolutions, the last of them feeds the logits


@keras.saving.register_keras_serializable(package="chestct")
class LungCoverage(layers.Layer):
    """(B, S, S, 1) input image -> (B, S/stride, S/stride, 1): the share of each map cell's pixels that preprocess
    kept (non-zero)."""

    def __init__(self, stride: int = 8, **kwargs):
        super().__init__(**kwargs)
        self.stride = int(stride)

    def call(self, image):
        kept = ops.cast(ops.greater(ops.cast(image, "float32"), 0.0), "float32")
        return ops.average_pool(kept, self.stride, self.stride, padding="same")

    def get_config(self) -> dict:
        return {**super().get_config(), "stride": self.stride}


@keras.saving.register_keras_serializable(package="chestct")
class MaskedMapPooling(layers.Layer):
    """[logits (B, h, w, 1), coverage (B, h, w, 1)] -> (B, 1) sigmoid of the logits pooled over the covered cells
    (every cell when a sample has none covered)."""

    def __init__(self, mode: str = "lse", top_k: int = 4, sharpness: float = 5.0, min_coverage: float = 0.25,
                 **kwargs):
        super().__init__(**kwargs)
        if mode not in ("max", "top_k", "lse"):
            raise ValueError(f"model.lesion_map.pooling: unknown pooling {mode!r} (expected max, top_k or lse)")
        self.mode, self.top_k = mode, int(top_k)
        self.sharpness, self.min_coverage = float(sharpness), float(min_coverage)

    def pooled_logit(self, logits, coverage):
        batch = ops.shape(logits)[0]
        logits = ops.reshape(ops.cast(logits, "float32"), (batch, -1))
        covered = ops.reshape(ops.cast(coverage, "float32"), (batch, -1)) >= self.min_coverage
        covered = ops.logical_or(covered, ops.logical_not(ops.any(covered, axis=1, keepdims=True)))
        if self.mode == "max":
            return ops.max(ops.where(covered, logits, -1e9), axis=1, keepdims=True)
        if self.mode == "top_k":
            k = min(self.top_k, int(logits.shape[1]))
            values, _ = ops.top_k(ops.where(covered, logits, -1e9), k)
            counted = ops.cast(values > -1e8, "float32")
            return ops.sum(values * counted, axis=1, keepdims=True) / ops.maximum(
                ops.sum(counted, axis=1, keepdims=True), 1.0)
        r = self.sharpness
        scaled = ops.where(covered, r * logits, -1e9)
        count = ops.sum(ops.cast(covered, "float32"), axis=1, keepdims=True)
        return (ops.logsumexp(scaled, axis=1, keepdims=True) - ops.log(count)) / r

    def call(self, inputs):
        logits, coverage = inputs
        return ops.sigmoid(self.pooled_logit(logits, coverage))

    def compute_output_shape(self, input_shape):
        return (input_shape[0][0], 1)

    def get_config(self) -> dict:
        return {**super().get_config(), "mode": self.mode, "top_k": self.top_k, "sharpness": self.sharpness,
                "min_coverage": self.min_coverage}


@keras.saving.register_keras_serializable(package="chestct")
class LesionMapLoss(keras.losses.Loss):
    """Per-sample binary cross-entropy between the lesion map (B, h, w, 1) and a mask (B, S, S, 1) at the input's
    resolution, reduced to the map's cells by max pooling (a cell holding any lesion pixel is lesion)."""

    def __init__(self, epsilon: float = 1e-6, reduction: str = "sum_over_batch_size", name: str = "lesion_map_loss",
                 **kwargs):
        super().__init__(name=name, reduction=reduction, **kwargs)
        self.epsilon = float(epsilon)

    def call(self, y_true, y_pred):
        y_pred = ops.clip(ops.cast(y_pred, "float32"), self.epsilon, 1.0 - self.epsilon)
        y_true = ops.cast(y_true, "float32")
        if len(y_true.shape) == 3:
            y_true = ops.expand_dims(y_true, -1)
        factor = int(y_true.shape[1]) // int(y_pred.shape[1])
        if factor > 1:
            y_true = ops.max_pool(y_true, factor, factor, padding="same")
        bce = -(y_true * ops.log(y_pred) + (1.0 - y_true) * ops.log(1.0 - y_pred))
        return ops.mean(bce, axis=(1, 2, 3))

    def get_config(self) -> dict:
        return {**super().get_config(), "epsilon": self.epsilon}


def skip_layer_names(backbone: keras.Model, image_size: int, strides: tuple[int, ...]) -> list[str]:
    """For each stride, the last backbone layer whose output is the image size / stride (the deepest features at
    that resolution)."""
    names = []
    for stride in strides:
        side = -(-image_size // stride)
        found = [layer.name for layer in backbone.layers
                 if not isinstance(layer, layers.InputLayer) and len(layer.output.shape) == 4
                 and layer.output.shape[1] == side]
        if not found:
            raise ValueError(f"backbone {backbone.name} has no feature map at stride {stride} "
                             f"({side} px at {image_size} px input)")
        names.append(found[-1])
    return names


def decoder_strides(params: LesionMapParams) -> tuple[int, ...]:
    """The skip strides the decoder fuses, coarsest first: (16,) for a stride-16 map, (16, 8) for stride 8."""
    return (16,) if params.stride == 16 else (16, 8)


def lesion_map_head(features, skips: list, image, params: LesionMapParams):
    """(prediction (B, 1), lesion_map (B, h, w, 1)) from the stride-32 features and the skips, coarsest first."""
    channels = params.decoder_channels
    x = layers.Conv2D(channels, 1, activation="relu", name="lesion_reduce")(features)
    for index, skip in enumerate(skips):
        x = layers.UpSampling2D(2, interpolation="bilinear", name=f"lesion_up_{index}")(x)
        reduced = layers.Conv2D(channels, 1, activation="relu", name=f"lesion_skip_{index}")(skip)
        x = layers.Concatenate(name=f"lesion_concat_{index}")([x, reduced])
        x = layers.Conv2D(channels, 3, padding="same", activation="relu", name=f"{LESION_DECODER_PREFIX}{index}")(x)
    # Starting at a low lesion probability everywhere: nearly every cell of every training slice is not lesion.
    logits = layers.Conv2D(1, 1, dtype="float32", bias_initializer=keras.initializers.Constant(-2.0),
                           name=LESION_LOGITS_NAME)(x)
    lesion_map = layers.Activation("sigmoid", dtype="float32", name=LESION_MAP_NAME)(logits)
    coverage = LungCoverage(params.stride, dtype="float32", name="lung_coverage")(image)
    prediction = MaskedMapPooling(params.pooling, params.top_k, params.lse_sharpness, params.min_lung_coverage,
                                  dtype="float32", name="prediction")([logits, coverage])
    return prediction, lesion_map
