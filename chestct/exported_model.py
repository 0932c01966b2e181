"""Load any exported format and predict cancer probabilities from the cached uint8 images (N, S, S, 1).

One small loader per format, each returning a `predict(images) -> probabilities (N,)` function (and, for the
Keras formats, the Keras model itself, which Grad-CAM needs). The export stage's parity check and the serving
code use these same loaders.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from chestct.errors import ChestctError

Predict = Callable[[np.ndarray], np.ndarray]

# Export format name -> file or folder name inside models/export/.
ARTIFACT_NAMES = {
    "keras": "chestct.keras",
    "h5": "chestct.h5",
    "savedmodel": "savedmodel",
    "tflite_float32": "chestct_float32.tflite",
    "tflite_dynamic": "chestct_dynamic.tflite",
}


class ExportedModelError(ChestctError, RuntimeError):
    """An exported model cannot be loaded or run; the message names the format and the file."""


@dataclass(frozen=True)
class LoadedExport:
    format: str
    path: Path
    predict: Predict
    keras_model: object | None = None  # the keras.Model for .keras/.h5 (Grad-CAM); None for graph formats


def _keras_loader(path: Path, batch_size: int) -> tuple[Predict, object]:
    import keras

    import chestct.losses  # noqa: F401  (registers custom objects)
    import chestct.model  # noqa: F401

    model = keras.models.load_model(path, compile=False)

    def predict(images: np.ndarray) -> np.ndarray:
        # predict_on_batch skips model.predict's per-call dataset set-up (about 200 ms for a single image).
        outputs = [np.asarray(model.predict_on_batch(images[start:start + batch_size])).ravel()
                   for start in range(0, len(images), batch_size)]
        return np.concatenate(outputs).astype(np.float64) if outputs else np.zeros(0)

    return predict, model


def _savedmodel_loader(path: Path, batch_size: int) -> tuple[Predict, None]:
    import tensorflow as tf

    serve = tf.saved_model.load(str(path)).signatures["serving_default"]

    def predict(images: np.ndarray) -> np.ndarray:
        outputs = []
        for start in range(0, len(images), batch_size):
            result = serve(tf.constant(images[start:start + batch_size]))
            outputs.append(next(iter(result.values())).numpy().ravel())
        return np.concatenate(outputs).astype(np.float64) if outputs else np.zeros(0)

    return predict, None


def _tflite_loader(path: Path, batch_size: int) -> tuple[Predict, None]:
    import tensorflow as tf

    interpreter = tf.lite.Interpreter(model_path=str(path))
    interpreter.allocate_tensors()
    input_index = interpreter.get_input_details()[0]["index"]
    output_index = interpreter.get_output_details()[0]["index"]

    def predict(images: np.ndarray) -> np.ndarray:
        # One image per invoke: the converted graph has a fixed batch of 1, as on an edge device.
        scores = np.empty(len(images), np.float64)
        for index, image in enumerate(images):
            interpreter.set_tensor(input_index, image[np.newaxis])
            interpreter.invoke()
            scores[index] = float(interpreter.get_tensor(output_index).ravel()[0])
        return scores

    return predict, None


_LOADERS = {
    "keras": _keras_loader,
    "h5": _keras_loader,
    "savedmodel": _savedmodel_loader,
    "tflite_float32": _tflite_loader,
    "tflite_dynamic": _tflite_loader,
}


def load_exported(format_name: str, path: str | Path, batch_size: int = 32) -> Predict:
    """A predict function for one exported artifact; ExportedModelError names the format and file on failure."""
    return open_exported(format_name, path, batch_size).predict


def open_exported(format_name: str, path: str | Path, batch_size: int = 32) -> LoadedExport:
    """Load one exported artifact; ExportedModelError names the format and file on failure."""
    path = Path(path)
    if format_name not in _LOADERS:
        raise ExportedModelError(f"unknown export format {format_name!r}; known: {', '.join(_LOADERS)}")
    if not path.exists():
        raise ExportedModelError(f"{format_name}: {path} not found; run `dvc repro export`")
    try:
        predict, keras_model = _LOADERS[format_name](path, batch_size)
    except ExportedModelError:
        raise
    except Exception as exc:  # every loader failure becomes one message naming the format
        raise ExportedModelError(f"{format_name}: cannot load {path} ({type(exc).__name__}: {exc})") from exc
    return LoadedExport(format_name, path, predict, keras_model)
