"""What /openapi.json promises about the API: the answer models, the error answers and the multipart bodies of
/predict and /predict/series.

schemathesis (tests/test_schema_fuzz.py) checks every answer of the running service against this schema.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

FIELD = "files"  # the multipart field /predict reads its scans from
SERIES_FIELD = "file"  # the multipart field /predict/series reads its zip from


class Problem(BaseModel):
    detail: str


class ValidationProblem(BaseModel):
    detail: str | list[dict[str, Any]]  # a damaged image (a message), or FastAPI's list for a bad query parameter


class ModelRef(BaseModel):
    format: str
    sha256: str


class PredictionResult(BaseModel):
    filename: str
    diagnosis: Literal["Normal", "Cancer"]
    cancer_probability: float  # the model's score, which the threshold applies to
    cancer_probability_calibrated: float  # the score as a probability (the export's calibration map)
    confidence: float
    threshold: float
    threshold_calibrated: float
    calibration: str  # how the calibrated probability was obtained ("uncalibrated: ..." for older exports)
    in_domain: bool  # false: not what the model was made for (the decision is still given)
    domain_reason: str | None  # why not, e.g. "no lung fields found inside the body: ..."
    model: ModelRef
    input_png: str  # data:image/png;base64 URL of what the model saw
    gradcam_png: str | None  # the Grad-CAM overlay, when asked for and the format allows it
    lesion_map_png: str | None = None  # the model's own lesion map over its input, when the model has one


class PredictResponse(BaseModel):
    results: list[PredictionResult]


class SliceResult(BaseModel):
    """One slice of a series (SliceScore.to_dict); `file` is its name inside the uploaded zip."""
    file: str
    sop_instance_uid: str
    z: float | None
    instance_number: int | None
    probability: float | None
    decision: int | None
    in_lungs: bool | None
    in_domain: bool | None = None  # the domain check's first layer: an axial chest CT slice?
    domain_reason: str | None = None
    error: str | None


class SeriesResult(BaseModel):
    """One series of the zip (SeriesScore.to_dict) and its pictures. Keys the library adds later pass through."""
    model_config = ConfigDict(extra="allow")

    series_instance_uid: str
    label: str
    patient_id: str
    study_instance_uid: str
    series_number: str
    description: str
    kernel: str
    manufacturer: str
    slices: int
    score: float | None  # None: no series score (the problems say why)
    decision: int | None
    diagnosis: Literal["Normal", "Cancer"] | None
    threshold: float
    top_slice: SliceResult | None  # the slice that gave the score
    rule: str
    threshold_note: str | None = None
    note: str
    problems: list[str]  # why the slices cannot be ordered along z as one series
    skipped: list[str]  # slices that could not be decoded, with the reason
    per_slice: list[SliceResult]
    z_profile_png: str  # data:image/png;base64 URL: slice probability along z, with the threshold
    top_slice_png: str | None  # what the model saw of the top slice


class NotDicomFile(BaseModel):
    file: str  # the name inside the zip
    reason: str


class SeriesResponse(BaseModel):
    series: list[SeriesResult]
    not_dicom: list[NotDicomFile]  # files of the zip that are not DICOM slices, and why
    rule: str  # how a series' score is made from its slices
    model: ModelRef


RETRY_AFTER = {"Retry-After": {"description": "seconds to wait before retrying when the server is busy",
                               "schema": {"type": "integer"}}}
UNAVAILABLE = {503: {"model": Problem, "headers": RETRY_AFTER,
                     "description": "no model is loaded (the detail says how to make one), or every prediction "
                                    "slot stayed busy for serve.queue_timeout_s (Retry-After says when to retry)"}}
NOT_READY = {503: {"model": Problem,
                   "description": "no model is loaded, or the service is shutting down (the detail says which)"}}
PREDICT_ERRORS = {
    400: {"model": Problem, "description": "empty file, wrong field name or unreadable multipart body"},
    408: {"model": Problem, "description": "the body stalled or trickled (serve.body_timeout_s)"},
    413: {"model": Problem, "description": "over serve.max_upload_mb, serve.max_files or serve.max_pixels"},
    415: {"model": Problem, "description": "not multipart/form-data, or a file that is not PNG, JPEG or DICOM"},
    422: {"model": ValidationProblem, "description": "a damaged image, DICOM without usable pixels, or a bad "
                                                     "query parameter"},
} | UNAVAILABLE
# /predict reads its multipart body itself (to count and time it): its request body is declared here.
UPLOAD_BODY = {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
    "type": "object", "required": [FIELD],
    "properties": {FIELD: {"type": "array", "minItems": 1, "items": {"type": "string", "format": "binary"},
                           "description": "the scans (PNG, JPEG or DICOM), at most serve.max_files"}}}}}}}
SERIES_ERRORS = {
    400: {"model": Problem, "description": "not a zip, an unsafe or encrypted member, no DICOM slice in the zip, "
                                           "wrong field name or unreadable multipart body"},
    408: PREDICT_ERRORS[408],
    413: {"model": Problem, "description": "the zip is over serve.max_upload_mb x serve.max_files, or holds too "
                                           "many members, a member over serve.max_upload_mb or too much in all"},
    415: {"model": Problem, "description": "not multipart/form-data"},
} | UNAVAILABLE
SERIES_UPLOAD_BODY = {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
    "type": "object", "required": [SERIES_FIELD],
    "properties": {SERIES_FIELD: {"type": "string", "format": "binary",
                                  "description": "one .zip of a DICOM series folder (any layout; several series "
                                                 "are reported one by one)"}}}}}}}
