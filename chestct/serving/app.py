"""The chestct service: a web page and a JSON API over one exported model.

    uvicorn chestct.serving.app:app          (or `chestct serve`, which also sets uvicorn's connection limits)

The model is loaded once, when the service starts, from $CHESTCT_EXPORT_DIR or models/export (format order from
$CHESTCT_FORMATS). Without a usable model the service still starts: the page explains, /health says so and
the model endpoints answer 503 with how to produce one. Bad uploads get a 4xx JSON `{"detail": ...}` naming the
file and the problem; they never reach the model.

Limits (the export's serve params): decoding and prediction run in at most serve.max_concurrent requests at once,
each decoding its images one at a time, so memory stays bounded whatever arrives; a request waits up to
serve.queue_timeout_s for a slot, then gets 503 with Retry-After. Bodies are bounded in size and time (uploads.py).
No answer names a server path: the export folder appears by its relative or own name, the full path is logged.
"""

from __future__ import annotations

import base64
import io
import logging
import math
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, BinaryIO, Literal

import anyio
import numpy as np
from fastapi import FastAPI, HTTPException, Query, Request
from fastapi.responses import FileResponse, Response
from fastapi.staticfiles import StaticFiles
from PIL import Image
from pydantic import BaseModel
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect

from chestct.export.metadata import SERVE_DEFAULTS
from chestct.imaging.errors import (
    CorruptImageError,
    EmptyImageError,
    ImageDecodeError,
    ImageTooLargeError,
    UnsupportedImageError,
)
from chestct.serving.predictor import (
    ModelUnavailableError,
    Prediction,
    Predictor,
    load_export_metadata,
    public_path,
    resolve_export_dir,
)
from chestct.serving.uploads import FIELD, UploadError, read_files, received_uploads

log = logging.getLogger("chestct.serving.app")
STATIC = Path(__file__).parent / "static"
KEEP_ALIVE_S = 5  # an idle keep-alive connection is closed after this long (uvicorn's default, set explicitly)

# Which 4xx each kind of unreadable image gets.
DECODE_STATUS = {EmptyImageError: 400, UnsupportedImageError: 415, CorruptImageError: 422, ImageTooLargeError: 413}


def _decode_status(error: ImageDecodeError) -> int:
    return next((status for kind, status in DECODE_STATUS.items() if isinstance(error, kind)), 400)


# --- the API's schema: what /openapi.json promises (schemathesis checks the answers against it) --------------


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


# --- answers --------------------------------------------------------------------------------------------------


def png_data_url(array: np.ndarray) -> str:
    """A uint8 (S, S), (S, S, 1) or (S, S, 3) array as a data:image/png URL for the page."""
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _result(prediction: Prediction) -> dict:
    # Grad-CAM's overlay lives with Grad-CAM, which imports TensorFlow: only needed when a heatmap was made.
    from chestct.evaluation.gradcam import overlay

    result = prediction.to_dict() | {"input_png": png_data_url(prediction.model_input), "gradcam_png": None}
    if prediction.heatmap is not None:
        result["gradcam_png"] = png_data_url(overlay(prediction.model_input, prediction.heatmap))
    return result


def _predict_results(predictor: Predictor, uploads: list[tuple[str, BinaryIO]], gradcam: bool) -> list[dict]:
    return [_result(prediction) for prediction in predictor.predict(read_files(uploads), gradcam)]


def without_server_paths(value: Any, export_dir: Path) -> Any:
    """`value` (a message, or lists and dicts of them) with the export folder's absolute path replaced by its
    public name and the working directory's dropped, so an answer names `models/export/...`, not the server's
    layout."""
    if isinstance(value, dict):
        return {key: without_server_paths(item, export_dir) for key, item in value.items()}
    if isinstance(value, list):
        return [without_server_paths(item, export_dir) for item in value]
    if not isinstance(value, str):
        return value
    public = public_path(export_dir)
    replacements = {str(export_dir.resolve()): public, str(export_dir.absolute()): public,
                    str(Path.cwd().resolve()) + os.sep: "", str(Path.cwd().absolute()) + os.sep: ""}
    for server_path in sorted(replacements, key=len, reverse=True):  # the longest first: the folder, then cwd
        value = value.replace(server_path, replacements[server_path])
    return value


# --- limits ---------------------------------------------------------------------------------------------------


class ServerBusyError(Exception):
    def __init__(self, slots: PredictionSlots):
        self.retry_after_s = max(1, math.ceil(slots.wait_s))
        super().__init__(
            f"the server is busy: all {slots.count} prediction slots (serve.max_concurrent) stayed taken for "
            f"{slots.wait_s:g} s (serve.queue_timeout_s); retry after {self.retry_after_s} s")


