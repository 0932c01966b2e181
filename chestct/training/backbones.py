"""The backbone registry: every ImageNet backbone the classifier can use, one `BackboneSpec` entry each.

Adding a backbone is one entry in BACKBONES plus its `model.unfreeze.<name>` amount in params.yaml. The tests
iterate BACKBONES (build, train a step, save, reload, unfreeze), so a new entry cannot go untested, and a test
checks that params.yaml names the same backbones.

Legacy .h5 files cannot hold MobileNetV3: its graph contains `x + 3.0` operations that the h5 loader mistakes for
`Add` layers (Keras 3.15). The .keras format and SavedModel work, so its entry says `legacy_h5=False`.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from chestct.errors import ChestctError

BACKBONE_NAME = "backbone"  # the nested backbone model's name inside the classifier


class UnknownBackboneError(ChestctError, ValueError):
    """model.backbone names no registered backbone."""


class WeightsUnavailableError(ChestctError, RuntimeError):
    """ImageNet weights for the backbone are neither cached nor downloadable."""


@dataclass(frozen=True)
class BackboneSpec:
    """What the pipeline needs to know about one keras.applications backbone."""

    name: str  # the value of model.backbone and the key of model.unfreeze
    application: str  # the keras.applications constructor
    # How the backbone expects its RGB input (chestct.training.layers.BackbonePreprocessing): "torch" (x / 255,
    # then ImageNet mean/std), "caffe" (BGR minus ImageNet means) or "raw" (0-255; the application rescales).
    preprocessing: str
    imagenet_weights_file: str  # the notop file Keras downloads into ~/.keras/models/
    legacy_h5: bool = True  # whether keras.models.load_model("x.h5") restores a model built on it

    def build(self, weights: str | None, image_size: int):
        """The application without its top, named "backbone", on (S, S, 3) inputs."""
        # keras is imported here, not at the top: `chestct check-params` reads the registry without TensorFlow.
        import keras

        if weights not in (None, "imagenet") and not Path(weights).is_file():
            raise WeightsUnavailableError(
                f"model.weights: weights file {weights} not found (give an existing .h5/.keras weights file, "
                f"'imagenet', or null)"
            )
        application = getattr(keras.applications, self.application)
        try:
            return application(include_top=False, weights=weights, input_shape=(image_size, image_size, 3),
                               name=BACKBONE_NAME)
        except Exception as error:
            if weights == "imagenet" and _is_download_failure(error):
                raise self._weights_unavailable(error) from error
            raise

    def _weights_unavailable(self, error: Exception) -> WeightsUnavailableError:
        # Keras' message is "URL fetch failure on <url>: ..."; the URL ends with the file name.
        match = re.search(r"https?://\S+/([^/\s:]+\.h5)", str(error))
        file_name = match.group(1) if match else self.imagenet_weights_file
        return WeightsUnavailableError(
            f"ImageNet weights for {self.name} could not be downloaded ({error}).\n"
            f"Either put {file_name} into ~/.keras/models/ (here: {keras_weights_cache()}/{file_name}), "
            f"or set `model.weights: null` in params.yaml to start from random weights "
            f"(or `model.weights: <path>` to a local weights file)."
        )


BACKBONES: dict[str, BackboneSpec] = {spec.name: spec for spec in (
    BackboneSpec("densenet121", "DenseNet121", "torch", "densenet121_weights_tf_dim_ordering_tf_kernels_notop.h5"),
    BackboneSpec("resnet50", "ResNet50", "caffe", "resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5"),
    BackboneSpec("efficientnetb0", "EfficientNetB0", "raw", "efficientnetb0_notop.h5"),
    BackboneSpec("mobilenetv3small", "MobileNetV3Small", "raw", "weights_mobilenet_v3_small_224_1.0_float_no_top_v2.h5",
                 legacy_h5=False),
)}


def backbone_spec(name: str) -> BackboneSpec:
    """The registry entry for `model.backbone`; an unknown name fails listing the choices."""
    try:
        return BACKBONES[name]
    except KeyError:
        raise UnknownBackboneError(f"model.backbone: unknown backbone {name!r}; choose one of "
                                   f"{', '.join(BACKBONES)} (chestct/training/backbones.py)") from None


def keras_weights_cache() -> Path:
    """Where Keras looks for downloaded weights ($KERAS_HOME/models, by default ~/.keras/models)."""
    return Path(os.environ.get("KERAS_HOME", Path.home() / ".keras")).expanduser() / "models"


def _is_download_failure(error: Exception) -> bool:
    message = str(error)
    return "URL fetch failure" in message or "corrupted file" in message
