"""The model's pooled features: the vector its head reads, which the feature-distance domain check measures.

A model without a lesion map pools the attention-weighted backbone features in its `pooling` layer, and the head
reads that vector. A lesion-map model has no such layer (its decoder reads the feature maps themselves), so its
features are the same attention-weighted maps averaged over the image, one more pooling layer beside the decoder.

The evaluate stage fits the domain on these features (chestct.evaluation.domain); the export stage writes the
model with them as one more output in every format (`with_features`), so the service gets them from the very
forward pass that gives the probability, whatever format it loaded.
"""

from __future__ import annotations

import keras
import numpy as np

from chestct.tf_data import array_batches
from chestct.training.model import PREDICTION_NAME, float32_copy

POOLING_NAME = "pooling"  # the pooling layer of a model without a lesion map (chestct.training.model)
ATTENTION_NAME = "spatial_attention"  # the last attention layer: the features every head reads
FEATURES_NAME = "features"


def _layer_names(model: keras.Model) -> set[str]:
    return {layer.name for layer in model.layers}


def pooled_features(model: keras.Model):
    """The symbolic pooled-feature tensor (N, D) of a trained model."""
    names = _layer_names(model)
    if POOLING_NAME in names:
        return model.get_layer(POOLING_NAME).output
    if ATTENTION_NAME not in names:
        raise ValueError(f"model {model.name} has neither a {POOLING_NAME!r} nor a {ATTENTION_NAME!r} layer: it "
                         f"was not built by chestct.training.model")
    return keras.layers.GlobalAveragePooling2D(dtype="float32", name=FEATURES_NAME)(
        model.get_layer(ATTENTION_NAME).output)


def feature_view(model: keras.Model) -> keras.Model:
    """image -> pooled features, sharing `model`'s layers."""
    return keras.Model(model.input, pooled_features(model), name=f"{model.name}_features")


def with_features(model: keras.Model) -> keras.Model:
    """`model`'s outputs (the probability, and the lesion map when it has one) and its pooled features last."""
    outputs = model.outputs if isinstance(model.outputs, list) else [model.outputs]
    return keras.Model(model.input, [*outputs, pooled_features(model)], name=model.name)


def scoring_view(model: keras.Model) -> keras.Model:
    """image -> probability alone, sharing `model`'s layers: what Grad-CAM and the audits take, whatever else
    an exported model gives beside it."""
    if len(model.outputs) == 1:
        return model
    return keras.Model(model.input, model.get_layer(PREDICTION_NAME).output, name=model.name)


def predict_features(model: keras.Model, images: np.ndarray, batch_size: int) -> np.ndarray:
    """Pooled features (N, D) float64 of every image, in order, computed in float32 as the export computes them
    (a mixed-precision model is copied to float32 first, chestct.training.model.float32_copy)."""
    view = feature_view(float32_copy(model))
    features = np.asarray(view.predict(array_batches(images, batch_size), verbose=0), np.float64)
    if len(features) != len(images):
        raise RuntimeError(f"features of {len(features)} of {len(images)} images")
    return features.reshape(len(images), -1)
