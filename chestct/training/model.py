"""The classifier: a pretrained backbone, trainable attention, a small dense head, and the fine-tuning policy.

    image (S, S, 1) uint8                       exactly the array `preprocess` caches
      -> BackbonePreprocessing                 float32, 3 channels, the backbone's own input scaling
      -> backbone (nested model "backbone")    called with training=False; its BatchNorm is never trainable
      -> ChannelAttention -> SpatialAttention  trainable, saved with the model
      -> GlobalAveragePooling2D
      -> GaussianNoise                         on the pooled features: a little noise on what the head sees
      -> [Dense -> BatchNormalization -> ReLU -> Dropout] per head.units
      -> Dense(1, sigmoid, float32) "prediction"

With `model.lesion_map.enabled` the pooled features and the head are replaced by the lesion map
(chestct.training.lesion_map): a light decoder on the attention-weighted features and two shallower backbone
feature maps gives a per-position lesion probability ("lesion_map"), and "prediction" is pooled from it. The
model then has two outputs, prediction first; `classifier_view` is the one-output model every later stage
(evaluation, export, serving) scores with.

The backbones come from the registry in chestct.training.backbones, the custom layers from chestct.training.layers;
`load_trained_model` registers every custom object before loading.

Measured with Keras 3.15:
- A functional model passes its own `training` flag to nested layers over the `training=False` stored at
  `backbone(x, training=False)`. What keeps the backbone's BatchNorm in inference mode during training is
  therefore `trainable=False` on every backbone BatchNorm layer (Keras runs a non-trainable BatchNorm with its
  moving statistics): the whole backbone in phase 1, each BatchNorm in phase 2 (EfficientNet's in-block
  Dropout does run during fit, as it ignores `trainable`). Predictions and exports call
  the model with training=False, so nothing of training mode reaches an exported graph.
"""

from __future__ import annotations

from pathlib import Path

import keras
from keras import layers

import chestct.training.losses  # noqa: F401  (registers the focal loss, which compiled .keras files name)
from chestct.errors import ChestctError
from chestct.params import HeadParams, ModelParams, ParamsError
from chestct.training.backbones import BACKBONE_NAME, backbone_spec
from chestct.training.layers import BackbonePreprocessing, ChannelAttention, SpatialAttention
from chestct.training.lesion_map import (
    LESION_DECODER_PREFIX,
    LESION_MAP_NAME,
    decoder_strides,
    lesion_map_head,
    skip_layer_names,
)

PREDICTION_NAME = "prediction"


class ModelFileError(ChestctError, FileNotFoundError):
    """A model file an earlier stage should have written is missing."""


# --- the whole model --------------------------------------------------------------------------------------


def _head(features, params: HeadParams, synchronized_batchnorm: bool = False):
    """Noise on the pooled features, the dense blocks, and the float32 sigmoid output.

    `synchronized_batchnorm`: under a distribution strategy the head's batch statistics are those of the global
    batch, not of each replica's slice, so N replicas train the same model as one process."""
    x = features
    if params.input_noise_stddev > 0:
        # Placed on the pooled backbone features: a mild regulariser for the head only (active in training).
        x = layers.GaussianNoise(params.input_noise_stddev, name="feature_noise")(x)
    regularizer = keras.regularizers.L2(params.l2) if params.l2 > 0 else None
    for index, units in enumerate(params.units):
        x = layers.Dense(units, kernel_regularizer=regularizer, name=f"head_dense_{index}")(x)
        x = layers.BatchNormalization(momentum=params.batchnorm_momentum, synchronized=synchronized_batchnorm,
                                      name=f"head_bn_{index}")(x)
        x = layers.ReLU(name=f"head_relu_{index}")(x)
        x = layers.Dropout(params.dropout, name=f"head_dropout_{index}")(x)
    # float32 so the probability stays exact under mixed precision.
    return layers.Dense(1, activation="sigmoid", dtype="float32", name=PREDICTION_NAME)(x)


def _with_skips(backbone: keras.Model, image_size: int, strides: tuple[int, ...]) -> keras.Model:
    """The backbone as a model that also returns its deepest feature maps at `strides` (coarsest first), under
    the backbone's own name, so fine-tuning and loading find it as before."""
    names = skip_layer_names(backbone, image_size, strides)
    outputs = [backbone.get_layer(name).output for name in names] + [backbone.output]
    return keras.Model(backbone.input, outputs, name=BACKBONE_NAME)


