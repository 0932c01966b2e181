"""The evaluation's pictures: data files that `dvc plots` renders, and PNGs a person opens first.

`dvc plots show` writes HTML that loads vega from a CDN (blank offline), so every chart also exists as a PNG.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure  # the object API: no pyplot, no display backend, no global state
from sklearn.calibration import calibration_curve
from sklearn.metrics import precision_recall_curve, roc_curve

from chestct.atomic_io import atomic_path
from chestct.calibration import CalibrationMap
from chestct.decision import decide
from chestct.evaluation.calibration import expected_calibration_error, reliability_curve
from chestct.labels import CLASS_NAMES


def _save(figure: Figure, path: Path) -> None:
    with atomic_path(path) as temp:
        figure.savefig(temp, dpi=100, format="png", bbox_inches="tight")


def _save_csv(table: pd.DataFrame, path: Path) -> None:
    with atomic_path(path) as temp:
        table.to_csv(temp, index=False, float_format="%.6g")


def write_plot_data(folder: Path, splits: dict[str, tuple[np.ndarray, np.ndarray]], threshold: float,
                    calibration_bins: int = 10) -> None:
    """roc_<split>.csv, pr_<split>.csv, calibration_<split>.csv and confusion.csv (test) for `dvc plots`."""
    for split, (labels, scores) in splits.items():
        fpr, tpr, _ = roc_curve(labels, scores)
        _save_csv(pd.DataFrame({"fpr": fpr, "tpr": tpr}), folder / f"roc_{split}.csv")
        precision, recall, _ = precision_recall_curve(labels, scores)
        _save_csv(pd.DataFrame({"recall": recall, "precision": precision}), folder / f"pr_{split}.csv")
        observed, predicted = calibration_curve(labels, scores, n_bins=calibration_bins, strategy="uniform")
        _save_csv(pd.DataFrame({"mean_predicted": predicted, "fraction_cancer": observed}),
                  folder / f"calibration_{split}.csv")
    labels, scores = splits["test"]
    decisions = decide(scores, threshold)
    _save_csv(pd.DataFrame({"actual": [CLASS_NAMES[i] for i in labels],
                            "predicted": [CLASS_NAMES[i] for i in decisions]}), folder / "confusion.csv")


def write_image_scores(path: Path, ids: np.ndarray, labels: np.ndarray, scores: np.ndarray, groups: np.ndarray,
                       threshold: float, calibration: CalibrationMap) -> None:
    """One row per image of a split: its id, label, near-duplicate group, score, calibrated probability and
    decision at the threshold, for reading the errors or comparing the scores with another set's afterwards."""
    _save_csv(pd.DataFrame({"id": ids, "label": [CLASS_NAMES[i] for i in labels], "near_group": groups,
                            "score": scores, "probability_calibrated": calibration.apply(scores),
                            "decision": [CLASS_NAMES[i] for i in decide(scores, threshold)]}), path)


def roc_png(path: Path, band: dict, curves: dict[str, tuple[np.ndarray, np.ndarray]], metrics: dict,
            threshold: float, primary: str = "test") -> None:
    """The `primary` set's ROC with its bootstrap band, other curves (validation), and the operating point
    chosen on validation."""
    figure = Figure(figsize=(5.6, 5.2))
    axis = figure.subplots()
    axis.fill_between(band["fpr"], band["tpr_low"], band["tpr_high"], color="tab:blue", alpha=0.2,
                      label=f"{primary} {band.get('level', 0.95):.0%} bootstrap band")
    for split, (labels, scores) in curves.items():
        fpr, tpr, _ = roc_curve(labels, scores)
        auc = metrics[split]["auc"]
        ci = metrics[split]["auc_ci"]
        label = f"{split}: AUC {auc:.3f}" + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "")
        axis.plot(fpr, tpr, color="tab:blue" if split == primary else "tab:orange", label=label)
    test = metrics[primary]
    axis.plot(1 - test["specificity"], test["sensitivity"], "o", color="black", markersize=8,
              label=f"operating point (t={threshold:.3f}): sens {test['sensitivity']:.3f}, "
                    f"spec {test['specificity']:.3f}")
    axis.plot([0, 1], [0, 1], ":", color="gray")
    axis.set_xlabel("1 - specificity (false positive rate)")
    axis.set_ylabel("sensitivity (true positive rate)")
    axis.set_title("ROC (threshold chosen on validation)")
    axis.legend(loc="lower right", fontsize=8)
    _save(figure, path)


def score_histogram_png(path: Path, labels: np.ndarray, scores: np.ndarray, threshold: float,
                        set_name: str = "test") -> None:
    figure = Figure(figsize=(6.4, 3.8))
    axis = figure.subplots()
    bins = np.linspace(0, 1, 41)
    for label, name in enumerate(CLASS_NAMES):
        axis.hist(scores[labels == label], bins=bins, alpha=0.6, label=f"{name} (n={int((labels == label).sum())})")
    axis.axvline(threshold, color="black", linestyle="--", label=f"threshold {threshold:.3f}")
    axis.set_xlabel("predicted cancer probability")
    axis.set_ylabel(f"{set_name} images")
    axis.set_title(f"{set_name.capitalize()} scores per class")
    axis.legend()
    _save(figure, path)


