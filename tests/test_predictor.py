"""Predictor: the format fallback chain, metadata-driven preprocessing and decisions, every input type, threads.

Parity with the pipeline's cached arrays on a trained model is checked end to end in test_pipeline_training.py.
"""

from __future__ import annotations

import json
import re
import shutil
import threading

import numpy as np
import pytest

from chestct.export.metadata import SCHEMA_VERSION
from chestct.feature_domain import DOMAIN_FILE
from chestct.imaging.errors import CorruptImageError, ImageDecodeError
from chestct.imaging.preprocess import preprocess_gray
from chestct.serving.predictor import ModelUnavailableError, Predictor, parse_format_order
from tests.dicom_factory import make_ct_dicom, phantom_to_dicom
from tests.serving_support import FORMATS, phantom_images, png_bytes


@pytest.fixture(scope="module")
def predictor(tiny_export) -> Predictor:
    return Predictor(tiny_export)


@pytest.fixture(scope="module")
def phantoms() -> list[tuple[str, bytes]]:
    return [(f"phantom{index}_{label}.png", png_bytes(gray)) for index, (label, gray) in enumerate(phantom_images())]


def copy_export(tiny_export, tmp_path):
    return shutil.copytree(tiny_export, tmp_path / "export")


def test_loads_the_first_format_and_reports_identity(predictor, tiny_export):
    metadata = json.loads((tiny_export / "metadata.json").read_text())
    assert predictor.format == "keras"
    assert predictor.sha256 == metadata["artifacts"]["keras"]["sha256"]
    assert predictor.threshold == metadata["threshold"]
    assert predictor.image_size == 64 and predictor.gradcam_available
    assert predictor.load_report == [f"keras: loaded {tiny_export / 'chestct.keras'}"]


def test_falls_back_past_a_replaced_and_a_broken_file_and_says_why(tiny_export, tmp_path, caplog):
    export = copy_export(tiny_export, tmp_path)
    (export / "chestct.keras").write_bytes(b"not a keras file")  # replaced after export: sha256 differs
    metadata = json.loads((export / "metadata.json").read_text())
    (export / "chestct.h5").write_bytes(b"broken h5")
    from chestct.export.formats import artifact_digest

    metadata["artifacts"]["h5"]["sha256"] = artifact_digest(export / "chestct.h5")[0]  # matches, cannot load
    (export / "metadata.json").write_text(json.dumps(metadata))
    with caplog.at_level("INFO", logger="chestct.serving.predictor"):
        predictor = Predictor(export)
    assert predictor.format == "savedmodel" and not predictor.gradcam_available
    keras_line, h5_line, loaded_line = predictor.load_report
    assert "sha256 of chestct.keras differs from metadata.json" in keras_line
    assert h5_line.startswith("h5: failed: h5: cannot load")
    assert loaded_line.startswith("savedmodel: loaded")
    assert "sha256 of chestct.keras differs" in caplog.text


def test_format_order_is_configurable_by_argument_and_environment(tiny_export, monkeypatch):
    assert Predictor(tiny_export, formats=("tflite_float32", "keras")).format == "tflite_float32"
    monkeypatch.setenv("CHESTCT_EXPORT_DIR", str(tiny_export))
    monkeypatch.setenv("CHESTCT_FORMATS", "savedmodel,keras")
    assert Predictor().format == "savedmodel"


def test_a_format_that_was_not_exported_is_skipped(tiny_export):
    predictor = Predictor(tiny_export, formats=("tflite_dynamic", "h5"))
    assert predictor.format == "h5"
    assert predictor.load_report[0] == "tflite_dynamic: skipped: not exported"


def test_unknown_format_names_the_choices():
    with pytest.raises(ModelUnavailableError, match="unknown export format.*onnx.*choose from keras"):
        parse_format_order("keras,onnx")


def test_no_export_folder_says_how_to_make_one(tmp_path):
    with pytest.raises(ModelUnavailableError, match=r"no exported model in .*run `dvc repro`"):
        Predictor(tmp_path / "missing")


