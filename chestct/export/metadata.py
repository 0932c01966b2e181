"""metadata.json, its one owner: what a server needs to reproduce the model's input and decision, as a schema.

The export stage writes it with `build_metadata` + `write_metadata`; the predictor reads it with `read_metadata`,
which validates it against `ExportMetadata` and refuses a file of another major schema version with a message
saying what to do. Like a MONAI bundle's metadata, it records the library versions that wrote the model and the
network's input contract (dtype, shape, value range), so a consumer can check both before feeding it.

Schema versions: a minor bump adds optional fields (older readers ignore them); a major bump changes or removes
fields, and readers of another major refuse the file. 2.1 added `left_out_formats` (quantized variants that failed
the parity check); a 2.0 file reads as one that left nothing out. 2.2 added `source` (the git revision the export
ran from and the registry version that commit carries, chestct.export.provenance); older files read with null.
2.3 added `lesion_map` (the second output of a lesion-map model: its tensor contract and pooling); older files,
and models without a map, read with null. 2.4 added `calibration` (the score -> probability map fitted beside the
threshold, chestct.calibration); older files read as uncalibrated. 2.5 added `domain` (the feature-distance domain
check, chestct.feature_domain: its file, digest and cut, with the pooled features as the models' last output);
older files read with null and are checked by the first layer alone. 2.6 added `domain.cut_basis` (what the cut is a
quantile of, `evaluate.domain.cut_on`); older files read as "the validation images".
"""

from __future__ import annotations

import hashlib
import json
from importlib import metadata as package_metadata
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from chestct.calibration import UNCALIBRATED, CalibrationMap
from chestct.decision import DECISION_RULE
from chestct.errors import ChestctError
from chestct.labels import CLASS_NAMES
from chestct.params import Params, PreprocessParams, ServeParams

SCHEMA_VERSION = "2.6"
METADATA_FILE = "metadata.json"
# Serving limits that exports written before them lack: such an export gets params.yaml's values at the time.
SERVE_DEFAULTS = {"max_concurrent": 2, "queue_timeout_s": 10.0, "body_timeout_s": 30.0, "max_connections": 64,
                  "header_timeout_s": 10.0, "max_connections_per_client": 16, "shutdown_grace_s": 30.0}


class MetadataError(ChestctError, ValueError):
    """metadata.json is missing, unreadable, of another major schema version, or does not match the schema."""


class _Record(BaseModel):
    # Unknown keys are ignored, so a reader accepts files of a newer minor version of the same major.
    model_config = ConfigDict(extra="ignore", frozen=True)


class TensorContract(_Record):
    name: str
    dtype: str
    shape: list[int]  # without the batch axis
    value_range: tuple[float, float]
    meaning: str


class ArtifactRecord(_Record):
    file: str
    sha256: str
    bytes: int


class LeftOutRecord(_Record):
    """A quantized format the export stage wrote, measured and then removed: why, and the figures it failed on.

    The figures are None when the artifact could not be loaded or run at all (the reason then holds the error).
    """

    reason: str
    max_abs_diff: float | None  # max |p - p_keras| over the test images
    tolerance: float
    decision_agreement: float | None  # share of test decisions equal to the Keras model's
    required_agreement: float


class ExportSource(_Record):
    """The git commit the export stage ran from and the GTO version registered on it (None when unknown)."""

    git_revision: str | None = None
    artifact_version: str | None = None


class EvaluationSettings(_Record):
    """How the evaluate stage measured this model; external validation uses the same settings by default."""

    confidence_level: float
    bootstrap_resamples: int
    seed: int
    gradcam_images: int
    histogram_bins: int


class LesionMapRecord(_Record):
    """The second output of a lesion-map model (chestct.training.lesion_map) and how the probability comes from it."""

    output: TensorContract
    stride: int  # input pixels per map cell
    pooling: str  # max | top_k | lse over the cells inside the lung fields


class DomainRecord(_Record):
    """The feature-distance domain check (chestct.feature_domain): its fit travels as `file` in the export."""

    file: str
    sha256: str
    bytes: int
    features: TensorContract  # the models' last output
    cut: float
    quantile: float
    fitted_images: int
    validation_images: int
    cut_basis: str = "the validation images"  # what the cut is a quantile of (schema 2.6)


class ExportMetadata(_Record):
    schema_version: str
    model: Literal["chestct"] = "chestct"
    backbone: str
    weights: str | None
    versions: dict[str, str]  # chestct, tensorflow, keras
    class_names: list[str]
    positive_class: str
    threshold: float = Field(ge=0.0, le=1.0)
    threshold_method: str
    threshold_chosen_on: str
    decision: str
    input: TensorContract
    output: TensorContract
    preprocess: PreprocessParams
    serve: ServeParams
    evaluation: EvaluationSettings
    params_sha256: str
    artifacts: dict[str, ArtifactRecord]
    skipped_formats: dict[str, str]  # not written: the backbone cannot be saved in that format
    left_out_formats: dict[str, LeftOutRecord] = {}  # written, failed parity, removed (schema 2.1)
    source: ExportSource = ExportSource()  # where the export came from (schema 2.2; older files: unknown)
    lesion_map: LesionMapRecord | None = None  # the model's second output (schema 2.3; None: no map)
    calibration: CalibrationMap = UNCALIBRATED  # score -> probability (schema 2.4; older files: uncalibrated)
    domain: DomainRecord | None = None  # the feature-distance domain check (schema 2.5; None: first layer only)
    metrics: dict  # headline figures of the evaluate stage (see _summary), for the model card and /model-info

    @field_validator("serve", mode="before")
    @classmethod
    def _serve_limits_of_older_exports(cls, serve: object) -> object:
        return SERVE_DEFAULTS | serve if isinstance(serve, dict) else serve


