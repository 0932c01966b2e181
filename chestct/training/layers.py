"""The classifier's custom Keras layers: backbone input scaling, channel attention and spatial attention.

Each is registered under the package name "chestct" with its class name, so `keras.models.load_model(path)`
restores .keras and .h5 files once this module is imported, also files saved before the package layout changed
(tests/test_saved_models.py loads one).
"""

from __future__ import annotations

import keras
from keras import layers, ops


@keras.saving.register_keras_serializable(package="chestct")
class BackbonePreprocessing(layers.Layer):
    """uint8 grayscale (…, 1) -> float32 RGB (…, 3) scaled the way the backbone was trained.

    mode "torch" (DenseNet): x / 255, then ImageNet mean/std per channel; "caffe" (ResNet50): BGR order minus
    the ImageNet BGR means (the channels are equal, so only the means' order matters); "raw": 0-255 floats for
    applications that rescale inside themselves. Per channel this is x * scale + offset: no weights to save.
    """

    _TORCH_MEAN = (0.485, 0.456, 0.406)
    _TORCH_STD = (0.229, 0.224, 0.225)
    _CAFFE_BGR_MEAN = (103.939, 116.779, 123.68)

    def __init__(self, mode: str = "raw", **kwargs):
        super().__init__(**kwargs)
        if mode not in ("torch", "caffe", "raw"):
            raise ValueError(f"unknown preprocessing mode {mode!r} (expected torch, caffe or raw)")
        self.mode = mode
        self.scale, self.offset = self._scale_and_offset(mode)

    @classmethod
    def _scale_and_offset(cls, mode: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
        if mode == "torch":
            scale = tuple(1.0 / (255.0 * std) for std in cls._TORCH_STD)
            offset = tuple(-mean / std for mean, std in zip(cls._TORCH_MEAN, cls._TORCH_STD, strict=True))
            return scale, offset
        if mode == "caffe":
            return (1.0, 1.0, 1.0), tuple(-mean for mean in cls._CAFFE_BGR_MEAN)
        return (1.0, 1.0, 1.0), (0.0, 0.0, 0.0)

    def call(self, inputs):
        x = ops.cast(inputs, "float32")
        x = ops.concatenate([x, x, x], axis=-1)
        return x * ops.convert_to_tensor(self.scale, "float32") + ops.convert_to_tensor(self.offset, "float32")

    def compute_output_shape(self, input_shape):
        return (*input_shape[:-1], 3)

    def get_config(self) -> dict:
        return {**super().get_config(), "mode": self.mode}


@keras.saving.register_keras_serializable(package="chestct")
class ChannelAttention(layers.Layer):
    """Squeeze-and-excitation: global average pool -> Dense(C/ratio, relu) -> Dense(C, sigmoid) -> rescale."""

    def __init__(self, ratio: int = 8, **kwargs):
        super().__init__(**kwargs)
        self.ratio = int(ratio)

    def build(self, input_shape):
        channels = int(input_shape[-1])
        # Sub-layers are created here, once C is known; assigning them to attributes makes Keras track,
        # train and save their weights. They take this layer's dtype policy, not the global one: a model
        # trained under mixed precision is reloaded (export, serving) where the global policy is float32.
        self.squeeze = layers.Dense(max(1, channels // self.ratio), activation="relu", name="squeeze",
                                    dtype=self.dtype_policy)
        self.excite = layers.Dense(channels, activation="sigmoid", name="excite", dtype=self.dtype_policy)
        self.squeeze.build((None, channels))
        self.excite.build((None, self.squeeze.units))

    def call(self, inputs):
        weights = self.excite(self.squeeze(ops.mean(inputs, axis=(1, 2))))
        return inputs * ops.expand_dims(ops.expand_dims(weights, 1), 1)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self) -> dict:
        return {**super().get_config(), "ratio": self.ratio}


@keras.saving.register_keras_serializable(package="chestct")
class SpatialAttention(layers.Layer):
    """Channel-wise max and mean -> concat -> Conv2D(1, kernel, same, sigmoid) -> rescale every position."""

    def __init__(self, kernel_size: int = 7, **kwargs):
        super().__init__(**kwargs)
        self.kernel_size = int(kernel_size)

    def build(self, input_shape):
        self.conv = layers.Conv2D(1, self.kernel_size, padding="same", activation="sigmoid", name="conv",
                                  dtype=self.dtype_policy)  # this layer's policy (see ChannelAttention.build)
        self.conv.build((*input_shape[:-1], 2))

    def call(self, inputs):
        pooled = ops.concatenate(
            [ops.max(inputs, axis=-1, keepdims=True), ops.mean(inputs, axis=-1, keepdims=True)], axis=-1
        )
        return inputs * self.conv(pooled)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self) -> dict:
        return {**super().get_config(), "kernel_size": self.kernel_size}