def test_no_loadable_format_lists_every_attempt(tiny_export, tmp_path):
    export = copy_export(tiny_export, tmp_path)
    for name in ("chestct.keras", "chestct.h5", "chestct_float32.tflite"):
        (export / name).unlink()
    shutil.rmtree(export / "savedmodel")
    with pytest.raises(ModelUnavailableError, match=r"(?s)keras: failed: .*missing.*savedmodel: failed.*"
                                                    r"dvc repro export"):
        Predictor(export)


def test_input_is_the_pipeline_preprocessing_with_the_exported_params(predictor, phantoms):
    (name, data), gray = phantoms[0], phantom_images()[0][1]
    np.testing.assert_array_equal(predictor.prepare(data, name), preprocess_gray(gray, predictor.preprocess_params))


def test_predictions_follow_the_stored_threshold(predictor, phantoms):
    predictions = predictor.predict(phantoms, gradcam=True)
    assert [p.filename for p in predictions] == [name for name, _ in phantoms]
    assert {p.diagnosis for p in predictions} == {"Normal", "Cancer"}  # the threshold is their median
    for p in predictions:
        assert p.threshold == predictor.threshold
        assert p.diagnosis == ("Cancer" if p.cancer_probability >= p.threshold else "Normal")
        # The calibrated probability is the export's map of the score; against the mapped threshold it decides
        # exactly as the score does against the threshold.
        calibrated = p.cancer_probability_calibrated
        assert calibrated == pytest.approx(float(predictor.calibration.apply(p.cancer_probability)))
        assert p.threshold_calibrated == pytest.approx(float(predictor.calibration.apply(p.threshold)))
        assert (calibrated >= p.threshold_calibrated) == (p.diagnosis == "Cancer")
        assert p.confidence == pytest.approx(calibrated if p.diagnosis == "Cancer" else 1 - calibrated)
        assert p.calibration == "calibrated (platt, fitted on 40 validation scores)"
        assert p.model_input.shape == (64, 64, 1) and p.model_input.dtype == np.uint8
        assert p.heatmap.shape == (64, 64) and p.heatmap.min() >= 0 and p.heatmap.max() <= 1
        assert p.to_dict()["model"] == {"format": "keras", "sha256": predictor.sha256}


def test_an_export_older_than_calibration_loads_uncalibrated_and_says_so(tiny_export, tmp_path, phantoms):
    """Schema 2.3: no calibration map, and no feature domain (checked by the first layer of the domain check
    alone; the model's extra feature output is read and ignored)."""
    older = tmp_path / "export"
    shutil.copytree(tiny_export, older, ignore=shutil.ignore_patterns(DOMAIN_FILE))
    raw = json.loads((older / "metadata.json").read_text())
    raw.pop("calibration")
    raw.pop("domain")
    (older / "metadata.json").write_text(json.dumps({**raw, "schema_version": "2.3"}))
    predictor = Predictor(older)
    assert predictor.domain is None and predictor.info()["domain"]["feature_distance"] is None
    assert all(answer.in_domain and answer.domain_reason is None for answer in predictor.predict(phantoms))
    assert not predictor.calibration.calibrated
    prediction = predictor.predict(phantoms[:1])[0]
    assert prediction.cancer_probability_calibrated == prediction.cancer_probability
    assert prediction.threshold_calibrated == prediction.threshold
    assert prediction.to_dict()["calibration"] == "uncalibrated: the model's score, not a probability"
    assert predictor.info()["calibration"]["method"] == "none"


@pytest.mark.parametrize("format_name", FORMATS[1:])
def test_every_format_gives_the_same_probabilities_and_decisions(predictor, tiny_export, phantoms, format_name):
    reference = predictor.predict(phantoms)
    loaded = Predictor(tiny_export, formats=(format_name,))
    other = loaded.predict(phantoms)
    np.testing.assert_allclose([p.cancer_probability for p in other], [p.cancer_probability for p in reference],
                               atol=1e-5)
    # The feature-distance domain check: the format gives the pooled features, and the same distances.
    images = np.stack([predictor.prepare(data, name) for name, data in phantoms])
    np.testing.assert_allclose(loaded.domain_distances(loaded.outputs(images)),
                               predictor.domain_distances(predictor.outputs(images)), rtol=1e-3)
    assert all(p.in_domain for p in other)
    np.testing.assert_allclose([p.cancer_probability_calibrated for p in other],
                               [p.cancer_probability_calibrated for p in reference], atol=1e-4)
    assert [p.diagnosis for p in other] == [p.diagnosis for p in reference]


