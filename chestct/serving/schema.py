"""What /openapi.json promises about the API: the answer models, the error answers and /predict's multipart body.

schemathesis (tests/test_schema_fuzz.py) checks every answer of the running service against this schema.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel

FIELD = "files"  # the multipart field /predict reads its scans from


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
    cancer_probability: float
    confidence: float
    threshold: float
    model: ModelRef
    input_png: str  # data:image/png;base64 URL of what the model saw
    gradcam_png: str | None  # the Grad-CAM overlay, when asked for and the format allows it


class PredictResponse(BaseModel):
    results: list[PredictionResult]


RETRY_AFTER = {"Retry-After": {"description": "seconds to wait before retrying when the server is busy",
                               "schema": {"type": "integer"}}}
UNAVAILABLE = {503: {"model": Problem, "headers": RETRY_AFTER,
                     "description": "no model is loaded (the detail says how to make one), or every prediction "
                                    "slot stayed busy for serve.queue_timeout_s (Retry-After says when to retry)"}}
NOT_READY = {503: {"model": Problem, "description": "no model is loaded (the detail says how to make one)"}}
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
