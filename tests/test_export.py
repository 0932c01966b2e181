"""Export planning, the parity rule and what a left-out format leaves behind, without TensorFlow conversions (the
stage itself runs in test_export_stage.py, the whole pipeline in the end-to-end test)."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest

from chestct.evaluation.thresholds import threshold_record
from chestct.export.formats import NothingToExportError, UnknownFormatError, planned_formats, quiet_output
from chestct.export.metadata import SCHEMA_VERSION, build_metadata, read_metadata, write_metadata
from chestct.export.model_card import render_model_card
from chestct.export.parity import (
    ExportParityError,
    failed_run_report,
    formats_to_leave_out,
    left_out_warning,
    parity_report,
)

REFERENCE = np.array([0.1, 0.4, 0.6, 0.9])


def test_planned_formats_skip_h5_where_keras_cannot_reload_it(default_params):
    formats, skipped = planned_formats(default_params.export.formats, True, "densenet121")
    assert formats == ["keras", "h5", "savedmodel", "tflite_float32", "tflite_dynamic"] and skipped == {}
    formats, skipped = planned_formats(default_params.export.formats, False, "mobilenetv3small")
    assert "h5" not in formats and "mobilenetv3small" in skipped["h5"]


def test_an_unknown_format_is_refused_naming_the_choices():
    with pytest.raises(UnknownFormatError, match="tflite_int8.*keras, h5, savedmodel, tflite_float32, tflite_dynamic"):
        planned_formats(["keras", "tflite_int8"], True, "densenet121")


def test_a_plan_with_nothing_to_write_is_refused_naming_why():
    with pytest.raises(NothingToExportError, match=r"h5: Keras cannot reload mobilenetv3small.*export\.formats"):
        planned_formats(["h5"], False, "mobilenetv3small")


def test_parity_uses_the_float_or_quantized_tolerance(default_params):
    params = default_params.export
    float_report = parity_report(REFERENCE, REFERENCE + 2e-6, 0.5, "tflite_float32", params)
    assert float_report["passed"] and float_report["tolerance"] == params.float_tolerance
    assert not float_report["quantized"] and "reason" not in float_report
    quantized = parity_report(REFERENCE, REFERENCE + 0.01, 0.5, "tflite_dynamic", params)
    assert quantized["passed"] and quantized["tolerance"] == params.quantized_tolerance and quantized["quantized"]
    flipped = parity_report(REFERENCE, np.array([0.1, 0.4, 0.49, 0.9]), 0.5, "tflite_dynamic", params)
    assert not flipped["passed"] and flipped["decision_agreement"] == 0.75
    assert flipped["reason"] == ("max |p - p_keras| 0.11 > 0.02 (export.quantized_tolerance); decision agreement "
                                 "0.7500 < 0.9900 (export.min_decision_agreement)")


def test_float16_tflite_counts_as_quantized_as_the_registry_says(default_params):
    report = parity_report(REFERENCE, REFERENCE + 1e-3, 0.5, "tflite_float16", default_params.export)
    assert report["quantized"] and report["passed"]


def test_a_float_format_out_of_tolerance_fails_the_export_naming_it(default_params):
    reports = {
        "savedmodel": parity_report(REFERENCE, REFERENCE, 0.5, "savedmodel", default_params.export),
        "tflite_float32": parity_report(REFERENCE, REFERENCE + 1e-3, 0.5, "tflite_float32", default_params.export),
    }
    with pytest.raises(ExportParityError, match=r"tflite_float32: max \|p - p_keras\| 0\.001 > 1e-05 "
                                                r"\(export\.float_tolerance\)") as error:
        formats_to_leave_out(reports, require_all=False)
    assert "savedmodel" not in str(error.value) and "Nothing was exported" in str(error.value)


def _with_a_failing_quantized_variant(params) -> dict[str, dict]:
    return {
        "keras": parity_report(REFERENCE, REFERENCE, 0.5, "keras", params),
        "tflite_dynamic": parity_report(REFERENCE, REFERENCE + 0.0332, 0.5, "tflite_dynamic", params),
    }


def test_a_quantized_variant_out_of_tolerance_is_left_out_with_its_figures(default_params):
    left_out = formats_to_leave_out(_with_a_failing_quantized_variant(default_params.export), require_all=False)
    assert list(left_out) == ["tflite_dynamic"]
    record = left_out["tflite_dynamic"]
    assert record["max_abs_diff"] == pytest.approx(0.0332) and record["tolerance"] == 0.02
    assert record["decision_agreement"] == 1.0 and record["required_agreement"] == 0.99
    assert record["reason"] == "max |p - p_keras| 0.0332 > 0.02 (export.quantized_tolerance)"
    assert left_out_warning("tflite_dynamic", record) == (
        "export: warning: tflite_dynamic left out: max |p - p_keras| 0.0332 > 0.02 (export.quantized_tolerance); "
        "set export.require_all: true to fail instead")


def test_require_all_fails_naming_the_quantized_variant(default_params):
    with pytest.raises(ExportParityError, match=r"(?s)export\.require_all is true.*tflite_dynamic: max \|p - p_keras\|"
                                                r" 0\.0332 > 0\.02.*export\.require_all: false"):
        formats_to_leave_out(_with_a_failing_quantized_variant(default_params.export), require_all=True)


def test_every_format_failing_is_an_error(default_params):
    reports = {"tflite_dynamic": parity_report(REFERENCE, REFERENCE + 0.05, 0.5, "tflite_dynamic",
                                               default_params.export)}
    with pytest.raises(ExportParityError, match=r"(?s)no format passed.*tflite_dynamic.*Add a float format"):
        formats_to_leave_out(reports, require_all=False)


def test_a_quantized_variant_that_cannot_run_is_left_out_with_the_error(default_params):
    crashed = failed_run_report("tflite_dynamic", default_params.export,
                                "tflite_dynamic: chestct_dynamic.tflite failed to load or run in a fresh process:\n"
                                "  RuntimeError: bad op")
    reports = {"keras": parity_report(REFERENCE, REFERENCE, 0.5, "keras", default_params.export),
               "tflite_dynamic": crashed}
    left_out = formats_to_leave_out(reports, require_all=False)
    assert left_out["tflite_dynamic"]["max_abs_diff"] is None
    assert left_out["tflite_dynamic"]["reason"].endswith("fresh process: | RuntimeError: bad op")
    crashed_float = failed_run_report("savedmodel", default_params.export, "savedmodel: cannot load")
    with pytest.raises(ExportParityError, match="savedmodel: savedmodel: cannot load"):
        formats_to_leave_out({**reports, "savedmodel": crashed_float}, require_all=False)


def _metadata(default_params, left_out):
    artifact = {"file": "chestct.keras", "sha256": "0" * 64, "bytes": 1000}
    threshold = threshold_record({"threshold": 0.5, "method": "fixed"}, default_params)
    return build_metadata(default_params, threshold, {"keras": artifact}, {"h5": "not for this backbone"}, 64,
                          None, left_out)


def test_metadata_and_model_card_record_a_left_out_format(default_params, tmp_path):
    left_out = formats_to_leave_out(_with_a_failing_quantized_variant(default_params.export), require_all=False)
    metadata = _metadata(default_params, left_out)
    write_metadata(tmp_path, metadata)
    written = json.loads((tmp_path / "metadata.json").read_text())
    assert written["schema_version"] == SCHEMA_VERSION == "2.6"
    assert written["left_out_formats"] == {"tflite_dynamic": {
        "reason": "max |p - p_keras| 0.0332 > 0.02 (export.quantized_tolerance)", "max_abs_diff": pytest.approx(0.0332),
        "tolerance": 0.02, "decision_agreement": 1.0, "required_agreement": 0.99}}
    assert read_metadata(tmp_path).left_out_formats["tflite_dynamic"].tolerance == 0.02
    card = render_model_card(metadata, None)
    assert ("- tflite_dynamic left out: it failed the parity check against the Keras model (max |p - p_keras| "
            "0.0332 > 0.02 (export.quantized_tolerance)). Measured on the test split: max |p - p_keras| 0.0332 "
            "(limit 0.02), decision agreement 1.0000 (required 0.9900).") in card
    assert "- h5 not exported: not for this backbone" in card


def test_a_schema_2_0_file_without_left_out_formats_still_reads(default_params, tmp_path):
    write_metadata(tmp_path, _metadata(default_params, None))
    raw = json.loads((tmp_path / "metadata.json").read_text())
    raw.pop("left_out_formats")
    (tmp_path / "metadata.json").write_text(json.dumps({**raw, "schema_version": "2.0"}))
    metadata = read_metadata(tmp_path)
    assert metadata.schema_version == "2.0" and metadata.left_out_formats == {}
    assert "left out" not in render_model_card(metadata, None)


def test_the_model_card_describes_the_preprocessing_that_ran_and_where_the_export_came_from(default_params):
    """The card's input line follows the params (the lesion configuration's crop, denoising and equalisation,
    the original's CLAHE), and names the commit and registered version it was built from."""
    from tests.conftest import ORIGINAL_CONFIGURATION, _deep_update

    card = render_model_card(_metadata(default_params, None), None)
    assert ("crop to the lung fields (margin 0.05, zero outside the lung fields grown by 0.02, or outside the body "
            "where no lung is found)") in card
    assert "nlmeans denoising at 2x the slice's noise" in card and "noise floor" not in card
    assert "histogram equalisation inside the lung fields" in card and "CLAHE" not in card
    assert "Built from an unknown commit" in card
    body = default_params.model_copy(update={"preprocess": default_params.preprocess.model_copy(
        update={"mask": "body"})})
    card = render_model_card(_metadata(body, None), None)
    assert "crop to the lung fields (margin 0.05, zero outside the body)" in card
    assert "histogram equalisation inside the body" in card
    original = _deep_update(default_params, ORIGINAL_CONFIGURATION)
    source = {"git_revision": "0123456789abcdef0123", "artifact_version": "v1.0.0"}
    artifact = {"file": "chestct.keras", "sha256": "0" * 64, "bytes": 1000}
    metadata = build_metadata(original, threshold_record({"threshold": 0.5, "method": "fixed"}, original),
                              {"keras": artifact}, {}, 64, None, None, source)
    card = render_model_card(metadata, None)
    assert "after decode to grayscale, CLAHE (clip 2, 8 tiles a side), pad to " in card
    assert "crop to" not in card and "denoising" not in card and "equalisation" not in card
    assert "Built from commit `0123456789ab`, registered as v1.0.0." in card


