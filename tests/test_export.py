"""Export planning and the parity rule, without TensorFlow conversions (the end-to-end test runs those)."""

from __future__ import annotations

import numpy as np
import pytest

from chestct.export.formats import UnknownFormatError, planned_formats
from chestct.export.parity import ExportParityError, check_parity, parity_report


def test_planned_formats_skip_h5_where_keras_cannot_reload_it(default_params):
    formats, skipped = planned_formats(default_params.export.formats, True, "densenet121")
    assert formats == ["keras", "h5", "savedmodel", "tflite_float32", "tflite_dynamic"] and skipped == {}
    formats, skipped = planned_formats(default_params.export.formats, False, "mobilenetv3small")
    assert "h5" not in formats and "mobilenetv3small" in skipped["h5"]


def test_an_unknown_format_is_refused_naming_the_choices():
    with pytest.raises(UnknownFormatError, match="tflite_int8.*keras, h5, savedmodel, tflite_float32, tflite_dynamic"):
        planned_formats(["keras", "tflite_int8"], True, "densenet121")


def test_parity_uses_the_float_or_quantized_tolerance(default_params):
    reference = np.array([0.1, 0.4, 0.6, 0.9])
    params = default_params.export
    float_report = parity_report(reference, reference + 2e-6, 0.5, "tflite_float32", params)
    assert float_report["passed"] and float_report["tolerance"] == params.float_tolerance
    quantized = parity_report(reference, reference + 0.01, 0.5, "tflite_dynamic", params)
    assert quantized["passed"] and quantized["tolerance"] == params.quantized_tolerance
    flipped = parity_report(reference, np.array([0.1, 0.4, 0.49, 0.9]), 0.5, "tflite_dynamic", params)
    assert not flipped["passed"] and flipped["decision_agreement"] == 0.75


def test_a_broken_format_is_named(default_params):
    reference = np.array([0.2, 0.8])
    reports = {
        "savedmodel": parity_report(reference, reference, 0.5, "savedmodel", default_params.export),
        "tflite_float32": parity_report(reference, reference + 1e-3, 0.5, "tflite_float32", default_params.export),
    }
    with pytest.raises(ExportParityError, match=r"tflite_float32: max \|p - p_keras\| = 0\.001") as error:
        check_parity(reports)
    assert "savedmodel" not in str(error.value)