@pytest.mark.parametrize(("mode", "fmt"), [("L", "PNG"), ("RGB", "PNG"), ("RGBA", "PNG"), ("P", "PNG"),
                                           ("I;16", "PNG"), ("RGB", "JPEG")])
def test_every_image_mode_is_read(predictor, mode, fmt):
    gray = phantom_images(count=1)[0][1]
    prediction = predictor.predict([(f"scan.{fmt.lower()}", png_bytes(gray, mode, fmt))])[0]
    assert 0.0 <= prediction.cancer_probability <= 1.0


def test_dicom_in_hounsfield_units_gives_the_same_input_as_the_png(predictor):
    gray = phantom_images(count=1)[0][1]
    window = predictor.serve_params.dicom_window
    from_dicom = predictor.prepare(phantom_to_dicom(gray, window.center, window.width), "scan.dcm")
    np.testing.assert_array_equal(from_dicom, predictor.prepare(png_bytes(gray), "scan.png"))


def test_a_bad_file_fails_the_call_by_name_before_any_prediction(predictor, phantoms):
    no_pixels = make_ct_dicom(np.zeros((8, 8)), with_pixels=False)
    with pytest.raises(CorruptImageError, match="report.dcm: .*no pixel data"):
        predictor.predict([phantoms[0], ("report.dcm", no_pixels)])
    with pytest.raises(ImageDecodeError, match="notes.txt: not a recognised image"):
        predictor.predict([("notes.txt", b"hello")])


def test_concurrent_predictions_match_sequential_ones(predictor, phantoms):
    expected = {name: p.cancer_probability for (name, _), p in zip(phantoms, predictor.predict(phantoms), strict=True)}
    results, errors = {}, []

    def work(index):
        try:
            for name, data in phantoms[index % 2::2]:
                results[(index, name)] = predictor.predict([(name, data)])[0].cancer_probability
        except Exception as exc:  # surfaced below: a thread's exception would otherwise vanish
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(index,)) for index in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    assert len(results) == 18
    for (_, name), probability in results.items():
        assert probability == pytest.approx(expected[name], abs=1e-6)


def _with_metadata(tiny_export, tmp_path, change) -> object:
    export = copy_export(tiny_export, tmp_path)
    metadata = json.loads((export / "metadata.json").read_text())
    change(metadata)
    (export / "metadata.json").write_text(json.dumps(metadata))
    return export


def test_metadata_records_its_schema_versions_and_input_contract(tiny_export):
    metadata = json.loads((tiny_export / "metadata.json").read_text())
    assert metadata["schema_version"] == "2.6"
    assert set(metadata["versions"]) == {"chestct", "tensorflow", "keras"}
    assert metadata["input"] == {**metadata["input"], "name": "image", "dtype": "uint8", "shape": [64, 64, 1],
                                 "value_range": [0.0, 255.0]}
    assert metadata["output"]["value_range"] == [0.0, 1.0]


@pytest.mark.parametrize(("change", "message"), [
    (lambda m: m.update(schema_version="3.0"), r"schema version 3\.0, this chestct reads major version 2"),
    (lambda m: m.pop("schema_version"), r"schema version 1, this chestct reads major version 2"),
    (lambda m: m.pop("threshold"),
     rf"does not match the export metadata schema {re.escape(SCHEMA_VERSION)} \(threshold: Field required"),
])
def test_metadata_of_another_major_version_or_shape_is_refused_saying_what_to_do(tiny_export, tmp_path, change,
                                                                                 message):
    export = _with_metadata(tiny_export, tmp_path, change)
    with pytest.raises(ModelUnavailableError, match=message) as error:
        Predictor(export)
    assert "dvc repro export" in str(error.value)


def test_metadata_of_a_newer_minor_version_with_extra_fields_still_loads(tiny_export, tmp_path):
    export = _with_metadata(tiny_export, tmp_path, lambda m: m.update(schema_version="2.7", added_later={"x": 1}))
    assert Predictor(export).threshold == json.loads((tiny_export / "metadata.json").read_text())["threshold"]
