"""The export-format registry: every format the export stage writes and the predictor loads, one entry each.

An `ExportFormat` names its file inside models/export/, how to write it from the trained Keras model, how to load
it back as a `predict(images) -> probabilities` function, and how to fingerprint it. The same names are used
everywhere: `export.formats` in params.yaml, metadata.json, the predictor's default order (registry order), the
CLI's `--formats` help and metrics/export.json. Adding a format is one entry in FORMATS; the tests iterate it.

Every loader takes the cached uint8 images (N, S, S, 1) and returns float64 probabilities (N,). A model with a
lesion map (chestct.training.lesion_map) is exported whole, with both outputs, in every format; its loaders also
give the map, float64 (N, h, w), through `LoadedExport.predict_with_map`. An export with a feature-distance
domain check (chestct.feature_domain) also gives the model's pooled features (N, D) as its last output, read
through `LoadedExport.predict_outputs`. The outputs are told apart by shape (the probability is (N, 1), the
features (N, D) with D > 1, the map (N, h, w, 1)), since graph formats name them output_0, output_1 or not at all.

TensorFlow and the Keras model code are imported inside the writers and loaders, not at the top: the registry is
read without them (`chestct check-params`, the predictor's format order, the service's metadata checks).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import shutil
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np

from chestct.errors import ChestctError

Predict = Callable[[np.ndarray], np.ndarray]


class ModelOutputs(NamedTuple):
    """What one forward pass of an exported model gives, float64."""

    scores: np.ndarray  # (N,) probabilities of Cancer
    maps: np.ndarray | None  # (N, h, w) lesion maps; None for a model without one
    features: np.ndarray | None  # (N, D) pooled features; None for an export without them (before schema 2.5)


PredictOutputs = Callable[[np.ndarray], ModelOutputs]


class ExportedModelError(ChestctError, RuntimeError):
    """An exported model cannot be loaded or run; the message names the format and the file."""


class UnknownFormatError(ChestctError, ValueError):
    """An export format name that is not in the registry."""


class NothingToExportError(ChestctError, ValueError):
    """`export.formats` names no format that can be written for this backbone."""


def artifact_digest(path: Path) -> tuple[str, int]:
    """sha256 and size in bytes of a file, or of a folder's files in sorted order (for SavedModel)."""
    digest, size = hashlib.sha256(), 0
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for file in files:
        if path.is_dir():
            digest.update(file.relative_to(path).as_posix().encode())
        data = file.read_bytes()
        digest.update(data)
        size += len(data)
    return digest.hexdigest(), size


def artifact_bytes(path: Path) -> int:
    """Size in bytes of a file, or of all of a folder's files (for SavedModel)."""
    return path.stat().st_size if path.is_file() else sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def remove_artifact(path: Path) -> None:
    """Delete one written artifact, a file or a folder (SavedModel)."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink()


# --- writers ----------------------------------------------------------------------------------------------


@contextlib.contextmanager
def quiet_output():
    """Silence both Python prints and native (C++) logs: model.export prints about 2,000 lines."""
    saved = [os.dup(1), os.dup(2)]
    with open(os.devnull, "w") as devnull:
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(devnull.fileno(), 1)
        os.dup2(devnull.fileno(), 2)
        try:
            with contextlib.redirect_stdout(devnull), contextlib.redirect_stderr(devnull):
                yield
        finally:
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            for descriptor in saved:
                os.close(descriptor)
            _drop_handlers_on(devnull)


def _drop_handlers_on(stream) -> None:
    """Remove the logging handlers created on `stream` while it stood in for stderr. absl's first log line calls
    logging.basicConfig(), whose handler would otherwise keep the closed null device and fail every later log."""
    loggers = [logging.getLogger(), *logging.Logger.manager.loggerDict.values()]
    for logger in loggers:
        for handler in list(getattr(logger, "handlers", [])):  # loggerDict also holds placeholders
            if getattr(handler, "stream", None) is stream:
                logger.removeHandler(handler)


class SavedModelSource:
    """One SavedModel export, made on first use and shared by every format built from it (SavedModel itself and
    both TFLite variants): `location` is the export's savedmodel/ folder when that format is written, else scratch."""

    def __init__(self, model, location: Path):
        self._model, self._location, self._exported = model, location, False

    def path(self) -> Path:
        if not self._exported:
            with quiet_output():
                self._model.export(str(self._location), format="tf_saved_model")
            self._exported = True
        return self._location


