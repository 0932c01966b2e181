"""The classifier: a pretrained backbone, trainable attention, a small dense head, and the fine-tuning policy.

    image (S, S, 1) uint8                       exactly the array `preprocess` caches
      -> BackbonePreprocessing                 float32, 3 channels, the backbone's own input scaling
      -> backbone (nested model "backbone")    called with training=False; its BatchNorm is never trainable
      -> ChannelAttention -> SpatialAttention  trainable, saved with the model
      -> GlobalAveragePooling2D
      -> GaussianNoise                         on the pooled features: a little noise on what the head sees
      -> [Dense -> BatchNormalization -> ReLU -> Dropout] per head.units
      -> Dense(1, sigmoid, float32) "prediction"

Every custom layer is registered, so `keras.models.load_model(path)` restores .keras and .h5 files once this
module is imported.

Measured with Keras 3.15:
- A functional model passes its own `training` flag to nested layers over the `training=False` stored at
  `backbone(x, training=False)`. What keeps the backbone's BatchNorm in inference mode during training is
  therefore `trainable=False` on every backbone BatchNorm layer (Keras runs a non-trainable BatchNorm with its
  moving statistics): the whole backbone in phase 1, each BatchNorm in phase 2 (EfficientNet's in-block
  Dropout does run during fit, as it ignores `trainable`). Predictions and exports call
  the model with training=False, so nothing of training mode reaches an exported graph.
- Legacy .h5 files cannot hold MobileNetV3: its graph contains `x + 3.0` operations that the h5 loader
  mistakes for `Add` layers (see LEGACY_H5_UNSUPPORTED_BACKBONES). The .keras format and SavedModel work.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import keras
from keras import layers, ops

from chestct.errors import ChestctError
from chestct.params import HeadParams, ModelParams

BACKBONE_NAME = "backbone"
PREDICTION_NAME = "prediction"


class WeightsUnavailableError(ChestctError, RuntimeError):
    """ImageNet weights for the backbone are neither cached nor downloadable."""


# --- backbones --------------------------------------------------------------------------------------------

_APPLICATIONS = {
    "densenet121": keras.applications.DenseNet121,
    "resnet50": keras.applications.ResNet50,
    "efficientnetb0": keras.applications.EfficientNetB0,
    "mobilenetv3small": keras.applications.MobileNetV3Small,
}

# The notop file each application downloads into ~/.keras/models/ (as named in keras/src/applications).
IMAGENET_WEIGHT_FILES = {
    "densenet121": "densenet121_weights_tf_dim_ordering_tf_kernels_notop.h5",
    "resnet50": "resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5",
    "efficientnetb0": "efficientnetb0_notop.h5",
    "mobilenetv3small": "weights_mobilenet_v3_small_224_1.0_float_no_top_v2.h5",
}

# Backbones whose model `keras.models.load_model("x.h5")` cannot restore (see the module docstring).
LEGACY_H5_UNSUPPORTED_BACKBONES = frozenset({"mobilenetv3small"})

# How each backbone expects its RGB input, see BackbonePreprocessing. EfficientNet and MobileNetV3 rescale
# 0-255 inputs themselves (their Rescaling/Normalization layers), so they get the raw values.
_PREPROCESSING_MODES = {
    "densenet121": "torch",
    "resnet50": "caffe",
    "efficientnetb0": "raw",
    "mobilenetv3small": "raw",
}


def keras_weights_cache() -> Path:
    """Where Keras looks for downloaded weights ($KERAS_HOME/models, by default ~/.keras/models)."""
    return Path(os.environ.get("KERAS_HOME", Path.home() / ".keras")).expanduser() / "models"


def _weights_file_wanted(backbone: str, error: Exception) -> str:
    # Keras' message is "URL fetch failure on <url>: ..."; the URL ends with the file name.
    match = re.search(r"https?://\S+/([^/\s:]+\.h5)", str(error))
    return match.group(1) if match else IMAGENET_WEIGHT_FILES[backbone]


def _is_download_failure(error: Exception) -> bool:
    message = str(error)
    return "URL fetch failure" in message or "corrupted file" in message


def _weights_unavailable(backbone: str, error: Exception) -> WeightsUnavailableError:
    file_name = _weights_file_wanted(backbone, error)
    return WeightsUnavailableError(
        f"ImageNet weights for {backbone} could not be downloaded ({error}).\n"
        f"Either put {file_name} into ~/.keras/models/ (here: {keras_weights_cache()}/{file_name}), "
        f"or set `model.weights: null` in params.yaml to start from random weights "
        f"(or `model.weights: <path>` to a local weights file)."
    )


def build_backbone(name: str, weights: str | None, image_size: int) -> keras.Model:
    """The keras.applications model without its top, named "backbone", on (S, S, 3) inputs."""
    if weights not in (None, "imagenet") and not Path(weights).is_file():
        raise WeightsUnavailableError(
            f"model.weights: weights file {weights} not found (give an existing .h5/.keras weights file, "
            f"'imagenet', or null)"
        )
    application = _APPLICATIONS[name]
    try:
        return application(
            include_top=False, weights=weights, input_shape=(image_size, image_size, 3), name=BACKBONE_NAME
        )
    except Exception as error:
        if weights == "imagenet" and _is_download_failure(error):
            raise _weights_unavailable(name, error) from error
        raise


# --- custom layers ----------------------------------------------------------------------------------------


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


# --- the whole model --------------------------------------------------------------------------------------


def _head(features, params: HeadParams):
    """Noise on the pooled features, the dense blocks, and the float32 sigmoid output."""
    x = features
    if params.input_noise_stddev > 0:
        # Placed on the pooled backbone features: a mild regulariser for the head only (active in training).
        x = layers.GaussianNoise(params.input_noise_stddev, name="feature_noise")(x)
    regularizer = keras.regularizers.L2(params.l2) if params.l2 > 0 else None
    for index, units in enumerate(params.units):
        x = layers.Dense(units, kernel_regularizer=regularizer, name=f"head_dense_{index}")(x)
        x = layers.BatchNormalization(momentum=params.batchnorm_momentum, name=f"head_bn_{index}")(x)
        x = layers.ReLU(name=f"head_relu_{index}")(x)
        x = layers.Dropout(params.dropout, name=f"head_dropout_{index}")(x)
    # float32 so the probability stays exact under mixed precision.
    return layers.Dense(1, activation="sigmoid", dtype="float32", name=PREDICTION_NAME)(x)


def build_model(params: ModelParams, image_size: int) -> keras.Model:
    """The phase-1 model: backbone frozen, attention and head trainable; input (S, S, 1) uint8."""
    backbone = build_backbone(params.backbone, params.weights, image_size)
    backbone.trainable = False

    image = keras.Input(shape=(image_size, image_size, 1), dtype="uint8", name="image")
    x = BackbonePreprocessing(_PREPROCESSING_MODES[params.backbone], dtype="float32", name="preprocessing")(image)
    # Inference mode for the base whenever the outer model does not say otherwise (predict, export); during
    # fit Keras passes training=True over it, and the non-trainable BatchNorm layers keep their statistics.
    x = backbone(x, training=False)
    x = ChannelAttention(params.attention.ratio, name="channel_attention")(x)
    x = SpatialAttention(params.attention.kernel_size, name="spatial_attention")(x)
    x = layers.GlobalAveragePooling2D(name="pooling")(x)
    return keras.Model(image, _head(x, params.head), name=f"chestct_{params.backbone}")


# --- fine-tuning ------------------------------------------------------------------------------------------


def backbone_of(model: keras.Model) -> keras.Model:
    return model.get_layer(BACKBONE_NAME)


def backbone_layers(model: keras.Model) -> list[keras.layers.Layer]:
    """The backbone's computing layers, input first (its InputLayer is left out)."""
    return [layer for layer in backbone_of(model).layers if not isinstance(layer, layers.InputLayer)]


