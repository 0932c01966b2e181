"""Training losses: a per-sample binary focal loss and the factory that picks the loss from params.yaml.

The focal loss returns one value per sample (shape `(batch,)`) and leaves the reduction to Keras, so sample
weights and the configured reduction work as for any built-in loss. Labels may be soft (MixUp makes them).
"""

from __future__ import annotations

import keras
from keras import ops

from chestct.params import LossParams


@keras.saving.register_keras_serializable(package="chestct")
class BinaryFocalLoss(keras.losses.Loss):
    """Binary focal loss (Lin et al. 2017) for a sigmoid output, computed per sample.

    With y the (smoothed, possibly soft) label and p the predicted probability clipped to [eps, 1 - eps]:

        loss = -alpha * y * (1 - p)**gamma * log(p) - (1 - alpha) * (1 - y) * p**gamma * log(1 - p)

    Label smoothing s maps y to y * (1 - s) + 0.5 * s first. gamma = 0 and alpha = 0.5 give half the binary
    cross-entropy. The values over the last axis are averaged, as Keras' own losses do, so a `(batch, 1)`
    prediction gives a `(batch,)` loss before reduction.
    """

    def __init__(
        self,
        gamma: float = 2.0,
        alpha: float = 0.25,
        label_smoothing: float = 0.0,
        epsilon: float = 1e-7,
        reduction: str = "sum_over_batch_size",
        name: str = "binary_focal_loss",
        **kwargs,
    ):
        super().__init__(name=name, reduction=reduction, **kwargs)
        self.gamma = float(gamma)
        self.alpha = float(alpha)
        self.label_smoothing = float(label_smoothing)
        self.epsilon = float(epsilon)

    def call(self, y_true, y_pred):
        # float32 even under mixed precision: log(p) and p**gamma lose too much in float16.
        y_pred = ops.cast(y_pred, "float32")
        if len(y_pred.shape) == 1:
            y_pred = ops.expand_dims(y_pred, -1)
        # Labels often arrive as (batch,) against a (batch, 1) prediction: match the shapes, never broadcast.
        y_true = ops.reshape(ops.cast(y_true, "float32"), ops.shape(y_pred))

        y = y_true * (1.0 - self.label_smoothing) + 0.5 * self.label_smoothing
        p = ops.clip(y_pred, self.epsilon, 1.0 - self.epsilon)
        positive = -self.alpha * y * ops.power(1.0 - p, self.gamma) * ops.log(p)
        negative = -(1.0 - self.alpha) * (1.0 - y) * ops.power(p, self.gamma) * ops.log(1.0 - p)
        return ops.mean(positive + negative, axis=-1)

    def get_config(self) -> dict:
        config = super().get_config()
        config.update(gamma=self.gamma, alpha=self.alpha, label_smoothing=self.label_smoothing, epsilon=self.epsilon)
        return config


def make_loss(params: LossParams) -> keras.losses.Loss:
    """The training loss named by `train.loss` in params.yaml."""
    if params.name == "focal":
        return BinaryFocalLoss(gamma=params.gamma, alpha=params.alpha, label_smoothing=params.label_smoothing)
    if params.name == "bce":
        return keras.losses.BinaryCrossentropy(label_smoothing=params.label_smoothing)
    raise ValueError(f"train.loss.name: unknown loss {params.name!r} (expected focal or bce)")
