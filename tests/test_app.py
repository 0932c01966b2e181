"""The FastAPI service through TestClient: every endpoint, and a clear 4xx (never a 500) for every bad input."""

from __future__ import annotations

import base64
import io
import json
import re

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from chestct.serving.app import create_app
from tests.dicom_factory import make_ct_dicom, phantom_to_dicom
from tests.serving_support import phantom_images, png_bytes


@pytest.fixture(scope="module")
def client(tiny_export):
    with TestClient(create_app(tiny_export), raise_server_exceptions=False) as client:
        yield client


@pytest.fixture()
def limits(client):
    """Change the loaded model's serving limits for one test, then restore them."""
    predictor = client.app.state.predictor
    original = predictor.serve_params

    def set_limits(**changes):
        predictor.serve_params = original.model_copy(update=changes)

    yield set_limits
    predictor.serve_params = original


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


def test_openapi_documents_the_endpoints(client):
    paths = client.get("/openapi.json").json()["paths"]
    assert {"/predict", "/health", "/model-info"} <= set(paths)


def test_predict_one_scan(client, scan):
    response = post(client, [("scan.png", scan, "image/png")])
    assert response.status_code == 200
    (result,) = response.json()["results"]
    assert result["filename"] == "scan.png" and result["diagnosis"] in ("Normal", "Cancer")
    assert result["diagnosis"] == ("Cancer" if result["cancer_probability"] >= result["threshold"] else "Normal")
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
