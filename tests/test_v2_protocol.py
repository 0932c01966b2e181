"""The open inference protocol (KServe v2) through the standard client, tritonclient, against a live service.

The service runs on loopback with the tests' tiny export; tritonclient checks liveness, readiness and the model's
metadata, and `infer` on every phantom test image, sent as JSON and as binary tensors, must give the probabilities
`Predictor` gives. The refusals are checked through the client and, where the client would refuse to send the
request itself, with raw HTTP: each is the protocol's `{"error": ...}` naming what is wrong.
"""

from __future__ import annotations

import json

import httpx
import numpy as np
import pytest
import tritonclient.http as triton
from tritonclient.utils import InferenceServerException

from chestct.serving.observability import model_version
from chestct.serving.predictor import Predictor
from tests.serving_support import phantom_images, png_bytes, running_server

MODEL = "chestct"


def client_for(url: str) -> triton.InferenceServerClient:
    return triton.InferenceServerClient(url=url.removeprefix("http://"), network_timeout=120.0)


@pytest.fixture(scope="module")
def client(live_server):
    client = client_for(live_server)
    yield client
    client.close()


@pytest.fixture(scope="module")
def predictor(tiny_export) -> Predictor:
    """The service's model (the same export and default format order), loaded in the test process."""
    return Predictor(tiny_export)


@pytest.fixture(scope="module")
def images(predictor) -> np.ndarray:
    """Every phantom test image, preprocessed as the pipeline does: (N, S, S, 1) uint8."""
    return np.stack([predictor.prepare(png_bytes(gray), f"phantom{index}.png")
                     for index, (_, gray) in enumerate(phantom_images())])


def image_input(images: np.ndarray, binary_data: bool, name: str = "image", datatype: str = "UINT8"):
    tensor = triton.InferInput(name, list(images.shape), datatype)
    tensor.set_data_from_numpy(images, binary_data=binary_data)
    return tensor


def infer(client, images: np.ndarray, binary_data: bool = True, **kwargs) -> np.ndarray:
    outputs = [triton.InferRequestedOutput("probability", binary_data=binary_data)]
    result = client.infer(MODEL, [image_input(images, binary_data)], outputs=outputs, **kwargs)
    return result.as_numpy("probability")


def refusal(error: pytest.ExceptionInfo) -> tuple[str, str]:
    return error.value.status(), error.value.message()


# --- health and metadata ------------------------------------------------------------------------------------


def test_server_and_model_are_live_and_ready(client, predictor):
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready(MODEL)
    assert client.is_model_ready(MODEL, model_version=model_version(predictor))
    assert not client.is_model_ready(MODEL, model_version="not-this-one")
    assert not client.is_model_ready("another-model")
    assert "binary_tensor_data" in client.get_server_metadata()["extensions"]


def test_model_metadata_gives_the_tensors_the_version_and_the_threshold(client, predictor):
    metadata = client.get_model_metadata(MODEL)
    size = predictor.image_size
    assert metadata["name"] == MODEL and metadata["platform"] == "tensorflow_keras"
    assert metadata["versions"] == [model_version(predictor)] == [predictor.sha256[:12]]
    assert metadata["inputs"] == [{"name": "image", "datatype": "UINT8", "shape": [-1, size, size, 1]}]
    assert metadata["outputs"] == [{"name": "probability", "datatype": "FP32", "shape": [-1, 1]},
                                   {"name": "probability_calibrated", "datatype": "FP32", "shape": [-1, 1]}]
    parameters = metadata["parameters"]
    assert parameters["threshold"] == predictor.threshold and parameters["sha256"] == predictor.sha256
    assert parameters["threshold_calibrated"] == pytest.approx(float(predictor.calibration.apply(predictor.threshold)))
    assert parameters["calibration"].startswith("calibrated (platt")
    assert parameters["format"] == predictor.format == "keras" and parameters["positive_class"] == "Cancer"
    assert client.get_model_metadata(MODEL, model_version=model_version(predictor)) == metadata


