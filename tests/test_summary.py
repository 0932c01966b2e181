"""metrics/summary.json: the run's headline figures, flat, written by the export stage and declared to DVC."""

from __future__ import annotations

import yaml

from chestct.export.summary import SUMMARY_KEYS, build_summary
from tests.conftest import PROJECT_ROOT

EVAL = {
    "threshold": {"threshold": 0.4321, "method": "youden"},
    "test": {"auc": 0.91, "auc_ci": [0.85, 0.96], "sensitivity": 0.88, "specificity": 0.79, "n": 100},
    "valid": {"auc": 0.99},
    "shortcut": {"hist_matched_model_auc": 0.83, "intensity_std_auc": 0.7},
    "robustness": {"worst_auc": 0.74, "worst": "gamma_0.6", "clean_auc": 0.91},
}
PHASE1 = {"best_val_auc": 0.93, "best_epoch": 4, "epochs_run": 10}
PHASE2 = {"best_val_auc": 0.97, "best_epoch": 12, "epochs_run": 20}
EXPORT = {"formats": {"keras": {}, "savedmodel": {}, "tflite_float32": {}}, "left_out": {"tflite_dynamic": {}}}


def test_the_summary_holds_the_headline_figures_under_flat_names_in_a_fixed_order():
    summary = build_summary(EVAL, PHASE1, PHASE2, EXPORT)
    assert tuple(summary) == SUMMARY_KEYS and 12 <= len(summary) <= 16
    assert summary == {
        "test_auc": 0.91, "test_auc_low": 0.85, "test_auc_high": 0.96, "sensitivity": 0.88, "specificity": 0.79,
        "threshold": 0.4321, "hist_matched_auc": 0.83, "robust_worst_auc": 0.74, "phase1_best_epoch": 4,
        "phase1_val_auc": 0.93, "phase2_best_epoch": 12, "phase2_val_auc": 0.97,
        "formats": "keras savedmodel tflite_float32", "left_out": "tflite_dynamic",
    }
    assert all(not isinstance(value, dict | list) for value in summary.values())  # one table cell each


def test_switched_off_audits_and_absent_files_leave_their_keys_null():
    without_audits = {key: value for key, value in EVAL.items() if key != "robustness"} | {"shortcut": {}}
    summary = build_summary(without_audits, None, PHASE2, {"formats": {"keras": {}}, "left_out": {}})
    assert tuple(summary) == SUMMARY_KEYS  # the same columns in every run
    assert summary["hist_matched_auc"] is None and summary["robust_worst_auc"] is None
    assert summary["phase1_best_epoch"] is None and summary["phase2_best_epoch"] == 12
    assert summary["left_out"] == "none" and summary["test_auc"] == 0.91
    nothing = build_summary(None, None, None, {"formats": {}, "left_out": {}})
    assert tuple(nothing) == SUMMARY_KEYS and nothing["test_auc_low"] is None


def _flat_names(tree: dict, prefix: str = "") -> set[str]:
    """The column names DVC gives a metrics file: nested keys joined with dots."""
    names = set()
    for key, value in tree.items():
        names |= _flat_names(value, f"{prefix}{key}.") if isinstance(value, dict) else {f"{prefix}{key}"}
    return names


def test_no_summary_name_collides_with_a_detailed_column():
    """Unique names are what lets `dvc exp show` print them without a metrics/summary.json: prefix."""
    detailed = _flat_names(EVAL) | _flat_names(PHASE1) | _flat_names(EXPORT) | {"test_images"}
    assert "threshold.threshold" in detailed and not detailed & set(SUMMARY_KEYS)


def test_the_export_stage_declares_the_summary_as_an_uncached_metric_and_reads_its_sources():
    export = yaml.safe_load((PROJECT_ROOT / "dvc.yaml").read_text())["stages"]["export"]
    metrics = {name: options for entry in export["metrics"] for name, options in entry.items()}
    assert metrics["metrics/summary.json"] == {"cache": False}  # in git, like the other metrics, for exp show
    assert {"metrics/eval.json", "metrics/train_phase1.json", "metrics/train_phase2.json"} <= set(export["deps"])
