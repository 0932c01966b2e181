"""Prometheus metrics of one service instance, served at /metrics in the text exposition format.

Every app has its own CollectorRegistry (tests create many apps in one process; the global registry would refuse
the second app's metrics as duplicates). prometheus-fastapi-instrumentator's middleware counts and times every
request by route template, method and exact status; the service adds what only it knows: predictions by
diagnosis, inputs it refused and why, and which model it serves.

    http_requests_total{handler, method, status}             every answer (route templates, so labels stay few)
    http_request_duration_seconds{handler, method, status}   latency histogram
    chestct_predictions_total{api, diagnosis}                one per image the model scored (api: native, v2,
                                                             series: each slice of a zipped series)
    chestct_rejected_inputs_total{route, status, reason}     requests refused before or instead of predicting
    chestct_model_info{format, sha256, version}              the loaded model (absent while none is)
    chestct_model_loaded                                     1 with a model, 0 without
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import TYPE_CHECKING

from fastapi import FastAPI, Request, Response
from prometheus_client import CollectorRegistry, Counter, Gauge
from prometheus_client.exposition import choose_encoder
from prometheus_fastapi_instrumentator import Instrumentator
from prometheus_fastapi_instrumentator import metrics as http_metrics

from chestct.decision import decide
from chestct.labels import CLASS_NAMES

if TYPE_CHECKING:
    from chestct.serving.predictor import Predictor

METRICS_PATH = "/metrics"
# Request latencies from a health check (ms) to a batch of DICOMs waiting for a prediction slot (tens of s).
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
# /metrics as the OpenAPI schema declares it: Prometheus' text format, or OpenMetrics when the scraper asks.
METRICS_RESPONSES = {200: {"description": "the service's metrics (Prometheus text exposition format)",
                           "content": {"text/plain": {"schema": {"type": "string"}},
                                       "application/openmetrics-text": {"schema": {"type": "string"}}}}}
# Why an upload was refused, by the status uploads.py gave it (UploadError carries no other kind).
UPLOAD_REJECTION_REASONS = {400: "bad_multipart", 408: "body_timeout", 413: "upload_too_large",
                            415: "not_multipart"}


def model_version(predictor: Predictor) -> str:
    """The version the service reports for its model: the registry version the export was made from
    (`v1.2.0`, metadata.json's source since schema 2.2), else the first 12 hex digits of the loaded artifact's
    sha256, so two exports of different weights never share a version."""
    return predictor.metadata.source.artifact_version or predictor.sha256[:12]


def error_reason(error: Exception) -> str:
    """A metric label for an exception kind: CorruptImageError -> 'corrupt_image' (a bounded set of labels)."""
    name = type(error).__name__.removesuffix("Error")
    return re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower()


def upload_rejection_reason(status_code: int) -> str:
    return UPLOAD_REJECTION_REASONS.get(status_code, f"upload_{status_code}")


class ServiceMetrics:
    """The metrics of one app and the calls that move them."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.predictions = Counter("chestct_predictions", "Images scored by the model, by decided diagnosis",
                                   ["api", "diagnosis"], registry=self.registry)
        self.rejections = Counter("chestct_rejected_inputs", "Requests refused instead of predicting, by reason",
                                  ["route", "status", "reason"], registry=self.registry)
        # An info metric the Prometheus way: a gauge at 1 whose labels carry the facts. (prometheus_client's Info
        # would show an empty chestct_model_info before any model is loaded; this has no series then.)
        self.model = Gauge("chestct_model_info", "The model this service serves (1; its labels say which)",
                           ["format", "sha256", "version"], registry=self.registry)
        self.loaded = Gauge("chestct_model_loaded", "1 when a model is loaded, 0 when the service runs without",
                            registry=self.registry)
        for diagnosis in CLASS_NAMES:  # both series exist from the start, so rate() works before the first case
            for api in ("native", "v2", "series"):
                self.predictions.labels(api=api, diagnosis=diagnosis)

    # --- what the service calls ---------------------------------------------------------------------------

    def model_loaded(self, predictor: Predictor) -> None:
        self.model.clear()
        self.model.labels(format=predictor.format, sha256=predictor.sha256, version=model_version(predictor)).set(1)
        self.loaded.set(1)

    def no_model(self) -> None:
        self.model.clear()
        self.loaded.set(0)

    def count_diagnoses(self, api: str, diagnoses: Iterable[str]) -> None:
        for diagnosis in diagnoses:
            self.predictions.labels(api=api, diagnosis=diagnosis).inc()

    def count_probabilities(self, api: str, probabilities: Iterable[float], threshold: float) -> None:
        """Count raw probabilities by the diagnosis the service's own decision rule gives them."""
        self.count_diagnoses(api, (CLASS_NAMES[decision] for decision in decide(list(probabilities), threshold)))

    def count_rejection(self, request: Request, status: int, reason: str) -> None:
        """Count a refused request under its route template (`/v2/models/{model_name}/infer`), not its URL, so
        arbitrary paths cannot multiply the series."""
        route = request.scope.get("route")
        self.rejections.labels(route=getattr(route, "path", "none"), status=str(status), reason=reason).inc()

    # --- wiring -------------------------------------------------------------------------------------------

    def instrument(self, app: FastAPI) -> None:
        """Time and count every request (the middleware) and serve /metrics. Call before the app starts."""
        instrumentator = Instrumentator(should_group_status_codes=False, excluded_handlers=[f"^{METRICS_PATH}$"],
                                        registry=self.registry)
        instrumentator.add(
            http_metrics.requests(registry=self.registry),
            http_metrics.latency(registry=self.registry, buckets=LATENCY_BUCKETS),
        ).instrument(app)

        @app.get(METRICS_PATH, summary="Prometheus metrics: requests, latency, predictions, refusals, the model",
                 response_class=Response, responses=METRICS_RESPONSES)
        def metrics(request: Request) -> Response:
            encoder, content_type = choose_encoder(request.headers.get("accept", ""))
            return Response(encoder(self.registry), media_type=content_type)