def library_versions() -> dict[str, str]:
    versions = {}
    for name in ("chestct", "tensorflow", "keras"):
        try:
            versions[name] = package_metadata.version(name)
        except package_metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


# Sections that say what is measured after the export, not how the model was made: left out of the digest, so
# declaring a cross-source set does not re-export (the export stage does not declare them either).
NOT_IN_DIGEST = {"external"}


def params_digest(params: Params) -> str:
    """sha256 of the validated params that make the model, independent of comments and key order in params.yaml."""
    # Section by section (not model_dump(exclude=...)), so only the sections in the digest are read.
    values = {}
    for name in type(params).model_fields:
        if name not in NOT_IN_DIGEST:
            value = getattr(params, name)
            values[name] = value.model_dump(mode="json") if isinstance(value, BaseModel) else value
    canonical = json.dumps(values, sort_keys=True)
    return hashlib.sha256(canonical.encode()).hexdigest()


_SUMMARY_KEYS = ("n", "n_normal", "auc", "auc_ci", "sensitivity", "sensitivity_ci", "specificity", "specificity_ci",
                 "ppv", "npv", "brier")


def _summary(section: dict | None) -> dict | None:
    if not section:
        return None
    return {key: section.get(key) for key in _SUMMARY_KEYS}


def build_metadata(params: Params, threshold: dict, artifacts: dict[str, dict], skipped: dict[str, str],
                   image_size: int, eval_metrics: dict | None,
                   left_out: dict[str, dict] | None = None, source: dict | None = None,
                   domain: dict | None = None) -> ExportMetadata:
    """The metadata of one export; `threshold` is models/threshold.json as the evaluate stage wrote it,
    `left_out` the parity reports of the formats removed from the export (chestct.export.parity), `source`
    chestct.export.provenance.export_source() (None: unknown) and `domain` the DomainRecord's fields (None: the
    export has no feature-distance check)."""
    eval_metrics = eval_metrics or {}
    return ExportMetadata(
        schema_version=SCHEMA_VERSION,
        backbone=params.model.backbone,
        weights=params.model.weights,
        versions=library_versions(),
        class_names=list(CLASS_NAMES),
        positive_class=CLASS_NAMES[1],
        threshold=threshold["threshold"],
        threshold_method=threshold["method"],
        threshold_chosen_on=threshold["chosen_on"],
        decision=DECISION_RULE,
        input=TensorContract(name="image", dtype="uint8", shape=[image_size, image_size, 1], value_range=(0, 255),
                             meaning="grayscale after chestct.imaging.preprocess.preprocess_image with the "
                                     "preprocess params below"),
        output=TensorContract(name="probability", dtype="float32", shape=[1], value_range=(0, 1),
                              meaning="probability of Cancer"),
        preprocess=params.preprocess,
        serve=params.serve,
        evaluation=EvaluationSettings.model_validate(threshold["settings"]),
        params_sha256=params_digest(params),
        artifacts={name: ArtifactRecord.model_validate(record) for name, record in artifacts.items()},
        skipped_formats=skipped,
        left_out_formats={name: LeftOutRecord.model_validate(report) for name, report in (left_out or {}).items()},
        source=ExportSource.model_validate(source or {}),
        lesion_map=_lesion_map_record(params, image_size),
        calibration=CalibrationMap.model_validate(threshold.get("calibration", {})),
        domain=None if domain is None else DomainRecord.model_validate(domain),
        metrics={name: _summary(eval_metrics.get(name)) for name in ("test", "test_leak_free", "valid")}
        | {"shortcut": eval_metrics.get("shortcut")}
        | ({"out_of_fold": threshold["out_of_fold"]} if "out_of_fold" in threshold else {}),
    )


def _lesion_map_record(params: Params, image_size: int) -> LesionMapRecord | None:
    settings = params.model.lesion_map
    if not settings.enabled:
        return None
    side = image_size // settings.stride
    return LesionMapRecord(
        output=TensorContract(name="lesion_map", dtype="float32", shape=[side, side, 1], value_range=(0, 1),
                              meaning=f"lesion probability per {settings.stride}x{settings.stride}-pixel cell of the "
                                      f"input; the probability is its {settings.pooling} pooling over the lung cells"),
        stride=settings.stride, pooling=settings.pooling)


def write_metadata(folder: Path, metadata: ExportMetadata) -> Path:
    path = folder / METADATA_FILE
    path.write_text(json.dumps(metadata.model_dump(mode="json"), indent=2) + "\n")
    return path


def read_metadata(folder: Path) -> ExportMetadata:
    """Read and validate `folder/metadata.json`; MetadataError says what is wrong and how to fix it."""
    path = Path(folder) / METADATA_FILE
    if not path.is_file():
        raise MetadataError(f"{path.name} not found in {folder}")
    try:
        raw = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise MetadataError(f"{path} is not readable JSON ({exc}); rerun `dvc repro export`") from None
    if not isinstance(raw, dict):
        raise MetadataError(f"{path} is not a chestct export metadata file; rerun `dvc repro export`")
    version = str(raw.get("schema_version", "1"))
    if version.split(".")[0] != SCHEMA_VERSION.split(".")[0]:
        raise MetadataError(
            f"{path} has metadata schema version {version}, this chestct reads major version "
            f"{SCHEMA_VERSION.split('.')[0]} ({SCHEMA_VERSION}); re-export the model with this chestct "
            f"(`dvc repro export`) or serve it with the chestct version that wrote it")
    try:
        return ExportMetadata.model_validate(raw)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()[:5])
        raise MetadataError(f"{path} does not match the export metadata schema {SCHEMA_VERSION} ({problems}); "
                            f"rerun `dvc repro export`") from None
