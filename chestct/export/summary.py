"""metrics/summary.json: the headline figures of a run, flat, so `dvc metrics show` and `dvc exp show` fit a screen.

The detailed files (metrics/eval.json, train_phase*.json, export.json) keep every key: `dvc metrics diff` needs
them. This file repeats the dozen figures a reader compares runs by, under short names of its own, so they never
collide with a detailed key and DVC shows them without a file prefix (docs/experiments.md, "Reading experiment tables").
Every key is always written: a figure whose audit was switched off (robustness, histogram matching) or whose
metrics file is absent is null, so the columns stay the same from run to run.
"""

from __future__ import annotations

# Short names: DVC prints a table one column per key, as wide as the longest of name and value. On the test split
# at the validation threshold: AUC with its CI bounds (evaluate.confidence_level), sensitivity, specificity; the
# model's AUC on histogram-matched test images and its worst AUC under the robustness suite; each phase's best
# epoch and the validation AUC there; the formats exported and left out (space-separated names, "none").
SUMMARY_KEYS = (
    "test_auc", "test_auc_low", "test_auc_high", "sensitivity", "specificity", "threshold", "hist_matched_auc",
    "robust_worst_auc", "phase1_best_epoch", "phase1_val_auc", "phase2_best_epoch", "phase2_val_auc", "formats",
    "left_out",
)


def _names(formats: dict) -> str:
    """Format names joined by spaces: one readable table cell (DVC spreads a list over several columns)."""
    return " ".join(formats) or "none"


def build_summary(eval_metrics: dict | None, phase1: dict | None, phase2: dict | None, export_report: dict) -> dict:
    """The SUMMARY_KEYS, in that order, from metrics/eval.json, metrics/train_phase{1,2}.json (None when absent)
    and the export stage's report (what it writes to metrics/export.json: `formats` exported, `left_out`)."""
    evaluation = eval_metrics or {}
    test = evaluation.get("test") or {}
    low, high = test.get("auc_ci") or (None, None)
    phase1, phase2 = phase1 or {}, phase2 or {}
    return {
        "test_auc": test.get("auc"),
        "test_auc_low": low,
        "test_auc_high": high,
        "sensitivity": test.get("sensitivity"),
        "specificity": test.get("specificity"),
        "threshold": (evaluation.get("threshold") or {}).get("threshold"),  # chosen on validation
        "hist_matched_auc": (evaluation.get("shortcut") or {}).get("hist_matched_model_auc"),
        "robust_worst_auc": (evaluation.get("robustness") or {}).get("worst_auc"),
        "phase1_best_epoch": phase1.get("best_epoch"),
        "phase1_val_auc": phase1.get("best_val_auc"),  # the validation AUC at that epoch
        "phase2_best_epoch": phase2.get("best_epoch"),
        "phase2_val_auc": phase2.get("best_val_auc"),
        "formats": _names(export_report["formats"]),
        "left_out": _names(export_report["left_out"]),
    }
