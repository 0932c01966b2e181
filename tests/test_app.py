"""The FastAPI service through TestClient: every endpoint, and a clear 4xx (never a 500) for every bad input."""

from __future__ import annotations

import base64
import io
import json
import os
import re
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from uvicorn.protocols.http.h11_impl import H11Protocol

from chestct.export.metadata import SERVE_DEFAULTS
from chestct.serving.app import create_app, without_server_paths
from chestct.serving.limits import PredictionSlots, uvicorn_limits
from chestct.serving.predictor import public_path
from tests.dicom_factory import make_ct_dicom, phantom_to_dicom
from tests.serving_support import phantom_images, png_bytes


def export_copy(export_dir: Path, target: Path, formats: tuple[str, ...] = ("keras",),
                serve_changes: dict | None = None, drop_serve_keys: tuple[str, ...] = (),
                schema_version: str | None = None) -> Path:
    """A new export folder with `export_dir`'s artifacts for `formats` and its domain file (symlinked) and its
    metadata edited:
    serve params changed or removed, another schema version."""
    metadata = json.loads((export_dir / "metadata.json").read_text())
    target.mkdir(parents=True)
    for name in formats:
        artifact = metadata["artifacts"][name]["file"]
        (target / artifact).symlink_to(export_dir / artifact)
    if metadata.get("domain"):  # the feature-distance domain check's fit travels with the artifacts
        (target / metadata["domain"]["file"]).symlink_to(export_dir / metadata["domain"]["file"])
    serve = metadata["serve"] | (serve_changes or {})
    metadata["serve"] = {key: value for key, value in serve.items() if key not in drop_serve_keys}
    metadata["schema_version"] = schema_version or metadata["schema_version"]
    (target / "metadata.json").write_text(json.dumps(metadata))
    return target


@pytest.fixture(scope="module")
def scan() -> bytes:
    return png_bytes(phantom_images(count=1)[0][1])


def decode_data_url(url: str) -> np.ndarray:
    assert url.startswith("data:image/png;base64,")
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))))


def post(client, files, **params):
    return client.post("/predict", files=[("files", item) for item in files], params=params)


def test_page_and_its_assets_are_served_without_a_cdn(client):
    page = client.get("/")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    assert 'id="file-input"' in page.text and "https://" not in page.text
    for asset in ("/static/app.js", "/static/style.css"):
        response = client.get(asset)
        assert response.status_code == 200 and "https://" not in response.text


def test_health_and_model_info(client, tiny_export):
    assert client.get("/health").json() == {"status": "ok", "model_loaded": True, "format": "keras"}
    info = client.get("/model-info").json()
    metadata = json.loads((tiny_export / "metadata.json").read_text())
    assert info["format"] == "keras" and info["sha256"] == metadata["artifacts"]["keras"]["sha256"]
    assert info["threshold"] == metadata["threshold"] and info["image_size"] == 64
    assert info["gradcam_available"] is True and info["limits"]["max_files"] == 16
    assert info["preprocess"] == metadata["preprocess"] and info["source"] == metadata["source"]


def test_openapi_documents_the_endpoints(client):
    paths = client.get("/openapi.json").json()["paths"]
    assert {"/predict", "/health", "/model-info"} <= set(paths)


def test_predict_one_scan(client, scan):
    response = post(client, [("scan.png", scan, "image/png")])
    assert response.status_code == 200
    (result,) = response.json()["results"]
    assert result["filename"] == "scan.png" and result["diagnosis"] in ("Normal", "Cancer")
    assert result["diagnosis"] == ("Cancer" if result["cancer_probability"] >= result["threshold"] else "Normal")
    # The calibrated probability against the threshold on its scale gives the same decision.
    calibrated = result["cancer_probability_calibrated"]
    assert result["diagnosis"] == ("Cancer" if calibrated >= result["threshold_calibrated"] else "Normal")
    assert calibrated != pytest.approx(result["cancer_probability"], abs=1e-3)
    assert result["calibration"].startswith("calibrated (platt")
    assert result["in_domain"] is True and result["domain_reason"] is None
    assert result["model"]["format"] == "keras" and len(result["model"]["sha256"]) == 64
    assert decode_data_url(result["input_png"]).shape == (64, 64)
    assert result["gradcam_png"] is None  # only when asked


def test_predict_with_gradcam_overlay(client, scan):
    (result,) = post(client, [("scan.png", scan, "image/png")], gradcam="true").json()["results"]
    overlay = decode_data_url(result["gradcam_png"])
    assert overlay.shape == (64, 64, 3) and overlay.dtype == np.uint8


