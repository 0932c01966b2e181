"""The export stage on a tiny model: a quantized variant out of tolerance is left out (or, under
export.require_all, fails the stage), and the predictor serves what remains.

The model is tests/fixtures/model_before_package_move.keras (16 px, seconds to convert). Its float16 TFLite copy
differs from Keras by about 1e-5, so export.quantized_tolerance 1e-9 forces that variant to fail parity while the
float formats (within export.float_tolerance 1e-5) pass.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml

from chestct.feature_domain import save_disabled
from chestct.imaging.processed import save_processed
from tests.conftest import PROJECT_ROOT

FIXTURES = Path(__file__).parent / "fixtures"
FORMATS = ["tflite_float32", "tflite_float16"]  # few formats: each is a fresh TensorFlow process


def _workspace(root: Path, require_all: bool, formats: list[str] = FORMATS) -> Path:
    """A project folder holding what the export stage reads: params.yaml, the model, its threshold, a test split."""
    from chestct.evaluation.thresholds import threshold_record
    from chestct.params import load_params

    params = yaml.safe_load((PROJECT_ROOT / "params.yaml").read_text())
    params["export"].update(formats=formats, quantized_tolerance=1e-9, require_all=require_all, latency_runs=2)
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    (root / "models").mkdir(parents=True)
    shutil.copy(FIXTURES / "model_before_package_move.keras", root / "models/phase2.keras")
    with np.load(FIXTURES / "model_before_package_move.npz") as saved:
        images, probabilities = saved["images"], saved["probabilities"]
    record = threshold_record({"threshold": float(np.median(probabilities)), "method": "fixed"},
                              load_params(root / "params.yaml"))
    (root / "models/threshold.json").write_text(json.dumps(record))
    save_disabled(root / "models/domain.npz", "not under test here")  # as evaluate writes it with the layer off
    count = len(images)
    save_processed(root / "data/processed", {"test": {
        "images": images, "labels": np.arange(count) % 2,
        "subtypes": np.array(["normal", "adenocarcinoma"] * (count // 2)),
        "ids": np.array([f"test/{index}.png" for index in range(count)])}})
    return root


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """The stage run once with the float16 variant failing parity: (workspace, stdout, stderr)."""
    import contextlib
    import io
    import os

    from stages import export as export_stage

    workspace = _workspace(tmp_path_factory.mktemp("export"), require_all=False)
    stdout, stderr = io.StringIO(), io.StringIO()
    cwd = Path.cwd()
    os.chdir(workspace)
    try:
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            export_stage.main()
    finally:
        os.chdir(cwd)
    return workspace, stdout.getvalue(), stderr.getvalue()


def test_the_stage_succeeds_and_the_export_holds_only_what_passed(exported):
    workspace, stdout, _ = exported
    export = workspace / "models/export"
    assert sorted(path.name for path in export.iterdir()) == [
        "MODEL_CARD.md", "chestct_float32.tflite", "metadata.json"]
    assert "export: 1 formats -> models/export (tflite_float32)" in stdout
    assert "left out: tflite_float16" in stdout
    assert not list(workspace.glob("models/.export.*"))  # atomic: no temporary folder left


def test_one_warning_line_names_the_format_the_figures_and_the_way_back(exported):
    _, _, stderr = exported
    warnings = [line for line in stderr.splitlines() if "left out" in line]
    assert len(warnings) == 1
    assert warnings[0].startswith("export: warning: tflite_float16 left out: max |p - p_keras| ")
    assert warnings[0].endswith("> 1e-09 (export.quantized_tolerance); set export.require_all: true to fail instead")


def test_metrics_record_the_left_out_format_with_its_figures(exported):
    workspace, _, _ = exported
    metrics = json.loads((workspace / "metrics/export.json").read_text())
    assert set(metrics["formats"]) == {"tflite_float32"}
    assert all(report["passed"] for report in metrics["formats"].values())
    record = metrics["left_out"]["tflite_float16"]
    assert not record["passed"] and record["quantized"] and record["tolerance"] == 1e-9
    assert 1e-9 < record["max_abs_diff"] < 1e-3 and record["decision_agreement"] == 1.0
    assert record["reason"].startswith("max |p - p_keras| ") and record["bytes"] > 0
    latency = json.loads((workspace / "reports/export_latency.json").read_text())["formats"]
    assert set(latency) == {"tflite_float32"}


def test_metadata_and_model_card_carry_the_reason(exported):
    workspace, _, _ = exported
    metrics = json.loads((workspace / "metrics/export.json").read_text())
    metadata = json.loads((workspace / "models/export/metadata.json").read_text())
    assert metadata["schema_version"] == "2.6" and set(metadata["artifacts"]) == {"tflite_float32"}
    left_out = metadata["left_out_formats"]["tflite_float16"]
    assert left_out["reason"] == metrics["left_out"]["tflite_float16"]["reason"]
    assert left_out["max_abs_diff"] == metrics["left_out"]["tflite_float16"]["max_abs_diff"]
    card = (workspace / "models/export/MODEL_CARD.md").read_text()
    assert f"- tflite_float16 left out: it failed the parity check against the Keras model ({left_out['reason']})" \
        in card


def test_the_predictor_skips_the_left_out_format_and_refuses_a_request_for_it(exported):
    from chestct.serving.predictor import ModelUnavailableError, Predictor

    workspace, _, _ = exported
    export = workspace / "models/export"
    predictor = Predictor(export)  # the registry's order: keras, h5 and savedmodel were never written
    assert predictor.format == "tflite_float32"
    assert predictor.load_report == [f"tflite_float32: loaded {export / 'chestct_float32.tflite'}"]
    fallback = Predictor(export, formats=("tflite_float16", "tflite_float32"))
    assert fallback.format == "tflite_float32" and fallback.load_report[0].startswith(
        "tflite_float16: skipped: left out of this export, it failed the parity check: max |p - p_keras| ")
    with pytest.raises(ModelUnavailableError, match=r"no requested export format is in this export: tflite_float16: "
                                                    r"left out of this export, it failed the parity check: "
                                                    r"max \|p - p_keras\| \S+ > 1e-09 "
                                                    r"\(export\.quantized_tolerance\)\. "
                                                    r"It holds tflite_float32: ask for one of those with --formats "
                                                    r"or CHESTCT_FORMATS$"):
        Predictor(export, formats=("tflite_float16",))


def test_require_all_fails_the_stage_naming_the_format_and_exports_nothing(tmp_path, monkeypatch, capsys):
    from stages import export as export_stage
    from stages.errors import run_stage

    workspace = _workspace(tmp_path, require_all=True, formats=["tflite_float16"])
    monkeypatch.chdir(workspace)
    with pytest.raises(SystemExit) as exit_info:
        run_stage("export", export_stage.main)
    assert exit_info.value.code == 1
    stderr = capsys.readouterr().err
    assert "export failed: quantized formats outside their tolerances, and export.require_all is true" in stderr
    assert "tflite_float16: max |p - p_keras| " in stderr and "Traceback" not in stderr
    assert not (workspace / "models/export").exists() and not (workspace / "metrics").exists()
    assert not list(workspace.glob("models/.export.*"))
