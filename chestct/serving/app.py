"""The chestct service: a web page and a JSON API over one exported model.

    uvicorn chestct.serving.app:app          (or `chestct serve`)

The model is loaded once, when the service starts, from $CHESTCT_EXPORT_DIR or models/export (format order from
$CHESTCT_FORMATS). Without a usable model the service still starts: the page explains, /health says so and
the model endpoints answer 503 with how to produce one. Bad uploads get a 4xx JSON `{"detail": ...}` naming the
file and the problem; they never reach the model.
"""

from __future__ import annotations

import base64
import io
import logging
from contextlib import asynccontextmanager
from pathlib import Path

import numpy as np
from fastapi import FastAPI, HTTPException, Query, Request
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles
from PIL import Image
from starlette.concurrency import run_in_threadpool

from chestct.imaging.errors import (
    CorruptImageError,
    EmptyImageError,
    ImageDecodeError,
    ImageTooLargeError,
    UnsupportedImageError,
)
from chestct.serving.predictor import ModelUnavailableError, Prediction, Predictor
from chestct.serving.uploads import UploadError, read_uploads

log = logging.getLogger("chestct.serving.app")
STATIC = Path(__file__).parent / "static"

# Which 4xx each kind of unreadable image gets.
DECODE_STATUS = {EmptyImageError: 400, UnsupportedImageError: 415, CorruptImageError: 422, ImageTooLargeError: 413}


def _decode_status(error: ImageDecodeError) -> int:
    return next((status for kind, status in DECODE_STATUS.items() if isinstance(error, kind)), 400)


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


def _predict_results(predictor: Predictor, files: list[tuple[str, bytes]], gradcam: bool) -> list[dict]:
    return [_result(prediction) for prediction in predictor.predict(files, gradcam)]


def create_app(export_dir: str | Path | None = None, formats: tuple[str, ...] | None = None) -> FastAPI:
    """The service; the model is loaded when it starts (the lifespan), not at import."""

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        try:
            app.state.predictor = await run_in_threadpool(Predictor, export_dir, formats)
            app.state.unavailable = None
            log.info("chestct: serving %s (%s)", app.state.predictor.format, app.state.predictor.export_dir)
        except ModelUnavailableError as exc:
            app.state.predictor, app.state.unavailable = None, str(exc)
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

    @app.get("/model-info", summary="The loaded model: format, sha256, threshold, preprocessing, metrics")
    def model_info(request: Request) -> dict:
        return predictor_or_503(request).info()

    @app.post("/predict", summary="Diagnose one or more scans (PNG, JPEG or DICOM) sent in the field 'files'")
    async def predict(request: Request, gradcam: bool = Query(False, description="add a Grad-CAM overlay PNG")):
        predictor = predictor_or_503(request)
        try:
            files = await read_uploads(request, predictor.serve_params)
            # Model work and PNG encoding run in a worker thread: the event loop keeps answering /health.
            results = await run_in_threadpool(_predict_results, predictor, files, gradcam)
        except UploadError as exc:
            raise HTTPException(exc.status_code, exc.detail) from None
        except ImageDecodeError as exc:
            raise HTTPException(_decode_status(exc), str(exc)) from None
        return {"results": results}

    return app


app = create_app()
