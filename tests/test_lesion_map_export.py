"""A lesion-map model exported: both outputs in every format, parity on both, and the map wherever the model
answers (/predict, the open inference protocol, `chestct predict`); exports without a map load as before."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from fastapi.testclient import TestClient

from chestct.cli import main
from chestct.export.formats import open_exported
from chestct.export.metadata import read_metadata
from chestct.export.parity import parity_report
from chestct.imaging.preprocess import preprocess_gray
from chestct.serving.app import create_app
from chestct.serving.predictor import Predictor
from tests.serving_support import SIZE, phantom_images, png_bytes, serving_params


@pytest.fixture(scope="module")
def images(default_params) -> np.ndarray:
    params = serving_params(default_params, lesion_map=True)
    return np.stack([preprocess_gray(gray, params.preprocess) for _, gray in phantom_images(4, seed=5)])


def test_every_format_gives_the_probability_and_the_same_lesion_map(tiny_lesion_export, images, default_params):
    metadata = read_metadata(tiny_lesion_export)
    assert metadata.schema_version == "2.6" and metadata.lesion_map is not None
    side = SIZE // metadata.lesion_map.stride
    assert metadata.lesion_map.output.shape == [side, side, 1]
    reference = open_exported("keras", tiny_lesion_export / metadata.artifacts["keras"].file)
    scores, maps = reference.predict_with_map(images)
    assert maps.shape == (len(images), side, side) and np.all((maps >= 0) & (maps <= 1))
    for name in metadata.artifacts:  # keras, h5, savedmodel, tflite_float32
        loaded = open_exported(name, tiny_lesion_export / metadata.artifacts[name].file)
        format_scores, format_maps = loaded.predict_with_map(images)
        report = parity_report(scores, format_scores, metadata.threshold, name, default_params.export, maps,
                               format_maps)
        assert report["passed"], (name, report)
        assert report["max_abs_map_diff"] <= default_params.export.float_tolerance


def test_parity_fails_a_format_whose_lesion_map_differs_or_is_missing(default_params):
    scores, maps = np.array([0.2, 0.8]), np.zeros((2, 4, 4))
    shifted = parity_report(scores, scores, 0.5, "savedmodel", default_params.export, maps, maps + 0.01)
    missing = parity_report(scores, scores, 0.5, "savedmodel", default_params.export, maps, None)
    for report in (shifted, missing):
        assert not report["passed"] and "lesion map" in report["reason"]
    plain = parity_report(scores, scores, 0.5, "savedmodel", default_params.export)
    assert plain["passed"] and "max_abs_map_diff" not in plain  # a model without a map: as before


def test_an_export_without_a_map_and_an_older_schema_load_as_before(tiny_export, tmp_path):
    assert read_metadata(tiny_export).lesion_map is None and not Predictor(tiny_export).has_lesion_map
    older = tmp_path / "export"
    shutil.copytree(tiny_export, older)
    raw = json.loads((older / "metadata.json").read_text())
    raw["schema_version"] = "2.2"
    raw.pop("lesion_map")
    (older / "metadata.json").write_text(json.dumps(raw))
    predictor = Predictor(older)
    assert predictor.metadata.lesion_map is None
    probabilities, maps = predictor.probabilities_and_maps(np.zeros((1, SIZE, SIZE, 1), np.uint8))
    assert maps is None and probabilities.shape == (1,)


def test_the_service_shows_the_lesion_map_and_the_v2_protocol_declares_and_sends_it(tiny_lesion_export, images):
    predictor = Predictor(tiny_lesion_export)
    probabilities, maps = predictor.probabilities_and_maps(images, at_input_size=False)
    side = maps.shape[1]
    with TestClient(create_app(tiny_lesion_export)) as client:
        gray = phantom_images(1, seed=6)[0][1]
        answer = client.post("/predict", files=[("files", ("slice.png", png_bytes(gray), "image/png"))]).json()
        assert answer["results"][0]["lesion_map_png"].startswith("data:image/png;base64,")
        assert client.get("/model-info").json()["lesion_map"]["stride"] == SIZE // side
        outputs = client.get("/v2/models/chestct").json()["outputs"]
        assert [output["name"] for output in outputs] == ["probability", "probability_calibrated", "lesion_map"]
        assert outputs[2]["shape"] == [-1, side, side, 1]
        request = {"inputs": [{"name": "image", "datatype": "UINT8", "shape": list(images.shape),
                               "data": images.ravel().tolist()}]}
        both = client.post("/v2/models/chestct/infer", json=request).json()["outputs"]
        assert [output["name"] for output in both] == ["probability", "probability_calibrated", "lesion_map"]
        np.testing.assert_allclose(both[0]["data"], probabilities, atol=1e-6)
        np.testing.assert_allclose(both[1]["data"], predictor.calibration.apply(probabilities), atol=1e-6)
        np.testing.assert_allclose(np.reshape(both[2]["data"], maps.shape), maps, atol=1e-6)
        only = client.post("/v2/models/chestct/infer",
                           json=request | {"outputs": [{"name": "probability"}]}).json()["outputs"]
        assert [output["name"] for output in only] == ["probability"]


def test_the_cli_saves_the_lesion_map_of_each_input(tiny_lesion_export, tiny_export, tmp_path, capsys):
    scans = tmp_path / "scans"
    scans.mkdir()
    for index, (_, gray) in enumerate(phantom_images(2, seed=7)):
        (scans / f"slice{index}.png").write_bytes(png_bytes(gray))
    main(["predict", str(scans), "--export-dir", str(tiny_lesion_export), "--lesion-map-dir", str(tmp_path / "maps")])
    assert sorted(path.name for path in (tmp_path / "maps").iterdir()) == ["slice0_lesion_map.png",
                                                                          "slice1_lesion_map.png"]
    main(["predict", str(scans), "--export-dir", str(tiny_export), "--lesion-map-dir", str(tmp_path / "none")])
    assert "has no lesion map" in capsys.readouterr().err and not any((tmp_path / "none").iterdir())