def _write_keras_file(model, path: Path, savedmodel: SavedModelSource) -> None:
    model.save(path)  # .keras or legacy .h5, by the file's extension


def _write_savedmodel(model, path: Path, savedmodel: SavedModelSource) -> None:
    if savedmodel.path() != path:
        raise RuntimeError(f"the shared SavedModel was exported to {savedmodel.path()}, not {path}")


def _tflite_writer(quantization: str):
    """A TFLite writer: "none" (float32), "dynamic" (int8 weights, float activations) or "float16" (weights)."""

    def write(model, path: Path, savedmodel: SavedModelSource) -> None:
        import tensorflow as tf

        converter = tf.lite.TFLiteConverter.from_saved_model(str(savedmodel.path()))
        if quantization in ("dynamic", "float16"):
            converter.optimizations = [tf.lite.Optimize.DEFAULT]
        if quantization == "float16":
            converter.target_spec.supported_types = [tf.float16]
        with quiet_output():
            path.write_bytes(converter.convert())

    return write


# --- loaders ----------------------------------------------------------------------------------------------


def split_outputs(outputs) -> ModelOutputs:
    """The probabilities, lesion maps and pooled features among one call's outputs: an array, or several."""
    if not isinstance(outputs, (list, tuple)):
        outputs = [outputs]
    arrays = [np.asarray(output) for output in outputs]
    scores = [array for array in arrays if array.ndim <= 1 or (array.ndim == 2 and array.shape[-1] == 1)]
    features = [array for array in arrays if array.ndim == 2 and array.shape[-1] > 1]
    maps = [array for array in arrays if array.ndim == 4]
    if len(scores) != 1 or len(maps) > 1 or len(features) > 1 or len(scores) + len(maps) + len(features) != len(arrays):
        raise ExportedModelError(f"expected a probability output (N, 1), at most one lesion map (N, h, w, 1) and at "
                                 f"most one feature output (N, D), got outputs of shapes "
                                 f"{[array.shape for array in arrays]}")
    return ModelOutputs(scores[0].reshape(-1).astype(np.float64),
                        maps[0][..., 0].astype(np.float64) if maps else None,
                        features[0].astype(np.float64) if features else None)


def _batched(run: Callable[[np.ndarray], ModelOutputs], batch_size: int) -> PredictOutputs:
    def predict_outputs(images: np.ndarray) -> ModelOutputs:
        parts = [run(images[start:start + batch_size]) for start in range(0, len(images), batch_size)]
        if not parts:
            return ModelOutputs(np.zeros(0), None, None)
        return ModelOutputs(*(None if parts[0][field] is None else np.concatenate([part[field] for part in parts])
                              for field in range(len(ModelOutputs._fields))))

    return predict_outputs


def _load_keras_file(path: Path, batch_size: int) -> tuple[PredictOutputs, object]:
    from chestct.evaluation.features import scoring_view
    from chestct.training.model import load_trained_model  # registers every custom object

    model = load_trained_model(path, keep_lesion_map=True)
    # predict_on_batch skips model.predict's per-call dataset set-up (about 200 ms for a single image).
    return _batched(lambda batch: split_outputs(model.predict_on_batch(batch)), batch_size), scoring_view(model)


def _load_savedmodel(path: Path, batch_size: int) -> tuple[PredictOutputs, None]:
    import tensorflow as tf

    serve = tf.saved_model.load(str(path)).signatures["serving_default"]
    return _batched(lambda batch: split_outputs(list(serve(tf.constant(batch)).values())), batch_size), None


def _load_tflite(path: Path, batch_size: int) -> tuple[PredictOutputs, None]:
    import tensorflow as tf

    interpreter = tf.lite.Interpreter(model_path=str(path))
    interpreter.allocate_tensors()
    input_index = interpreter.get_input_details()[0]["index"]
    output_indices = [detail["index"] for detail in interpreter.get_output_details()]

    def run(single: np.ndarray) -> ModelOutputs:
        interpreter.set_tensor(input_index, single)
        interpreter.invoke()
        return split_outputs([interpreter.get_tensor(index) for index in output_indices])

    # One image per invoke: the converted graph has a fixed batch of 1, as on an edge device.
    return _batched(run, 1), None