def test_native_api_has_separate_liveness_and_readiness(live_server, tmp_path):
    assert httpx.get(f"{live_server}/health/live").json() == {"status": "live"}
    assert httpx.get(f"{live_server}/health/ready").json() == {"status": "ready", "format": "keras"}
    with running_server(tmp_path / "no-export") as url:
        assert httpx.get(f"{url}/health/live").status_code == 200
        ready = httpx.get(f"{url}/health/ready")
        assert ready.status_code == 503 and "dvc repro" in ready.json()["detail"]


# --- inference ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("binary_data", [True, False], ids=["binary", "json"])
def test_infer_on_every_phantom_gives_the_predictors_probabilities(client, predictor, images, binary_data):
    probabilities = infer(client, images, binary_data)
    assert probabilities.dtype == np.float32 and probabilities.shape == (len(images), 1)
    np.testing.assert_allclose(probabilities[:, 0], predictor.probabilities(images), rtol=0, atol=1e-6)


def test_one_image_at_a_time_gives_the_same_as_the_batch(client, predictor, images):
    expected = predictor.probabilities(images)
    for image, probability in zip(images, expected, strict=True):
        (single,) = infer(client, image[np.newaxis], binary_data=True)[:, 0]
        assert single == pytest.approx(probability, abs=1e-6)


def test_default_outputs_come_back_binary_and_the_request_id_is_echoed(client, predictor, images):
    result = client.infer(MODEL, [image_input(images[:2], binary_data=True)], request_id="case-7")
    response = result.get_response()
    assert response["id"] == "case-7" and response["model_version"] == model_version(predictor)
    assert response["outputs"][0]["parameters"]["binary_data_size"] == 2 * 4
    np.testing.assert_allclose(result.as_numpy("probability")[:, 0], predictor.probabilities(images[:2]), atol=1e-6)


def test_nested_json_data_are_accepted(live_server, predictor, images):
    body = {"inputs": [{"name": "image", "datatype": "UINT8", "shape": list(images[:1].shape),
                        "data": images[:1].tolist()}]}
    answer = httpx.post(f"{live_server}/v2/models/{MODEL}/infer", json=body, timeout=60)
    assert answer.status_code == 200
    output, calibrated = answer.json()["outputs"]
    probability = predictor.probabilities(images[:1])[0]
    assert output["shape"] == [1, 1] and output["data"][0] == pytest.approx(probability, abs=1e-6)
    # The second output is the same score through the export's calibration map.
    assert calibrated["name"] == "probability_calibrated" and calibrated["shape"] == [1, 1]
    assert calibrated["data"][0] == pytest.approx(float(predictor.calibration.apply(probability)), abs=1e-6)
    assert calibrated["data"][0] != pytest.approx(probability, abs=1e-3)


# --- refusals -----------------------------------------------------------------------------------------------


def test_wrong_datatype_is_refused_by_name(client, images):
    with pytest.raises(InferenceServerException) as error:
        client.infer(MODEL, [image_input(images.astype(np.float32), True, datatype="FP32")])
    status, message = refusal(error)
    assert status == "400" and "must be UINT8" in message and "FP32" in message


