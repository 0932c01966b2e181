"""Predict from image files with an exported model: the one object the CLI, the service and external validation use.

`Predictor` reads an export folder (models/export by default, or a path, or $CHESTCT_EXPORT_DIR):
metadata.json (validated by chestct.export.metadata) gives the threshold, the preprocessing and the serving limits
that belong to *these* weights, so nothing is hard-coded and nothing comes from another run. It then tries the
formats in order (the export-format registry's order by default) and keeps the first that loads and whose sha256
matches the metadata, logging why each earlier one was passed over. Images go through the very
`chestct.imaging.preprocess.preprocess_image` the pipeline cached its arrays with.

Every answer carries the domain check: the first layer (chestct.imaging.domain) on the decoded image, and, for an
export with a feature domain (schema 2.5), the distance of the model's pooled features from the training images
(chestct.feature_domain), read from the same forward pass that gives the probability.
"""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from chestct.decision import decide
from chestct.errors import ChestctError
from chestct.export.formats import (
    FORMAT_ORDER,
    FORMATS,
    ExportedModelError,
    LoadedExport,
    ModelOutputs,
    artifact_digest,
    open_exported,
)
from chestct.export.metadata import METADATA_FILE, ExportMetadata, MetadataError, read_metadata
from chestct.feature_domain import FeatureDomain, FeatureDomainError, load_feature_domain
from chestct.imaging.decode import decode_grayscale, decode_with_colour
from chestct.imaging.domain import ChestCheck, check_chest_ct
from chestct.imaging.errors import OutOfDomainError
from chestct.imaging.files import upload_limit_bytes
from chestct.imaging.preprocess import preprocess_gray, preprocess_image
from chestct.labels import CLASS_NAMES
from chestct.params import ServeParams

log = logging.getLogger("chestct.serving.predictor")

DEFAULT_EXPORT_DIR = Path("models/export")
EXPORT_DIR_ENV = "CHESTCT_EXPORT_DIR"
FORMATS_ENV = "CHESTCT_FORMATS"


class ModelUnavailableError(ChestctError, RuntimeError):
    """No usable exported model: the message says which folder was read and how to produce a model."""


@dataclass(frozen=True)
class Prediction:
    filename: str
    diagnosis: str  # "Cancer" or "Normal"
    cancer_probability: float  # the model's score: what the threshold is applied to, identical in every format
    cancer_probability_calibrated: float  # the score through the export's calibration map (the identity without one)
    confidence: float  # calibrated probability of the class that was decided
    threshold: float
    threshold_calibrated: float  # the threshold on the calibrated scale: the same decisions
    calibration: str  # how the calibrated probability was obtained (CalibrationMap.describe)
    model_format: str
    model_sha256: str
    model_input: np.ndarray  # (S, S, 1) uint8: exactly what the model saw
    heatmap: np.ndarray | None = None  # (S, S) float32 in [0, 1] when Grad-CAM was asked for and available
    lesion_map: np.ndarray | None = None  # (S, S) float32 in [0, 1]: the model's own lesion map, when it has one
    in_domain: bool = True  # False: the domain check says this is not what the model was made for
    domain_reason: str | None = None  # why not (chestct.imaging.domain), None when in domain

    def to_dict(self) -> dict:
        return {"filename": self.filename, "diagnosis": self.diagnosis,
                "cancer_probability": self.cancer_probability,
                "cancer_probability_calibrated": self.cancer_probability_calibrated, "confidence": self.confidence,
                "threshold": self.threshold, "threshold_calibrated": self.threshold_calibrated,
                "calibration": self.calibration, "in_domain": self.in_domain, "domain_reason": self.domain_reason,
                "model": {"format": self.model_format, "sha256": self.model_sha256}}


def upsample_maps(maps: np.ndarray, size: int) -> np.ndarray:
    """Lesion maps (N, h, w) -> (N, size, size) float32, each cell spread over the input pixels it covers."""
    import cv2

    return np.stack([cv2.resize(np.asarray(cell, np.float32), (size, size), interpolation=cv2.INTER_LINEAR)
                     for cell in maps]) if len(maps) else np.zeros((0, size, size), np.float32)


def decode_limits(serve: ServeParams) -> dict:
    """The export's limits and DICOM window, as every decode of an input here takes them."""
    return {"max_pixels": serve.max_pixels, "dicom_window": serve.dicom_window,
            "max_bytes": upload_limit_bytes(serve.max_upload_mb)}


def resolve_export_dir(export_dir: str | Path | None = None) -> Path:
    """The argument, else $CHESTCT_EXPORT_DIR, else models/export."""
    return Path(export_dir or os.environ.get(EXPORT_DIR_ENV) or DEFAULT_EXPORT_DIR)