def layers_to_unfreeze(amount: float, layer_count: int, backbone: str = "backbone") -> int:
    """N from `model.unfreeze.<backbone>`: round(amount * layers) for a fraction (< 1), else the count itself."""
    if amount < 1:
        return round(amount * layer_count)
    if amount != int(amount):
        raise ValueError(f"model.unfreeze.{backbone}: a count (>= 1) must be a whole number, got {amount}")
    return min(int(amount), layer_count)


def backbone_batchnorm_trains(params: ModelParams) -> bool:
    """`auto`: BatchNorm statistics are kept when pretrained, learned when the backbone starts from scratch.

    Random weights come with moving statistics of mean 0 and variance 1 that match nothing: frozen, they
    shrink the activations layer by layer until the features vanish (about 1e-11 for MobileNetV3Small).
    """
    if params.backbone_batchnorm.mode == "auto":
        return params.weights is None
    return params.backbone_batchnorm.mode == "trainable"


def unfreeze_for_finetuning(model: keras.Model, params: ModelParams) -> int:
    """Make the last N backbone layers trainable; return the trainable layer count.

    The backbone's BatchNorm layers stay frozen unless `model.backbone_batchnorm` says they train (by default
    only when starting from random weights); trainable ones get `model.backbone_batchnorm.momentum`, since at
    the default 0.99 their statistics barely move in a few dozen steps an epoch.
    Recompile the model afterwards: Keras reads `trainable` when it compiles.
    """
    backbone = backbone_of(model)
    backbone.trainable = True
    computing = backbone_layers(model)
    count = layers_to_unfreeze(getattr(params.unfreeze, params.backbone), len(computing), params.backbone)
    first_unfrozen = len(computing) - count
    batchnorm_trains = backbone_batchnorm_trains(params)
    for index, layer in enumerate(computing):
        is_batchnorm = isinstance(layer, layers.BatchNormalization)
        layer.trainable = index >= first_unfrozen and (batchnorm_trains or not is_batchnorm)
        if is_batchnorm and layer.trainable:
            layer.momentum = params.backbone_batchnorm.momentum
    return sum(layer.trainable for layer in computing)