# --- the registry -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ExportFormat:
    name: str  # the one name used in params, metadata, the predictor, the CLI and reports
    file_name: str  # file or folder inside models/export/
    write: Callable[[object, Path, SavedModelSource], None]
    load: Callable[[Path, int], tuple[PredictOutputs, object | None]]  # -> (predict, the keras.Model or None)
    quantized: bool = False  # checked at export.quantized_tolerance instead of export.float_tolerance
    needs_legacy_h5: bool = False  # only for backbones whose registry entry says legacy_h5
    digest: Callable[[Path], tuple[str, int]] = artifact_digest

    @property
    def gives_keras_model(self) -> bool:
        """Whether the loaded format is a keras.Model (Grad-CAM needs one)."""
        return self.load is _load_keras_file


FORMATS: dict[str, ExportFormat] = {fmt.name: fmt for fmt in (
    ExportFormat("keras", "chestct.keras", _write_keras_file, _load_keras_file),
    ExportFormat("h5", "chestct.h5", _write_keras_file, _load_keras_file, needs_legacy_h5=True),
    ExportFormat("savedmodel", "savedmodel", _write_savedmodel, _load_savedmodel),
    ExportFormat("tflite_float32", "chestct_float32.tflite", _tflite_writer("none"), _load_tflite),
    ExportFormat("tflite_dynamic", "chestct_dynamic.tflite", _tflite_writer("dynamic"), _load_tflite, quantized=True),
    ExportFormat("tflite_float16", "chestct_float16.tflite", _tflite_writer("float16"), _load_tflite, quantized=True),
)}
FORMAT_ORDER = tuple(FORMATS)  # the predictor's default order: the most faithful formats first


def export_format(name: str) -> ExportFormat:
    try:
        return FORMATS[name]
    except KeyError:
        raise UnknownFormatError(f"unknown export format {name!r}; choose from {', '.join(FORMATS)}") from None


def planned_formats(requested: list[str], backbone_legacy_h5: bool, backbone: str) -> tuple[list[str], dict[str, str]]:
    """`export.formats` -> (names to write, {name: why skipped}); an unknown name fails naming the choices."""
    names, skipped = [], {}
    for name in requested:
        fmt = export_format(name)
        if fmt.needs_legacy_h5 and not backbone_legacy_h5:
            skipped[name] = f"Keras cannot reload {backbone} from legacy .h5 (use .keras or SavedModel)"
        elif name not in names:
            names.append(name)
    if not names:
        reasons = "; ".join(f"{name}: {why}" for name, why in skipped.items())
        raise NothingToExportError(f"export.formats leaves nothing to export ({reasons}); add keras, savedmodel or "
                                   f"tflite_float32 to export.formats")
    return names, skipped


def write_artifacts(model, folder: Path, names: list[str]) -> dict[str, Path]:
    """Write each named format into `folder`; returns format name -> path."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = {name: folder / export_format(name).file_name for name in names}
    with tempfile.TemporaryDirectory() as scratch:
        savedmodel = SavedModelSource(model, paths.get("savedmodel", Path(scratch) / "savedmodel"))
        for name, path in paths.items():
            FORMATS[name].write(model, path, savedmodel)
    return paths


@dataclass(frozen=True)
class LoadedExport:
    format: str
    path: Path
    predict_outputs: PredictOutputs
    keras_model: object | None = None  # the probability alone as a keras.Model for .keras/.h5 (Grad-CAM); None
    # for graph formats

    def predict_with_map(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """(probabilities (N,), lesion maps (N, h, w) or None)."""
        outputs = self.predict_outputs(images)
        return outputs.scores, outputs.maps

    def predict(self, images: np.ndarray) -> np.ndarray:
        return self.predict_outputs(images).scores


def open_exported(format_name: str, path: str | Path, batch_size: int = 32) -> LoadedExport:
    """Load one exported artifact; ExportedModelError names the format and file on failure."""
    path = Path(path)
    if format_name not in FORMATS:
        raise ExportedModelError(f"unknown export format {format_name!r}; known: {', '.join(FORMATS)}")
    if not path.exists():
        raise ExportedModelError(f"{format_name}: {path} not found; run `dvc repro export`")
    try:
        predict, keras_model = FORMATS[format_name].load(path, batch_size)
    except ExportedModelError:
        raise
    except Exception as exc:  # every loader failure becomes one message naming the format
        raise ExportedModelError(f"{format_name}: cannot load {path} ({type(exc).__name__}: {exc})") from exc
    return LoadedExport(format_name, path, predict, keras_model)


def load_exported(format_name: str, path: str | Path, batch_size: int = 32) -> Predict:
    """A predict function for one exported artifact; ExportedModelError names the format and file on failure."""
    return open_exported(format_name, path, batch_size).predict