def public_path(path: str | Path) -> str:
    """How the service names a server folder in its answers: relative to the working directory when under it
    (`models/export`), else the folder's name alone, so no HTTP answer reveals the server's layout."""
    absolute = Path(path).resolve()
    try:
        return str(absolute.relative_to(Path.cwd().resolve()))
    except ValueError:
        return absolute.name


def parse_format_order(text: str | None) -> tuple[str, ...]:
    """'savedmodel,keras' -> ('savedmodel', 'keras'); None or '' -> the default order."""
    if not text:
        return FORMAT_ORDER
    names = tuple(name.strip() for name in text.split(",") if name.strip())
    unknown = [name for name in names if name not in FORMATS]
    if unknown or not names:
        raise ModelUnavailableError(f"unknown export format(s) {', '.join(unknown) or text!r}; "
                                    f"choose from {', '.join(FORMAT_ORDER)}")
    return names


def not_exported_reason(metadata: ExportMetadata, name: str) -> str:
    """Why an export holds no `name` artifact: left out after failing parity, skipped, or never asked for."""
    if name in metadata.left_out_formats:
        return f"left out of this export, it failed the parity check: {metadata.left_out_formats[name].reason}"
    return metadata.skipped_formats.get(name, "not exported")


def formats_to_try(metadata: ExportMetadata, requested: tuple[str, ...] | None) -> tuple[str, ...]:
    """The formats to load, in order. By default the registry's order less what this export does not hold
    (skipped or left out at export). An explicit request is kept as given, a fallback chain, but one naming only
    formats the export does not hold fails saying why each is absent."""
    if requested is None:
        return tuple(name for name in FORMAT_ORDER if name in metadata.artifacts) or FORMAT_ORDER
    if not any(name in metadata.artifacts for name in requested):
        reasons = "; ".join(f"{name}: {not_exported_reason(metadata, name)}" for name in requested)
        held = ", ".join(metadata.artifacts) or "no format"
        raise ModelUnavailableError(f"no requested export format is in this export: {reasons}. It holds {held}: "
                                    f"ask for one of those with --formats or {FORMATS_ENV}")
    return requested


def load_export_metadata(export_dir: Path) -> ExportMetadata:
    """The export folder's validated metadata; ModelUnavailableError says how to get a usable one."""
    if not (export_dir / METADATA_FILE).is_file():
        raise ModelUnavailableError(
            f"no exported model in {export_dir} ({METADATA_FILE} not found): run `dvc repro` (or `dvc repro "
            f"export` after training) to produce one, or point {EXPORT_DIR_ENV} / --export-dir at an export folder")
    try:
        return read_metadata(export_dir)
    except MetadataError as exc:
        raise ModelUnavailableError(str(exc)) from None


def load_domain(export_dir: Path, metadata: ExportMetadata) -> FeatureDomain | None:
    """The export's feature domain, checked against its digest in metadata.json; None for an export without one."""
    record = metadata.domain
    if record is None:
        return None
    path = export_dir / record.file
    if not path.is_file():
        raise ModelUnavailableError(f"{path} not found, but metadata.json names it (the feature-distance domain "
                                    f"check); rerun `dvc repro export`")
    if artifact_digest(path)[0] != record.sha256:
        raise ModelUnavailableError(f"sha256 of {path.name} differs from metadata.json (the file changed after "
                                    f"export); rerun `dvc repro export`")
    try:
        return load_feature_domain(path)
    except FeatureDomainError as exc:
        raise ModelUnavailableError(str(exc)) from None