def build_model(params: ModelParams, image_size: int, synchronized_batchnorm: bool = False) -> keras.Model:
    """The phase-1 model: backbone frozen, attention and head trainable; input (S, S, 1) uint8."""
    spec = backbone_spec(params.backbone)
    backbone = spec.build(params.weights, image_size)
    lesion_map = params.lesion_map.enabled
    if lesion_map:
        if image_size % 32:
            raise ParamsError(f"model.lesion_map needs preprocess.image_size divisible by 32, got {image_size}")
        backbone = _with_skips(backbone, image_size, decoder_strides(params.lesion_map))
    backbone.trainable = False

    image = keras.Input(shape=(image_size, image_size, 1), dtype="uint8", name="image")
    x = BackbonePreprocessing(spec.preprocessing, dtype="float32", name="preprocessing")(image)
    # Inference mode for the base whenever the outer model does not say otherwise (predict, export); during
    # fit Keras passes training=True over it, and the non-trainable BatchNorm layers keep their statistics.
    x = backbone(x, training=False)
    skips = []
    if lesion_map:
        *skips, x = x
    x = ChannelAttention(params.attention.ratio, name="channel_attention")(x)
    x = SpatialAttention(params.attention.kernel_size, name="spatial_attention")(x)
    name = f"chestct_{params.backbone}"
    if lesion_map:
        return keras.Model(image, list(lesion_map_head(x, skips, image, params.lesion_map)), name=name)
    x = layers.GlobalAveragePooling2D(name="pooling")(x)
    return keras.Model(image, _head(x, params.head, synchronized_batchnorm), name=name)


def has_lesion_map(model: keras.Model) -> bool:
    return LESION_MAP_NAME in [layer.name for layer in model.layers]


def classifier_view(model: keras.Model) -> keras.Model:
    """The one-output model (image -> prediction) sharing `model`'s layers: `model` itself when it has no map."""
    if not has_lesion_map(model):
        return model
    return keras.Model(model.input, model.get_layer(PREDICTION_NAME).output, name=model.name)


def lesion_map_view(model: keras.Model) -> keras.Model:
    """image -> (prediction, lesion_map) sharing `model`'s layers; the model must have a lesion map."""
    return keras.Model(model.input, [model.get_layer(PREDICTION_NAME).output, model.get_layer(LESION_MAP_NAME).output],
                       name=model.name)


def prediction_of(outputs):
    """The probability among a model call's outputs (a tensor, or the [prediction, lesion_map] pair)."""
    if isinstance(outputs, dict):
        return outputs[PREDICTION_NAME]
    if isinstance(outputs, (list, tuple)):
        return outputs[0]
    return outputs


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


def unfreeze_amount(params: ModelParams) -> float:
    """`model.unfreeze.<backbone>`: every registered backbone needs its own amount in params.yaml."""
    backbone_spec(params.backbone)
    if params.backbone not in params.unfreeze:
        raise ParamsError(
            f"model.unfreeze.{params.backbone}: missing; give the fraction (< 1) or count of backbone layers "
            f"phase 2 unfreezes for {params.backbone} in params.yaml")
    return params.unfreeze[params.backbone]


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
    count = layers_to_unfreeze(unfreeze_amount(params), len(computing), params.backbone)
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
    `keras.Model(model.input, [model.get_layer(name).output, model.output])`. A lesion-map model's is the last
    layer of its decoder before the map's 1x1 convolution (its lung-coverage map is 4-D too, but computed from
    the input alone, and the one-channel logits would make Grad-CAM a copy of the map).
    """
    decoder = [layer.name for layer in model.layers if layer.name.startswith(LESION_DECODER_PREFIX)]
    if decoder:
        return decoder[-1]
    for layer in reversed(model.layers):
        if len(layer.output.shape) == 4:
            return layer.name
    raise ValueError(f"model {model.name} has no layer with a 4-D output")


# --- loading ----------------------------------------------------------------------------------------------


def load_trained_model(path: Path, keep_lesion_map: bool = False) -> keras.Model:
    """Load a model a training phase wrote (every custom object is registered by this module's imports).

    A lesion-map model comes back as its one-output `classifier_view` unless `keep_lesion_map` (training)."""
    if not Path(path).is_file():
        raise ModelFileError(f"{path}: model not found; run the earlier stage first (dvc repro)")
    model = keras.models.load_model(path, compile=False)
    return model if keep_lesion_map else classifier_view(model)