# --- precision --------------------------------------------------------------------------------------------


def _with_float32_policies(config):
    """A model config with every layer's dtype policy replaced by float32 (the variables are float32 already)."""
    if isinstance(config, dict):
        if config.get("class_name") == "DTypePolicy":
            return "float32"
        return {key: _with_float32_policies(value) for key, value in config.items()}
    if isinstance(config, list):
        return [_with_float32_policies(value) for value in config]
    return config


def compute_dtypes(model: keras.Model) -> set[str]:
    return {layer.compute_dtype for layer in model._flatten_layers(include_self=False)}


def float32_copy(model: keras.Model) -> keras.Model:
    """The same model computing in float32 everywhere: what is exported after mixed-precision training.

    Mixed policies keep float32 variables, so the weights copy over unchanged; only the arithmetic changes.
    TFLite cannot convert bfloat16 graphs, and a float32 graph runs everywhere. Returns `model` itself when
    it already computes in float32.
    """
    if compute_dtypes(model) <= {"float32"}:
        return model
    copy = model.__class__.from_config(_with_float32_policies(model.get_config()))
    copy.set_weights(model.get_weights())
    return copy


# --- Grad-CAM ---------------------------------------------------------------------------------------------


def last_conv_layer_name(model: keras.Model) -> str:
    """The last layer of the outer model with a 4-D output: the attention-weighted backbone feature map.

    Being part of the outer graph, its output can be fetched together with the prediction:
    `keras.Model(model.input, [model.get_layer(name).output, model.output])`.
    """
    for layer in reversed(model.layers):
        if len(layer.output.shape) == 4:
            return layer.name
    raise ValueError(f"model {model.name} has no layer with a 4-D output")