def test_wrong_shape_is_refused_with_the_expected_one(client, images, predictor):
    size = predictor.image_size
    with pytest.raises(InferenceServerException) as error:
        client.infer(MODEL, [image_input(images[:, : size // 2, : size // 2], True)])
    status, message = refusal(error)
    assert status == "400" and f"[N, {size}, {size}, 1]" in message and f"[6, {size // 2}, {size // 2}, 1]" in message


def test_wrong_input_or_output_name_is_refused(client, images):
    with pytest.raises(InferenceServerException) as error:
        client.infer(MODEL, [image_input(images, True, name="pixels")])
    assert refusal(error)[0] == "400" and "one input 'image'" in refusal(error)[1]
    with pytest.raises(InferenceServerException) as error:
        client.infer(MODEL, [image_input(images, True)], outputs=[triton.InferRequestedOutput("logits")])
    status, message = refusal(error)
    assert status == "400" and "outputs are 'probability', 'probability_calibrated'; 'logits' was requested" in message


def test_unknown_model_and_version_are_404(client, images):
    with pytest.raises(InferenceServerException) as error:
        client.infer("resnet50", [image_input(images, True)])
    assert refusal(error) == ("404", "unknown model 'resnet50': this server serves 'chestct'")
    with pytest.raises(InferenceServerException) as error:
        client.infer(MODEL, [image_input(images, True)], model_version="v0")
    assert refusal(error)[0] == "404" and "has no version 'v0'" in refusal(error)[1]


def post_infer(url: str, body: bytes | dict, headers: dict | None = None) -> httpx.Response:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return httpx.post(f"{url}/v2/models/{MODEL}/infer", content=content, headers=headers or {}, timeout=60)


@pytest.mark.parametrize(("body", "message"), [
    (b"not json", "not JSON"),
    ({"inputs": []}, "inputs: List should have at least 1 item"),
    ({"inputs": [{"name": "image", "datatype": "UINT8", "shape": [1, 64, 64, 1], "data": [0] * 10}]},
     "has 10 values; shape [1, 64, 64, 1] needs 4096"),
    ({"inputs": [{"name": "image", "datatype": "UINT8", "shape": [1, 64, 64, 1], "data": [300] * 4096}]},
     "integers from 0 to 255"),
    ({"inputs": [{"name": "image", "datatype": "UINT8", "shape": [1, 64, 64, 1], "data": [0.5] * 4096}]},
     "integers from 0 to 255"),
    ({"inputs": [{"name": "image", "datatype": "UINT8", "shape": [1, 64, 64, 1], "data": [[0] * 64] * 64}]},
     "nested as [64, 64] do not match the shape"),
    ({"inputs": [{"name": "image", "datatype": "UINT8", "shape": [1, 64, 64, 1]}]}, "has no data"),
])
def test_malformed_requests_get_the_protocols_error_shape(live_server, body, message):
    answer = post_infer(live_server, body)
    assert answer.status_code == 400 and set(answer.json()) == {"error"}
    assert message in answer.json()["error"]


def test_binary_data_of_the_wrong_size_is_refused(live_server, images):
    header = json.dumps({"inputs": [{"name": "image", "datatype": "UINT8", "shape": [1, 64, 64, 1],
                                     "parameters": {"binary_data_size": 4096}}]}).encode()
    answer = post_infer(live_server, header + images[0].tobytes()[:1000],
                        {"Inference-Header-Content-Length": str(len(header))})
    assert answer.status_code == 400 and "binary_data_size 4096; the body holds 1000 bytes" in answer.json()["error"]


def test_more_images_than_serve_max_files_is_413(client, images, predictor):
    too_many = np.repeat(images[:1], predictor.serve_params.max_files + 1, axis=0)
    with pytest.raises(InferenceServerException) as error:
        client.infer(MODEL, [image_input(too_many, True)])
    assert refusal(error)[0] == "413" and "serve.max_files" in refusal(error)[1]


def test_compressed_requests_are_refused_saying_to_send_them_plain(client, images):
    with pytest.raises(InferenceServerException) as error:
        client.infer(MODEL, [image_input(images, True)], request_compression_algorithm="gzip")
    assert refusal(error)[0] == "415" and "Content-Encoding: gzip" in refusal(error)[1]


def test_without_a_model_the_server_is_live_but_not_ready(tmp_path, images):
    with running_server(tmp_path / "no-export") as url:
        client = client_for(url)
        try:
            assert client.is_server_live()
            assert not client.is_server_ready() and not client.is_model_ready(MODEL)
            with pytest.raises(InferenceServerException) as error:
                client.infer(MODEL, [image_input(images, True)])
            assert refusal(error)[0] == "503" and "dvc repro" in refusal(error)[1]
            with pytest.raises(InferenceServerException) as error:
                client.get_model_metadata(MODEL)
            assert refusal(error)[0] == "503"
        finally:
            client.close()
