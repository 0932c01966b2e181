"""The chestct service: a web page and a JSON API over one exported model.

    uvicorn chestct.serving.app:app          (or `chestct serve`, which also sets uvicorn's connection limits)

The model is loaded once, when the service starts, from $CHESTCT_EXPORT_DIR or models/export (format order from
$CHESTCT_FORMATS). Without a usable model the service still starts: the page explains, /health says so and
the model endpoints answer 503 with how to produce one. Bad uploads get a 4xx JSON `{"detail": ...}` naming the
file and the problem; they never reach the model.

Limits (the export's serve params): decoding and prediction run in at most serve.max_concurrent requests at once,
each decoding its images one at a time, so memory stays bounded whatever arrives; a request waits up to
serve.queue_timeout_s for a slot, then gets 503 with Retry-After (limits.py). Bodies are bounded in size and time
(uploads.py). The answers' shapes are declared in schema.py. No answer names a server path: the export folder
appears by its relative or own name, the full path is logged.

POST /predict/series takes one zip of a DICOM series folder (series_upload.py unpacks it safely into a temporary
folder, removed after the answer): its slices are grouped by SeriesInstanceUID, ordered along z and scored one by
one (chestct.external.series, series_scoring), and each series gets its score, the rule that made it and its
z-profile, under the same prediction slots as /predict. Files are named by their names inside the zip.

The same model also answers the open inference protocol under /v2 (v2.py), and /metrics gives Prometheus metrics
of this app (observability.py). /health/live and /health/ready are the probes; /health stays for the page.
"""

from __future__ import annotations

import base64
import io
import logging
import os
import tempfile
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
from fastapi import FastAPI, HTTPException, Query, Request
from fastapi.responses import FileResponse, Response
from fastapi.staticfiles import StaticFiles
from PIL import Image
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect

from chestct.imaging.errors import (
    CorruptImageError,
    EmptyImageError,
    ImageDecodeError,
    ImageTooLargeError,
    OutOfDomainError,
    UnsupportedImageError,
)
from chestct.imaging.files import upload_limit_bytes
from chestct.labels import CLASS_NAMES
from chestct.serving.limits import PredictionSlots, ServerBusyError
from chestct.serving.observability import ServiceMetrics, error_reason, upload_rejection_reason
from chestct.serving.predictor import ModelUnavailableError, Prediction, Predictor, public_path, resolve_export_dir
from chestct.serving.schema import (
    NOT_READY,
    PREDICT_ERRORS,
    SERIES_ERRORS,
    SERIES_UPLOAD_BODY,
    UNAVAILABLE,
    UPLOAD_BODY,
    PredictResponse,
    SeriesResponse,
)
from chestct.serving.series_upload import ZipRefusedError, extract_zip
from chestct.serving.uploads import UploadError, read_files, received_uploads, series_form
from chestct.serving.v2 import router as v2_router

log = logging.getLogger("chestct.serving.app")
STATIC = Path(__file__).parent / "static"

SERIES_BATCH = 16  # slices of a zipped series scored per model call (bounds the memory of one request)
NOT_DICOM_SHOWN = 3  # files named in the answer to a zip without any DICOM slice

# Which 4xx each kind of unreadable image gets.
DECODE_STATUS = {EmptyImageError: 400, UnsupportedImageError: 415, CorruptImageError: 422, ImageTooLargeError: 413,
                 OutOfDomainError: 422}


def _decode_status(error: ImageDecodeError) -> int:
    return next((status for kind, status in DECODE_STATUS.items() if isinstance(error, kind)), 400)


# --- answers --------------------------------------------------------------------------------------------------


def png_bytes_data_url(data: bytes) -> str:
    """PNG bytes as a data:image/png URL for the page."""
    return "data:image/png;base64," + base64.b64encode(data).decode("ascii")


def png_data_url(array: np.ndarray) -> str:
    """A uint8 (S, S), (S, S, 1) or (S, S, 3) array as a data:image/png URL for the page."""
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return png_bytes_data_url(buffer.getvalue())


def _result(prediction: Prediction) -> dict:
    # Grad-CAM's overlay lives with Grad-CAM, which imports TensorFlow: only needed when a heatmap was made.
    from chestct.evaluation.gradcam import overlay

    result = prediction.to_dict() | {"input_png": png_data_url(prediction.model_input), "gradcam_png": None,
                                     "lesion_map_png": None}
    if prediction.heatmap is not None:
        result["gradcam_png"] = png_data_url(overlay(prediction.model_input, prediction.heatmap))
    if prediction.lesion_map is not None:
        # The map's own probabilities, not rescaled to its maximum: a Normal slice's map stays dark.
        result["lesion_map_png"] = png_data_url(overlay(prediction.model_input, prediction.lesion_map))
    return result


def _predict_results(predictor: Predictor, uploads: list[tuple[str, BinaryIO]], gradcam: bool) -> list[dict]:
    return [_result(prediction) for prediction in predictor.predict(read_files(uploads), gradcam)]