class PredictionSlots:
    """At most `count` requests decode and predict at once; another waits up to `wait_s` for a slot, first come
    first served, then ServerBusyError."""

    def __init__(self, count: int, wait_s: float):
        self.count, self.wait_s = count, wait_s
        self._semaphore = anyio.Semaphore(count)

    async def _acquired(self) -> bool:
        try:
            self._semaphore.acquire_nowait()  # a free slot is taken even when wait_s is 0
            return True
        except anyio.WouldBlock:
            pass
        with anyio.move_on_after(self.wait_s):
            await self._semaphore.acquire()
            return True
        return False

    @asynccontextmanager
    async def hold(self) -> AsyncIterator[None]:
        if not await self._acquired():
            raise ServerBusyError(self)
        try:
            yield
        finally:
            self._semaphore.release()


def uvicorn_limits(export_dir: str | Path | None = None) -> dict:
    """uvicorn's connection options from the export's serve params (what `chestct serve` passes): at most
    serve.max_connections open connections (uvicorn answers 503 beyond), idle keep-alive closed after
    KEEP_ALIVE_S. Without a readable export the service only answers 503s: the defaults then apply."""
    try:
        max_connections = load_export_metadata(resolve_export_dir(export_dir)).serve.max_connections
    except ModelUnavailableError:
        max_connections = SERVE_DEFAULTS["max_connections"]
    return {"limit_concurrency": max_connections, "timeout_keep_alive": KEEP_ALIVE_S}


# --- the app --------------------------------------------------------------------------------------------------


def create_app(export_dir: str | Path | None = None, formats: tuple[str, ...] | None = None) -> FastAPI:
    """The service; the model is loaded when it starts (the lifespan), not at import."""

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        folder = resolve_export_dir(export_dir)
        try:
            app.state.predictor = await run_in_threadpool(Predictor, export_dir, formats)
            app.state.unavailable = None
            serve = app.state.predictor.serve_params
            app.state.slots = PredictionSlots(serve.max_concurrent, serve.queue_timeout_s)
            log.info("chestct: serving %s (%s)", app.state.predictor.format, folder.resolve())
        except ModelUnavailableError as exc:
            # The log has the full message; answers get it without server paths.
            app.state.predictor, app.state.unavailable = None, without_server_paths(str(exc), folder)
            log.warning("chestct: starting without a model: %s", exc)
        yield

    app = FastAPI(title="chestct", version="0.1.0", lifespan=lifespan,
                  description="Chest CT Normal vs Cancer classifier (research use only, not for diagnosis).")
    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    def predictor_or_503(request: Request) -> Predictor:
        predictor = request.app.state.predictor
        if predictor is None:
            raise HTTPException(503, request.app.state.unavailable)
        return predictor

    @app.get("/", include_in_schema=False)
    def page() -> FileResponse:
        return FileResponse(STATIC / "index.html")

    @app.get("/health", summary="Is the service up, and is a model loaded?")
    def health(request: Request) -> dict:
        predictor = request.app.state.predictor
        if predictor is None:
            return {"status": "no_model", "model_loaded": False, "detail": request.app.state.unavailable}
        return {"status": "ok", "model_loaded": True, "format": predictor.format}

    @app.get("/model-info", summary="The loaded model: format, sha256, threshold, preprocessing, metrics",
             responses=UNAVAILABLE)
    def model_info(request: Request) -> dict:
        predictor = predictor_or_503(request)
        return without_server_paths(predictor.info(), predictor.export_dir)

    @app.post("/predict", summary="Diagnose one or more scans (PNG, JPEG or DICOM) sent in the field 'files'",
              response_model=PredictResponse, responses=PREDICT_ERRORS, openapi_extra=UPLOAD_BODY)
    async def predict(request: Request, gradcam: bool = Query(False, description="add a Grad-CAM overlay PNG")):
        predictor = predictor_or_503(request)
        try:
            # Reading the files, decoding them (one after another) and the model run in a worker thread, so the
            # event loop keeps answering /health, and inside a slot, so memory stays bounded however many requests
            # arrive (a request waiting for a slot keeps its files in starlette's spooled temporary files).
            async with received_uploads(request, predictor.serve_params) as uploads, request.app.state.slots.hold():
                results = await run_in_threadpool(_predict_results, predictor, uploads, gradcam)
        except ClientDisconnect:
            client = request.client.host if request.client else "a client"
            log.info("chestct: %s disconnected before its upload was complete; request dropped", client)
            return Response(status_code=400)  # never sent: the connection is gone
        except UploadError as exc:
            raise HTTPException(exc.status_code, exc.detail, headers=exc.headers or None) from None
        except ImageDecodeError as exc:
            raise HTTPException(_decode_status(exc), str(exc)) from None
        except ServerBusyError as exc:
            log.warning("chestct: %s", exc)
            raise HTTPException(503, str(exc), headers={"Retry-After": str(exc.retry_after_s)}) from None
        return {"results": results}

    return app


app = create_app()