class Predictor:
    """Loads one exported model once; `predict` is safe to call from several threads (calls are serialised)."""

    def __init__(self, export_dir: str | Path | None = None, formats: tuple[str, ...] | None = None,
                 refuse_out_of_domain: bool | None = None):
        self.export_dir = resolve_export_dir(export_dir)
        self.metadata = load_export_metadata(self.export_dir)
        self.preprocess_params = self.metadata.preprocess
        self.serve_params = self.metadata.serve
        # An image the domain check refuses: answered with in_domain false, or refused (OutOfDomainError).
        self.refuse_out_of_domain = (self.serve_params.refuse_out_of_domain if refuse_out_of_domain is None
                                     else refuse_out_of_domain)
        self.threshold = self.metadata.threshold
        self.calibration = self.metadata.calibration  # uncalibrated for exports older than schema 2.4
        self.domain = load_domain(self.export_dir, self.metadata)  # None for exports older than schema 2.5
        self.load_report: list[str] = []  # one line per format tried, in order
        requested = formats or (parse_format_order(os.environ[FORMATS_ENV]) if os.environ.get(FORMATS_ENV) else None)
        self._model = self._load_first(formats_to_try(self.metadata, requested))
        self.format = self._model.format
        self.sha256 = self.metadata.artifacts[self.format].sha256
        # Keras models and TFLite interpreters are not documented as thread-safe: one prediction at a time.
        self._lock = threading.Lock()

    # --- loading ------------------------------------------------------------------------------------------

    def _load_first(self, formats: tuple[str, ...]) -> LoadedExport:
        artifacts = self.metadata.artifacts
        for name in formats:
            if name not in artifacts:
                reason = not_exported_reason(self.metadata, name)
                self._note(name, f"skipped: {reason}")
                continue
            path = self.export_dir / artifacts[name].file
            if not path.exists():
                self._note(name, f"failed: {path} is missing")
                continue
            digest, _ = FORMATS[name].digest(path)
            if digest != artifacts[name].sha256:
                # A replaced file would be paired with a threshold chosen for other weights.
                self._note(name, f"failed: sha256 of {path.name} differs from metadata.json (the file changed "
                                 f"after export; rerun `dvc repro export`)")
                continue
            try:
                loaded = open_exported(name, path)
            except ExportedModelError as exc:
                self._note(name, f"failed: {exc}")
                continue
            self._note(name, f"loaded {path}")
            return loaded
        raise ModelUnavailableError(f"no export format in {self.export_dir} could be loaded:\n  "
                                    + "\n  ".join(self.load_report)
                                    + "\nRerun `dvc repro export` to rebuild the export folder.")

    def _note(self, name: str, message: str) -> None:
        line = f"{name}: {message}"
        self.load_report.append(line)
        (log.info if message.startswith("loaded") else log.warning)(line)

    # --- prediction ---------------------------------------------------------------------------------------

    @property
    def image_size(self) -> int:
        return self.preprocess_params.image_size

    @property
    def gradcam_available(self) -> bool:
        return self._model.keras_model is not None

    def prepare(self, source: bytes | str | Path, name: str | None = None) -> np.ndarray:
        """The model's input for one file or its bytes: uint8 (S, S, 1), exactly as the pipeline caches it."""
        return preprocess_image(source, self.preprocess_params, name=name, **decode_limits(self.serve_params))

    def decode(self, source: bytes | str | Path, name: str | None = None) -> np.ndarray:
        """The decoded grayscale (rows, cols) uint8 that `prepare` starts from, within the export's limits:
        for callers that also need the stored image (lung fields, lesion boxes) and then call `prepare_decoded`."""
        return decode_grayscale(source, name=name, **decode_limits(self.serve_params))

    def inspect(self, source: bytes | str | Path, name: str | None = None) -> tuple[np.ndarray, ChestCheck]:
        """`prepare`'s input for the model, and the domain check of the decoded image (decoded once for both);
        OutOfDomainError when the check fails and this predictor refuses such images."""
        gray, colour = decode_with_colour(source, name=name, **decode_limits(self.serve_params))
        check = check_chest_ct(gray, colour)
        if self.refuse_out_of_domain and not check.passed:
            raise OutOfDomainError(f"{name or source}: not scored, {check.reason}")
        return self.prepare_decoded(gray), check

    def prepare_decoded(self, gray: np.ndarray) -> np.ndarray:
        """`prepare` from a decoded grayscale: prepare(x) == prepare_decoded(decode(x)), the same preprocessing."""
        return preprocess_gray(gray, self.preprocess_params)

    @property
    def has_lesion_map(self) -> bool:
        """Whether the model gives a lesion map beside its probability (model.lesion_map; schema 2.3)."""
        return self.metadata.lesion_map is not None

    def probabilities(self, images: np.ndarray) -> np.ndarray:
        """Cancer probabilities (N,) for prepared images (N, S, S, 1) uint8."""
        return self.probabilities_and_maps(images)[0]

    def outputs(self, images: np.ndarray) -> ModelOutputs:
        """Everything one forward pass gives for prepared images (N, S, S, 1) uint8: probabilities, lesion maps
        as the model gives them (N, h, w) or None, pooled features or None."""
        with self._lock:
            return self._model.predict_outputs(np.ascontiguousarray(images, dtype=np.uint8))

    def probabilities_and_maps(self, images: np.ndarray, at_input_size: bool = True
                               ) -> tuple[np.ndarray, np.ndarray | None]:
        """(Cancer probabilities (N,), lesion maps in [0, 1] or None for a model without one), from one forward
        pass; the maps at the input's size (N, S, S), or as the model gives them (N, h, w)."""
        probabilities, maps, _ = self.outputs(images)
        if maps is None or not at_input_size:
            return probabilities, maps
        return probabilities, upsample_maps(maps, self.image_size)

    def domain_distances(self, outputs: ModelOutputs) -> np.ndarray | None:
        """The feature distance of each image (N,), or None for an export without a feature domain."""
        if self.domain is None:
            return None
        if outputs.features is None:
            raise ModelUnavailableError(f"the {self.format} model gives no pooled features, but the export has a "
                                        f"feature domain; rerun `dvc repro export`")
        return self.domain.distances(outputs.features)

    def domain_reason(self, check: ChestCheck | None, distance: float | None) -> str | None:
        """Why an image is out of domain: the first layer's reason first, then the feature distance; None: in."""
        if check is not None and not check.passed:
            return check.reason
        if distance is None or self.domain is None:
            return None
        return self.domain.reason(distance)

    def heatmaps(self, images: np.ndarray) -> np.ndarray:
        """Grad-CAM maps (N, S, S) in [0, 1]; only for the Keras formats."""
        if not self.gradcam_available:
            raise ModelUnavailableError(f"Grad-CAM needs a Keras model; the loaded format is {self.format}")
        # Grad-CAM needs TensorFlow's gradient tape: imported only when a heatmap is asked for.
        from chestct.evaluation.gradcam import gradcam

        with self._lock:
            return gradcam(self._model.keras_model, images)

    def refusal(self, distance: float | None) -> str | None:
        """"not scored, <reason>" when this predictor refuses out-of-domain images and the feature distance puts
        this one out; None otherwise."""
        reason = self.domain_reason(None, distance) if self.refuse_out_of_domain else None
        return None if reason is None else f"not scored, {reason}"

    def decide(self, filename: str, image: np.ndarray, probability: float,
               heatmap: np.ndarray | None = None, lesion_map: np.ndarray | None = None,
               domain: ChestCheck | None = None, distance: float | None = None) -> Prediction:
        reason = self.domain_reason(domain, distance)
        is_cancer = bool(decide(probability, self.threshold))  # on the score: calibration changes no decision
        calibrated = float(self.calibration.apply(probability))
        return Prediction(filename=filename, diagnosis=CLASS_NAMES[int(is_cancer)],
                          cancer_probability=float(probability), cancer_probability_calibrated=calibrated,
                          confidence=calibrated if is_cancer else 1.0 - calibrated,
                          threshold=self.threshold, threshold_calibrated=float(self.calibration.apply(self.threshold)),
                          calibration=self.calibration.describe(), model_format=self.format,
                          model_sha256=self.sha256, model_input=image, heatmap=heatmap, lesion_map=lesion_map,
                          in_domain=reason is None, domain_reason=reason)

    def predict(self, sources: list[tuple[str, bytes | str | Path]], gradcam: bool = False) -> list[Prediction]:
        """Predict (name, bytes-or-path) pairs. Every input is decoded (and checked) first, so a bad file fails
        the call with an ImageDecodeError naming it before any model work is done."""
        if not sources:
            return []
        inspected = [self.inspect(source, name) for name, source in sources]
        images = np.stack([image for image, _ in inspected])
        outputs = self.outputs(images)
        distances = self.domain_distances(outputs)
        distances = [None] * len(images) if distances is None else distances
        for (name, source), distance in zip(sources, distances, strict=True):
            if refused := self.refusal(distance):  # the first layer refused in inspect(), before any model work
                raise OutOfDomainError(f"{name or source}: {refused}")
        maps = self.heatmaps(images) if gradcam and self.gradcam_available else [None] * len(images)
        lesion_maps = ([None] * len(images) if outputs.maps is None
                       else upsample_maps(outputs.maps, self.image_size))
        return [self.decide(name, image, probability, heatmap, lesion_map, check, distance)
                for (name, _), (image, check), probability, heatmap, lesion_map, distance
                in zip(sources, inspected, outputs.scores, maps, lesion_maps, distances, strict=True)]

    def predict_file(self, path: str | Path, gradcam: bool = False) -> Prediction:
        return self.predict([(str(path), path)], gradcam=gradcam)[0]

    def info(self) -> dict:
        """What the service shows about its model."""
        return {"format": self.format, "sha256": self.sha256, "export_dir": public_path(self.export_dir),
                "backbone": self.metadata.backbone, "weights": self.metadata.weights,
                "threshold": self.threshold, "threshold_method": self.metadata.threshold_method,
                "threshold_chosen_on": self.metadata.threshold_chosen_on,
                "calibration": self.calibration.model_dump(mode="json", exclude_none=True)
                | {"description": self.calibration.describe()},
                "domain": {"feature_distance": None if self.domain is None else self.domain.describe(),
                           "refuse_out_of_domain": self.refuse_out_of_domain},
                "image_size": self.image_size, "gradcam_available": self.gradcam_available,
                "lesion_map": (None if self.metadata.lesion_map is None
                               else self.metadata.lesion_map.model_dump(mode="json")),
                "load_report": self.load_report, "metrics": self.metadata.metrics,
                "schema_version": self.metadata.schema_version, "versions": self.metadata.versions,
                "preprocess": self.metadata.preprocess.model_dump(mode="json"),
                "source": self.metadata.source.model_dump(mode="json"),
                "limits": self.serve_params.model_dump(mode="json")}