def test_silencing_the_export_leaves_no_logging_handler_on_the_closed_null_device(monkeypatch):
    """TensorFlow's SavedModel writer logs through absl, whose first line calls logging.basicConfig() in a fresh
    process: made while the export is silenced, that handler held the closed null device and failed every later
    log line (and pytest's own report with it)."""
    root = logging.getLogger()
    monkeypatch.setattr(root, "handlers", [])  # as in a fresh process, where basicConfig() adds a handler
    named = logging.getLogger("chestct.tests.quiet")
    with quiet_output():
        logging.basicConfig()
        named.addHandler(logging.StreamHandler())  # any handler made on the stand-in stderr
        logging.getLogger("chestct.tests.quiet").warning("silenced")
    handlers = root.handlers + named.handlers
    assert not [handler for handler in handlers if getattr(handler, "stream", None) and handler.stream.closed]
    named.warning("a log line after the export still works")


def test_the_model_card_says_where_the_threshold_was_chosen(default_params):
    """On validation (the default) or on out-of-fold scores over train + valid, with the pool it rests on."""
    card = render_model_card(_metadata(default_params, None), None)
    assert "chosen on the valid split only" in card and "out-of-fold" not in card
    pool = {"images": 819, "normal_images": 161, "normal_slices": 23, "folds": 3, "auc": 0.87}
    threshold = threshold_record({"threshold": 0.44, "method": "youden_prior", "chosen_on": "out_of_fold",
                                  "out_of_fold": pool}, default_params)
    metadata = build_metadata(default_params, threshold, {"keras": {"file": "chestct.keras", "sha256": "0" * 64,
                                                                    "bytes": 1000}}, {}, 64, None, None)
    assert metadata.threshold_chosen_on == "out_of_fold" and metadata.metrics["out_of_fold"] == pool
    card = render_model_card(metadata, None)
    assert ("chosen on out-of-fold scores over train + valid (evaluate.threshold.chosen_on, never the test "
            "split)") in card
    assert ("chosen on out-of-fold scores of 819 train + valid images (23 distinct Normal slices) from 3 fold "
            "models") in card
