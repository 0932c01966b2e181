"""/metrics: scraped before and after a few requests (a diagnosis, a refused upload, a v2 infer), the counters move
by exactly what was sent, in the Prometheus text format (read back with prometheus_client's own parser)."""

from __future__ import annotations

import json
from contextlib import asynccontextmanager
from types import SimpleNamespace

import numpy as np
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from chestct.serving.app import create_app
from chestct.serving.limits import ServerBusyError
from chestct.serving.observability import model_version
from tests.serving_support import phantom_images, png_bytes

INFER_ROUTE = "/v2/models/{model_name}/infer"


def scrape(client) -> dict[tuple[str, tuple], float]:
    """Every sample of /metrics: (name, sorted labels) -> value."""
    answer = client.get("/metrics")
    assert answer.status_code == 200 and answer.headers["content-type"].startswith("text/plain")
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(answer.text) for sample in family.samples}


def value(samples: dict, name: str, **labels) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def moved(before: dict, after: dict, name: str, **labels) -> float:
    return value(after, name, **labels) - value(before, name, **labels)


def v2_infer_body(image: np.ndarray) -> dict:
    return {"inputs": [{"name": "image", "datatype": "UINT8", "shape": [1, *image.shape],
                        "data": image.ravel().tolist()}]}


def test_counters_move_with_predictions_refusals_and_v2_inference(client):
    predictor = client.app.state.predictor
    gray = phantom_images(count=1)[0][1]
    before = scrape(client)

    diagnosed = client.post("/predict", files=[("files", ("scan.png", png_bytes(gray), "image/png"))])
    refused = client.post("/predict", files=[("files", ("empty.png", b"", "image/png"))])
    image = predictor.prepare(png_bytes(gray))
    inferred = client.post("/v2/models/chestct/infer", content=json.dumps(v2_infer_body(image)))
    assert (diagnosed.status_code, refused.status_code, inferred.status_code) == (200, 400, 200)
    after = scrape(client)

    requests = "http_requests_total"
    assert moved(before, after, requests, handler="/predict", method="POST", status="200") == 1
    assert moved(before, after, requests, handler="/predict", method="POST", status="400") == 1
    assert moved(before, after, requests, handler=INFER_ROUTE, method="POST", status="200") == 1
    latency = "http_request_duration_seconds"
    assert moved(before, after, f"{latency}_count", handler=INFER_ROUTE, method="POST", status="200") == 1
    assert moved(before, after, f"{latency}_sum", handler="/predict", method="POST", status="200") > 0
    assert moved(before, after, f"{latency}_bucket", handler="/predict", method="POST", status="400", le="+Inf") == 1

    diagnosis = diagnosed.json()["results"][0]["diagnosis"]
    assert moved(before, after, "chestct_predictions_total", api="native", diagnosis=diagnosis) == 1
    v2_diagnosis = "Cancer" if inferred.json()["outputs"][0]["data"][0] >= predictor.threshold else "Normal"
    assert moved(before, after, "chestct_predictions_total", api="v2", diagnosis=v2_diagnosis) == 1
    assert sum(moved(before, after, "chestct_predictions_total", api=api, diagnosis=name)
               for api in ("native", "v2") for name in ("Normal", "Cancer")) == 2
    assert moved(before, after, "chestct_rejected_inputs_total", route="/predict", status="400",
                 reason="empty_image") == 1


def test_refused_v2_requests_are_counted_by_reason(client):
    before = scrape(client)
    body = v2_infer_body(np.zeros((64, 64, 1), np.uint8))
    body["inputs"][0]["datatype"] = "FP32"
    assert client.post("/v2/models/chestct/infer", json=body).status_code == 400
    assert client.post("/v2/models/chestct/infer", content=b"{").status_code == 400
    after = scrape(client)
    for reason in ("wrong_datatype", "bad_json"):
        assert moved(before, after, "chestct_rejected_inputs_total", route=INFER_ROUTE, status="400",
                     reason=reason) == 1


def test_the_model_is_an_info_metric_and_scrapes_are_not_counted(client, tiny_export):
    samples = scrape(client)
    sha256 = json.loads((tiny_export / "metadata.json").read_text())["artifacts"]["keras"]["sha256"]
    assert value(samples, "chestct_model_info", format="keras", sha256=sha256, version=sha256[:12]) == 1
    assert value(samples, "chestct_model_loaded") == 1
    assert not any(labels and dict(labels).get("handler") == "/metrics" for _, labels in scrape(client))


def test_without_a_model_the_gauge_says_so_and_each_app_counts_alone(tmp_path, client):
    with TestClient(create_app(tmp_path / "no-export")) as empty:
        assert empty.post("/predict", files=[("files", ("a.png", b"x", "image/png"))]).status_code == 503
        samples = scrape(empty)
    assert value(samples, "chestct_model_loaded") == 0
    assert not any(name == "chestct_model_info" for name, _ in samples)
    assert value(samples, "chestct_rejected_inputs_total", route="/predict", status="503", reason="no_model") == 1
    # The other app's requests are not in this app's registry.
    assert value(samples, "http_requests_total", handler="/predict", method="POST", status="200") == 0


class TakenSlots:
    """Prediction slots that all stay taken: every request waits its wait_s in vain."""

    count, wait_s = 2, 3.0

    @asynccontextmanager
    async def hold(self):
        raise ServerBusyError(self)
        yield


def test_v2_inference_waits_for_a_prediction_slot_like_predict(client, monkeypatch):
    monkeypatch.setattr(client.app.state, "slots", TakenSlots())
    before = scrape(client)
    answer = client.post("/v2/models/chestct/infer", json=v2_infer_body(np.zeros((64, 64, 1), np.uint8)))
    assert answer.status_code == 503 and answer.headers["retry-after"] == "3"
    assert "prediction slots (serve.max_concurrent)" in answer.json()["error"]
    assert moved(before, scrape(client), "chestct_rejected_inputs_total", route=INFER_ROUTE, status="503",
                 reason="busy") == 1


def test_the_model_version_is_the_registry_version_when_the_export_records_one(client):
    predictor = client.app.state.predictor
    assert predictor.metadata.source.artifact_version is None  # the tests' export was not registered
    assert model_version(predictor) == predictor.sha256[:12]
    registered = predictor.metadata.model_copy(update={"source": predictor.metadata.source.model_copy(
        update={"artifact_version": "v1.2.0"})})
    assert model_version(SimpleNamespace(metadata=registered, sha256=predictor.sha256)) == "v1.2.0"