def without_server_paths(value: Any, export_dir: Path, also: dict[str, str] | None = None) -> Any:
    """`value` (a message, or lists and dicts of them) with the export folder's absolute path replaced by its
    public name and the working directory's dropped, so an answer names `models/export/...`, not the server's
    layout; `also`: more server paths and what to show instead."""
    if isinstance(value, dict):
        return {key: without_server_paths(item, export_dir, also) for key, item in value.items()}
    if isinstance(value, list):
        return [without_server_paths(item, export_dir, also) for item in value]
    if not isinstance(value, str):
        return value
    public = public_path(export_dir)
    replacements = {str(export_dir.resolve()): public, str(export_dir.absolute()): public,
                    str(Path.cwd().resolve()) + os.sep: "", str(Path.cwd().absolute()) + os.sep: ""} | (also or {})
    for server_path in sorted(replacements, key=len, reverse=True):  # the longest first: the folder, then cwd
        value = value.replace(server_path, replacements[server_path])
    return value


def _no_dicom_message(upload: str, not_dicom: list[dict]) -> str:
    if not not_dicom:
        return (f"{upload}: no DICOM slice found in the zip (it holds no file besides folders and dotfiles); zip "
                f"the folder that holds the series' .dcm slices")
    shown = "; ".join(f"{item['file']}: {item['reason']}" for item in not_dicom[:NOT_DICOM_SHOWN])
    more = f"; and {len(not_dicom) - NOT_DICOM_SHOWN} more" if len(not_dicom) > NOT_DICOM_SHOWN else ""
    return (f"{upload}: no DICOM slice found in the zip ({len(not_dicom)} file(s), none a DICOM slice: "
            f"{shown}{more}); zip the folder that holds the series' .dcm slices")


def _series_answer(predictor: Predictor, upload: str, file: BinaryIO) -> dict:
    """The answer of /predict/series for one uploaded zip (blocking: call it from a worker thread, in a slot)."""
    # Series grouping, scoring (the lung-field anatomy) and the z-profile (matplotlib): loaded when a series
    # arrives, not when the service starts.
    from chestct.external.series import list_series
    from chestct.external.series_plots import z_profile_png_bytes
    from chestct.external.series_scoring import SERIES_RULE, score_series

    serve = predictor.serve_params
    with tempfile.TemporaryDirectory(prefix="chestct-series-") as temp:
        folder = Path(temp)
        extracted = extract_zip(upload, file, folder, serve)
        listing = list_series(extracted.files, folder, upload_limit_bytes(serve.max_upload_mb),
                              names=extracted.names)
        shown = dict(zip(extracted.files, extracted.names, strict=True))
        not_dicom = [{"file": shown.get(path, path.name), "reason": reason} for path, reason in listing.not_dicom]
        if not listing.series:
            raise ZipRefusedError(400, _no_dicom_message(upload, not_dicom), reason="no_dicom_slice")
        series = []
        for result in score_series(predictor, listing.series, batch_size=SERIES_BATCH, progress=False):
            top_png = None
            if result.top is not None:  # what the model saw of the slice that gave the score
                top = result.top.header
                top_png = png_data_url(predictor.prepare_decoded(predictor.decode(top.path, top.relative)))
            z_profile = z_profile_png_bytes([result], predictor.threshold)
            series.append(result.to_dict(predictor.threshold)
                          | {"z_profile_png": png_bytes_data_url(z_profile), "top_slice_png": top_png})
    answer = {"series": series, "not_dicom": not_dicom, "rule": SERIES_RULE,
              "model": {"format": predictor.format, "sha256": predictor.sha256}}
    # Messages name files by their names in the zip; should one name the temporary folder, it shows the upload.
    temporary = {str(folder.resolve()): upload, str(folder.absolute()): upload}
    return without_server_paths(answer, predictor.export_dir, temporary)


def dropped(request: Request, what: str) -> Response:
    """A client that went away before `what` was complete: logged; the answer is never sent."""
    client = request.client.host if request.client else "a client"
    log.info("chestct: %s disconnected before %s was complete; request dropped", client, what)
    return Response(status_code=400)  # never sent: the connection is gone