def test_several_files_keep_their_order_and_the_type_comes_from_the_bytes(client):
    grays = [gray for _, gray in phantom_images(count=3)]
    files = [("a.png", png_bytes(grays[0]), "image/png"),
             ("b.jpg", png_bytes(grays[1]), "application/octet-stream"),  # a PNG with a .jpg name
             ("c.dcm", phantom_to_dicom(grays[2]), "application/dicom")]
    response = post(client, files)
    assert response.status_code == 200
    assert [r["filename"] for r in response.json()["results"]] == ["a.png", "b.jpg", "c.dcm"]


def test_dicom_and_png_of_the_same_slice_agree(client):
    gray = phantom_images(count=1)[0][1]
    results = post(client, [("slice.png", png_bytes(gray), "image/png"),
                            ("slice.dcm", phantom_to_dicom(gray), "application/dicom")]).json()["results"]
    assert results[0]["cancer_probability"] == pytest.approx(results[1]["cancer_probability"], abs=1e-6)


@pytest.mark.parametrize(("name", "data", "status", "message"), [
    ("empty.png", b"", 400, "empty.png: the file is empty"),
    ("notes.txt", b"patient notes, not an image", 415, "notes.txt: not a recognised image"),
    ("tiny.png", b"\x00", 415, "tiny.png: not a recognised image"),  # shorter than any format's signature
    ("cut.png", None, 422, "cut.png: cannot be decoded"),
    ("report.dcm", make_ct_dicom(np.zeros((4, 4)), with_pixels=False), 422, "report.dcm: .*no pixel data"),
])
def test_unreadable_uploads_get_a_4xx_naming_the_file(client, scan, name, data, status, message):
    data = scan[: len(scan) // 2] if data is None else data
    response = post(client, [(name, data, "application/octet-stream")])
    assert response.status_code == status
    assert re.search(message, response.json()["detail"])


def test_one_bad_file_fails_the_request_and_names_it(client, scan):
    response = post(client, [("good.png", scan, "image/png"), ("bad.png", b"\x89PNG garbage", "image/png")])
    assert response.status_code in (415, 422) and "bad.png" in response.json()["detail"]


def test_wrong_field_name(client, scan):
    response = client.post("/predict", files={"image": ("scan.png", scan, "image/png")})
    assert response.status_code == 400
    assert "no file in the multipart field 'files'" in response.json()["detail"]
    assert "image" in response.json()["detail"]


def test_not_multipart(client):
    response = client.post("/predict", json={"image": "base64..."})
    assert response.status_code == 415 and "multipart/form-data" in response.json()["detail"]


def test_too_many_files(client, scan, limits):
    limits(max_files=2)
    response = post(client, [(f"{i}.png", scan, "image/png") for i in range(3)])
    assert response.status_code == 413 and "more than 2 files" in response.json()["detail"]


def test_file_over_the_upload_limit(client, scan, limits):
    limits(max_upload_mb=len(scan) / 2e6)
    response = post(client, [("big.png", scan, "image/png")])
    assert response.status_code == 413
    assert "over the limit" in response.json()["detail"] or "larger than" in response.json()["detail"]


def test_request_declared_over_the_limit_is_refused_before_reading(client, limits):
    limits(max_upload_mb=0.01, max_files=1)
    response = client.post("/predict", content=b"x" * 200_000,
                           headers={"content-type": "multipart/form-data; boundary=abc"})
    assert response.status_code == 413 and "serve.max_upload_mb" in response.json()["detail"]


def test_decompression_bomb_is_refused(client, limits):
    limits(max_pixels=100_000)
    bomb = png_bytes(np.zeros((1000, 1000), np.uint8))  # 3 KB on the wire, a million pixels decoded
    response = post(client, [("bomb.png", bomb, "image/png")])
    assert response.status_code == 413 and "exceeds the limit of 100000 pixels" in response.json()["detail"]


def test_no_model_still_serves_the_page_and_says_how_to_get_one(tmp_path, scan):
    with TestClient(create_app(tmp_path / "nothing-here"), raise_server_exceptions=False) as client:
        assert client.get("/").status_code == 200
        health = client.get("/health").json()
        assert health["status"] == "no_model" and "dvc repro" in health["detail"]
        for response in (client.get("/model-info"), post(client, [("scan.png", scan, "image/png")])):
            assert response.status_code == 503 and "dvc repro" in response.json()["detail"]


def test_graph_formats_answer_without_gradcam(tiny_export, scan):
    with TestClient(create_app(tiny_export, formats=("tflite_float32",))) as client:
        assert client.get("/model-info").json()["gradcam_available"] is False
        (result,) = post(client, [("scan.png", scan, "image/png")], gradcam="true").json()["results"]
        assert result["model"]["format"] == "tflite_float32" and result["gradcam_png"] is None


def test_streamed_request_without_length_is_cut_off_at_the_limit(client, limits):
    limits(max_upload_mb=0.01, max_files=1)

    def chunks():  # no Content-Length: the body arrives chunked
        for _ in range(30):
            yield b"x" * 10_000

    response = client.post("/predict", content=chunks(),
                           headers={"content-type": "multipart/form-data; boundary=abc"})
    assert response.status_code == 413 and "larger than" in response.json()["detail"]


# --- bounded concurrency ----------------------------------------------------------------------------------------


class SlowModel:
    """The loaded predictor's `predict`, held at a gate until released, counting the calls running at once."""

    def __init__(self, predict):
        self._predict, self._lock = predict, threading.Lock()
        self.gate, self.entered = threading.Event(), threading.Semaphore(0)
        self.running = self.most = 0

    def __call__(self, sources, gradcam=False):
        with self._lock:
            self.running += 1
            self.most = max(self.most, self.running)
        self.entered.release()
        self.gate.wait(timeout=60)
        try:
            return self._predict(sources, gradcam)
        finally:
            with self._lock:
                self.running -= 1

    def wait_entered(self, count: int) -> None:
        for _ in range(count):
            assert self.entered.acquire(timeout=30), "the request never reached the model"


@pytest.fixture()
def slow_model(client, monkeypatch):
    """Sets the slots with `slow_model.slots(count, wait_s)`; every prediction waits for `slow_model.gate`."""
    predictor, original_slots = client.app.state.predictor, client.app.state.slots
    model = SlowModel(predictor.predict)
    monkeypatch.setattr(predictor, "predict", model)
    model.slots = lambda count, wait_s: setattr(client.app.state, "slots", PredictionSlots(count, wait_s))
    yield model
    model.gate.set()
    client.app.state.slots = original_slots


def test_a_request_beyond_the_slots_gets_503_with_retry_after(client, scan, slow_model):
    slow_model.slots(1, 0)
    with ThreadPoolExecutor(1) as pool:
        first = pool.submit(post, client, [("first.png", scan, "image/png")])
        slow_model.wait_entered(1)
        busy = post(client, [("second.png", scan, "image/png")])
        slow_model.gate.set()
        assert first.result().status_code == 200
    assert busy.status_code == 503 and busy.headers["retry-after"] == "1"
    assert re.search(r"busy.*serve\.max_concurrent.*serve\.queue_timeout_s", busy.json()["detail"])
    assert slow_model.most == 1


def test_requests_beyond_the_slots_wait_for_one_and_never_run_more_at_once(client, scan, slow_model):
    slow_model.slots(2, 60)
    with ThreadPoolExecutor(4) as pool:
        answers = [pool.submit(post, client, [(f"{index}.png", scan, "image/png")]) for index in range(4)]
        slow_model.wait_entered(2)
        time.sleep(0.5)  # the other two are queued, not running
        assert slow_model.running == 2 and not any(answer.done() for answer in answers)
        slow_model.gate.set()
        assert [answer.result().status_code for answer in answers] == [200] * 4
    assert slow_model.most == 2


# --- no server paths in answers ---------------------------------------------------------------------------------


def test_public_names_of_server_folders(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert public_path(tmp_path / "models" / "export") == "models/export"
    assert public_path("models/export") == "models/export"
    assert public_path(tmp_path.parent / "elsewhere" / "my-export") == "my-export"
    message = f"{tmp_path}/models/export/model.keras: bad; see {tmp_path}/logs"
    assert without_server_paths(message, Path("models/export")) == "models/export/model.keras: bad; see logs"


def test_no_answer_names_a_server_path(tiny_export, tmp_path, tmp_path_factory, scan, project_root):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "metadata.json").write_text("{not json")
    states = {"loaded": tiny_export, "no export": tmp_path / "nothing-here", "unreadable metadata": broken,
              "nothing loadable": export_copy(tiny_export, tmp_path / "unloadable", formats=())}
    server_paths = {str(tiny_export.resolve()), str(tmp_path_factory.getbasetemp().resolve()), str(project_root),
                    tempfile.gettempdir() + os.sep}
    for state, folder in states.items():
        with TestClient(create_app(folder), raise_server_exceptions=False) as client:
            answers = [client.get(path) for path in ("/", "/health", "/model-info", "/openapi.json", "/docs",
                                                     "/static/app.js", "/no-such-page")]
            answers += [post(client, [("scan.png", scan, "image/png")]),
                        post(client, [("bad.png", b"\x89PNG damaged", "image/png")]),
                        client.post("/predict", json={"files": "x"}), client.get("/model-info?x=" + "y" * 9)]
            for answer in answers:
                assert answer.status_code < 500 or (state != "loaded" and answer.status_code == 503), state
                leaked = [path for path in server_paths if path in answer.text]
                assert not leaked, f"{state}: {answer.request.url.path} answered with {leaked}"
            if state == "loaded":
                info = client.get("/model-info").json()
                artifact = json.loads((folder / "metadata.json").read_text())["artifacts"]["keras"]["file"]
                assert info["export_dir"] == folder.name  # outside the working directory: the folder's name
                assert info["load_report"] == [f"keras: loaded {folder.name}/{artifact}"]
            else:
                assert folder.name in client.get("/health").json()["detail"]


# --- exports older than the newer limits ------------------------------------------------------------------------


def test_the_serve_defaults_for_older_exports_are_params_yaml_values(default_params):
    assert {key: getattr(default_params.serve, key) for key in SERVE_DEFAULTS} == SERVE_DEFAULTS


def test_an_export_without_the_newer_serve_limits_loads_with_the_defaults(tiny_export, tmp_path, default_params):
    old = export_copy(tiny_export, tmp_path / "old", drop_serve_keys=tuple(SERVE_DEFAULTS), schema_version="2.0")
    assert not set(SERVE_DEFAULTS) & set(json.loads((old / "metadata.json").read_text())["serve"])
    with TestClient(create_app(old, ("keras",))) as client:
        limits = client.get("/model-info").json()["limits"]
        assert {key: limits[key] for key in SERVE_DEFAULTS} == SERVE_DEFAULTS
        assert client.app.state.slots.count == default_params.serve.max_concurrent
    assert uvicorn_limits(old)["limit_concurrency"] == default_params.serve.max_connections


def test_uvicorn_limits_come_from_the_export(tiny_export, tmp_path):
    tight = export_copy(tiny_export, tmp_path / "tight", serve_changes={"max_connections": 7})
    options = uvicorn_limits(tight)
    assert {key: options[key] for key in ("limit_concurrency", "timeout_keep_alive")} == {
        "limit_concurrency": 7, "timeout_keep_alive": 5}
    assert issubclass(options["http"], H11Protocol)  # with the header deadline and the per-client cap
    assert uvicorn_limits(tmp_path / "nothing-here")["limit_concurrency"] == SERVE_DEFAULTS["max_connections"]


def test_chestct_serve_passes_the_connection_limits_to_uvicorn(tiny_export, tmp_path, monkeypatch):
    from chestct.cli import main
    from chestct.serving.shutdown import DrainingServer

    tight = export_copy(tiny_export, tmp_path / "tight", serve_changes={"max_connections": 9, "shutdown_grace_s": 7})
    configs = []
    monkeypatch.setattr(DrainingServer, "run", lambda server: configs.append(server.config))
    main(["serve", "--export-dir", str(tight), "--port", "8123"])
    (config,) = configs
    assert config.limit_concurrency == 9 and config.timeout_keep_alive == 5 and config.port == 8123
    assert config.timeout_graceful_shutdown == 7
    assert issubclass(config.http, H11Protocol)


def test_readiness_turns_503_while_the_service_drains(client):
    client.app.state.draining = True
    try:
        assert client.get("/health/ready").status_code == 503
        assert "shutting down" in client.get("/health/ready").json()["detail"]
        assert client.get("/v2/health/ready").status_code == 400
        assert client.get("/health/live").status_code == 200
    finally:
        client.app.state.draining = False
    assert client.get("/health/ready").status_code == 200


def test_an_image_that_is_not_a_chest_ct_is_answered_with_a_warning_or_refused(client, tiny_export, scan, tmp_path):
    from tests.test_domain import _document

    page = png_bytes(_document(np.random.default_rng(0)))
    response = post(client, [("page.png", page, "image/png")])
    assert response.status_code == 200
    (result,) = response.json()["results"]
    assert result["in_domain"] is False and "no lung fields found" in result["domain_reason"]
    assert result["diagnosis"] in ("Normal", "Cancer")  # the decision is still given, under the warning
    refusing = export_copy(tiny_export, tmp_path / "refusing", serve_changes={"refuse_out_of_domain": True})
    with TestClient(create_app(refusing)) as strict:
        refused = post(strict, [("page.png", page, "image/png")])
        assert refused.status_code == 422
        assert refused.json()["detail"].startswith("page.png: not scored, no lung fields found")
        assert post(strict, [("scan.png", scan, "image/png")]).status_code == 200