def confusion_png(path: Path, metrics: dict) -> None:
    cells = np.array([[metrics["tn"], metrics["fp"]], [metrics["fn"], metrics["tp"]]])
    figure = Figure(figsize=(4.4, 4))
    axis = figure.subplots()
    axis.imshow(cells, cmap="Blues")
    for row in range(2):
        for column in range(2):
            axis.text(column, row, str(cells[row, column]), ha="center", va="center", fontsize=16,
                      color="white" if cells[row, column] > cells.max() / 2 else "black")
    axis.set_xticks([0, 1], [f"predicted {n}" for n in CLASS_NAMES])
    axis.set_yticks([0, 1], [f"actual {n}" for n in CLASS_NAMES])
    axis.set_title(f"Test confusion matrix (n={metrics['n']})")
    _save(figure, path)


def calibration_png(path: Path, labels: np.ndarray, scores: np.ndarray, calibration: CalibrationMap,
                    bins: int = 10) -> None:
    """The test reliability curve before and after calibration (equal-mass bins), with each ECE."""
    figure = Figure(figsize=(5, 5))
    axis = figure.subplots()
    axis.plot([0, 1], [0, 1], ":", color="gray", label="perfect calibration")
    curves = {"model score (uncalibrated)": np.asarray(scores, float)}
    if calibration.calibrated:
        curves[f"calibrated ({calibration.method})"] = calibration.apply(scores)
    for name, probabilities in curves.items():
        predicted, observed, _ = reliability_curve(labels, probabilities, bins)
        ece = expected_calibration_error(labels, probabilities, bins)
        axis.plot(predicted, observed, "o-", label=f"{name}, ECE {ece:.3f}")
    axis.set_xlabel("mean predicted cancer probability")
    axis.set_ylabel("fraction of cancer images")
    axis.set_title(f"Calibration on test ({bins} equal-mass bins)")
    axis.legend(fontsize=8)
    _save(figure, path)


def write_calibrated_reliability(folder: Path, labels: np.ndarray, scores: np.ndarray, calibration: CalibrationMap,
                                 bins: int) -> None:
    """reliability_test_uncalibrated.csv and reliability_test_calibrated.csv for `dvc plots`: the test reliability
    curve (equal-mass bins) of the model's score and of the calibrated probability."""
    for name, probabilities in (("uncalibrated", np.asarray(scores, float)), ("calibrated", calibration.apply(scores))):
        predicted, observed, counts = reliability_curve(labels, probabilities, bins)
        _save_csv(pd.DataFrame({"mean_predicted": predicted, "fraction_cancer": observed, "images": counts}),
                  folder / f"reliability_test_{name}.csv")


def gradcam_grid_png(path: Path, tiles: list[tuple[np.ndarray, str]], columns: int = 4,
                     title: str = "Grad-CAM on test images (TP/FP/TN/FN at the validation threshold)") -> None:
    """Overlays (S, S, 3) uint8 with a caption each, e.g. 'TP p=0.97'."""
    rows = max(1, int(np.ceil(len(tiles) / columns)))
    figure = Figure(figsize=(columns * 2.4, rows * 2.6))
    axes = np.atleast_1d(figure.subplots(rows, columns)).ravel()
    for axis in axes:
        axis.axis("off")
    for axis, (image, caption) in zip(axes, tiles, strict=False):
        axis.imshow(image)
        axis.set_title(caption, fontsize=8)
    figure.suptitle(title)
    _save(figure, path)


def robustness_csv(path: Path, report: dict) -> None:
    """One row per perturbation (AUC with its CI, sensitivity, specificity), for `dvc plots`."""
    rows = [{"perturbation": name, "auc": entry["auc"],
             "auc_low": entry["auc_ci"][0] if entry["auc_ci"] else None,
             "auc_high": entry["auc_ci"][1] if entry["auc_ci"] else None,
             "sensitivity": entry["sensitivity"], "specificity": entry["specificity"]}
            for name, entry in report["perturbations"].items()]
    _save_csv(pd.DataFrame(rows, columns=["perturbation", "auc", "auc_low", "auc_high", "sensitivity",
                                          "specificity"]), path)


def robustness_png(path: Path, report: dict, level: float) -> None:
    """Test AUC per perturbation with its bootstrap interval, against the clean test AUC."""
    names = list(report["perturbations"])
    entries = [report["perturbations"][name] for name in names]
    figure = Figure(figsize=(6.4, 0.32 * len(names) + 1.6))
    axis = figure.subplots()
    positions = np.arange(len(names))
    aucs = np.array([np.nan if e["auc"] is None else e["auc"] for e in entries])
    low = np.array([np.nan if not e["auc_ci"] else e["auc_ci"][0] for e in entries])
    high = np.array([np.nan if not e["auc_ci"] else e["auc_ci"][1] for e in entries])
    axis.barh(positions, aucs, color="tab:blue", alpha=0.7)
    axis.errorbar(aucs, positions, xerr=[aucs - low, high - aucs], fmt="none", ecolor="black", capsize=2)
    if report.get("clean_auc") is not None:
        axis.axvline(report["clean_auc"], color="tab:green", linestyle="--",
                     label=f"clean test AUC {report['clean_auc']:.3f}")
    axis.axvline(0.5, color="grey", linestyle=":", label="chance")
    axis.set_yticks(positions, names, fontsize=8)
    axis.invert_yaxis()
    axis.set_xlim(0.0, 1.0)
    axis.set_xlabel(f"test ROC AUC ({level:.0%} bootstrap interval)")
    axis.set_title("Acquisition robustness: each perturbation applied to the raw image")
    axis.legend(loc="lower left", fontsize=8)
    _save(figure, path)