def refusal(request: Request, exc: UploadError | ServerBusyError) -> HTTPException:
    """The HTTP answer to a refused upload (its status) or a full set of prediction slots (503), counted."""
    metrics: ServiceMetrics = request.app.state.metrics
    if isinstance(exc, ServerBusyError):
        log.warning("chestct: %s", exc)
        metrics.count_rejection(request, 503, "busy")
        return HTTPException(503, str(exc), headers={"Retry-After": str(exc.retry_after_s)})
    reason = exc.reason if isinstance(exc, ZipRefusedError) else upload_rejection_reason(exc.status_code)
    metrics.count_rejection(request, exc.status_code, reason)
    return HTTPException(exc.status_code, exc.detail, headers=exc.headers or None)


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
            app.state.metrics.model_loaded(app.state.predictor)
            log.info("chestct: serving %s (%s)", app.state.predictor.format, folder.resolve())
        except ModelUnavailableError as exc:
            # The log has the full message; answers get it without server paths.
            app.state.predictor, app.state.unavailable = None, without_server_paths(str(exc), folder)
            app.state.metrics.no_model()
            log.warning("chestct: starting without a model: %s", exc)
        yield

    app = FastAPI(title="chestct", version="0.1.0", lifespan=lifespan,
                  description="Chest CT Normal vs Cancer classifier (research use only, not for diagnosis).")
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    # Per-app metrics (/metrics, observability.py) and the open inference protocol's routes (/v2, v2.py).
    app.state.metrics = ServiceMetrics()
    app.state.metrics.instrument(app)
    app.state.draining = False  # set on SIGTERM by chestct.serving.shutdown
    app.include_router(v2_router)

    def predictor_or_503(request: Request) -> Predictor:
        predictor = request.app.state.predictor
        if predictor is None:
            raise HTTPException(503, request.app.state.unavailable)
        return predictor

    def counted_predictor_or_503(request: Request) -> Predictor:
        """predictor_or_503 for the prediction routes, which count a request refused for want of a model."""
        if request.app.state.predictor is None:
            request.app.state.metrics.count_rejection(request, 503, "no_model")
        return predictor_or_503(request)

    @app.get("/", include_in_schema=False)
    def page() -> FileResponse:
        return FileResponse(STATIC / "index.html")

    @app.get("/health", summary="Is the service up, and is a model loaded?")
    def health(request: Request) -> dict:
        predictor = request.app.state.predictor
        if predictor is None:
            return {"status": "no_model", "model_loaded": False, "detail": request.app.state.unavailable}
        return {"status": "ok", "model_loaded": True, "format": predictor.format}

    @app.get("/health/live", summary="Liveness: 200 while the process answers (model or not)")
    def health_live() -> dict:
        return {"status": "live"}

    @app.get("/health/ready", summary="Readiness: 200 once a model is loaded, else 503 saying how to make one",
             responses=NOT_READY)
    def health_ready(request: Request) -> dict:
        if request.app.state.draining:  # a stopping signal arrived (chestct.serving.shutdown): drain this instance
            raise HTTPException(503, "shutting down: finishing the requests in flight, taking no new ones")
        predictor = predictor_or_503(request)
        return {"status": "ready", "format": predictor.format}

    @app.get("/model-info", summary="The loaded model: format, sha256, threshold, preprocessing, metrics",
             responses=UNAVAILABLE)
    def model_info(request: Request) -> dict:
        predictor = predictor_or_503(request)
        return without_server_paths(predictor.info(), predictor.export_dir)

    @app.post("/predict", summary="Diagnose one or more scans (PNG, JPEG or DICOM) sent in the field 'files'",
              response_model=PredictResponse, responses=PREDICT_ERRORS, openapi_extra=UPLOAD_BODY)
    async def predict(request: Request, gradcam: bool = Query(False, description="add a Grad-CAM overlay PNG")):
        metrics: ServiceMetrics = request.app.state.metrics
        predictor = counted_predictor_or_503(request)
        try:
            # Reading the files, decoding them (one after another) and the model run in a worker thread, so the
            # event loop keeps answering /health, and inside a slot, so memory stays bounded however many requests
            # arrive (a request waiting for a slot keeps its files in starlette's spooled temporary files).
            async with received_uploads(request, predictor.serve_params) as uploads, request.app.state.slots.hold():
                results = await run_in_threadpool(_predict_results, predictor, uploads, gradcam)
        except ClientDisconnect:
            return dropped(request, "its upload")
        except (UploadError, ServerBusyError) as exc:
            raise refusal(request, exc) from None
        except ImageDecodeError as exc:
            metrics.count_rejection(request, _decode_status(exc), error_reason(exc))
            raise HTTPException(_decode_status(exc), str(exc)) from None
        metrics.count_diagnoses("native", (result["diagnosis"] for result in results))
        return {"results": results}

    @app.post("/predict/series", summary="Score every DICOM series in one zip (field 'file'), slice by slice, with "
                                         "a z-profile per series", response_model=SeriesResponse,
              responses=SERIES_ERRORS, openapi_extra=SERIES_UPLOAD_BODY)
    async def predict_series(request: Request):
        metrics: ServiceMetrics = request.app.state.metrics
        predictor = counted_predictor_or_503(request)
        serve = predictor.serve_params
        try:
            # As /predict: the zip waits for a slot in starlette's spooled file; unpacking and scoring run in a
            # worker thread inside the slot.
            async with received_uploads(request, serve, series_form(serve)) as uploads, request.app.state.slots.hold():
                name, file = uploads[0]
                answer = await run_in_threadpool(_series_answer, predictor, name, file)
        except ClientDisconnect:
            return dropped(request, "its zip")
        except (UploadError, ServerBusyError) as exc:
            raise refusal(request, exc) from None
        metrics.count_diagnoses("series", (CLASS_NAMES[slice_["decision"]] for item in answer["series"]
                                           for slice_ in item["per_slice"] if slice_["decision"] is not None))
        return answer

    return app


app = create_app()
