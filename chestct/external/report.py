"""The external-validation report folder: metrics.json, predictions.csv, the PNGs, and the summary printed at the end.

The charts are the evaluate stage's (`chestct.evaluation.plots`), so an external ROC reads like the test one. The folder
is written under a temporary name and renamed into place, so it appears complete or not at all.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure  # the object API: no pyplot, no display backend, no global state

from chestct.atomic_io import atomic_path, write_json
from chestct.errors import ChestctError
from chestct.evaluation import plots
from chestct.evaluation.scoring import gradcam_selection
from chestct.external.records import ExternalFile, ExternalResult

OUTPUT_FILES = {"metrics": "metrics.json", "predictions": "predictions.csv", "roc": "roc.png",
                "scores": "scores.png", "gradcam": "gradcam_errors.png"}
CSV_COLUMNS = ("file", "folder", "label", "probability", "decision", "outcome", "in_domain", "domain_reason", "copies",
               "sha256")
_CAPTION_CHARS = 26
_LISTED = 10  # unreadable and skipped files printed one by one (metrics.json lists them all)


def _short(name: str, limit: int = _CAPTION_CHARS) -> str:
    return name if len(name) <= limit else "..." + name[-(limit - 3):]


def error_selection(labels: np.ndarray, scores: np.ndarray, threshold: float, count: int) -> list[tuple[int, str]]:
    """Up to `count` errors, FP (highest probability first) and FN (lowest first) taken in turn."""
    picks = gradcam_selection(labels, scores, threshold, len(scores))
    return [pick for pick in picks if pick[1] in ("FP", "FN")][:count]


def gradcam_tiles(predictor, rows: Sequence[ExternalFile], labels: np.ndarray, scores: np.ndarray,
                  count: int) -> tuple[list[tuple[np.ndarray, str]], dict]:
    """Grad-CAM overlays of the most confident errors, and what metrics.json says about them (with the reason
    when there are none: no Grad-CAM for the loaded format, no errors, or evaluate.gradcam_images is 0)."""
    note = {"file": OUTPUT_FILES["gradcam"], "tiles": 0, "shown": [], "reason": None,
            "selection": "the most confident errors: false positives with the highest probability and false "
                         "negatives with the lowest, taken in turn"}
    if count <= 0:
        return [], {**note, "reason": "evaluate.gradcam_images is 0"}
    if not predictor.gradcam_available:
        return [], {**note, "reason": f"Grad-CAM needs a Keras model; the loaded format is {predictor.format} "
                                      f"(--formats keras,h5 prefers one)"}
    picks = error_selection(labels, scores, predictor.threshold, count)
    if not picks:
        return [], {**note, "reason": "no errors at the stored threshold"}
    # The overlay lives with Grad-CAM, which imports TensorFlow: only needed when there are tiles to draw.
    from chestct.evaluation.gradcam import overlay

    chosen, images = [], []
    for index, kind in picks:
        try:
            images.append(predictor.prepare(rows[index].path, rows[index].relative))
        except ChestctError:  # the file changed since it was scored: leave the tile out
            continue
        chosen.append((index, kind))
    if not chosen:
        return [], {**note, "reason": "the selected files could no longer be read"}
    heatmaps = predictor.heatmaps(np.stack(images))
    tiles = [(overlay(image, heatmap), f"{kind} p={scores[index]:.2f}\n{_short(rows[index].relative)}")
             for (index, kind), image, heatmap in zip(chosen, images, heatmaps, strict=True)]
    shown = [{"file": rows[index].relative, "outcome": kind, "probability": float(scores[index])}
             for index, kind in chosen]
    return tiles, {**note, "tiles": len(tiles), "shown": shown}


def message_png(path: Path, title: str, message: str) -> None:
    """A small PNG that says why a chart is empty, so the report folder always holds the same files."""
    figure = Figure(figsize=(6.4, 2.4))
    axis = figure.subplots()
    axis.axis("off")
    axis.text(0.5, 0.5, message, ha="center", va="center", wrap=True, fontsize=10)
    axis.set_title(title)
    with atomic_path(path) as temp:
        figure.savefig(temp, dpi=100, format="png", bbox_inches="tight")


def write_csv(path: Path, table: list[dict]) -> None:
    with atomic_path(path) as temp:
        # Default float formatting writes each probability's shortest round-trip repr: nothing is rounded away.
        pd.DataFrame(table, columns=list(CSV_COLUMNS)).to_csv(temp, index=False)


def write_report(result: ExternalResult, band: dict, tiles: list[tuple[np.ndarray, str]]) -> None:
    """Every output into result.out_dir, atomically (an earlier report there is replaced as a whole)."""
    report, metrics = result.report, result.report["metrics"]
    threshold = report["threshold"]["value"]
    with atomic_path(result.out_dir) as folder:
        folder.mkdir()
        write_json(folder / OUTPUT_FILES["metrics"], report)
        write_csv(folder / OUTPUT_FILES["predictions"], result.table)
        plots.roc_png(folder / OUTPUT_FILES["roc"], band, {"external": (result.labels, result.scores)},
                           {"external": metrics}, threshold, primary="external")
        plots.score_histogram_png(folder / OUTPUT_FILES["scores"], result.labels, result.scores, threshold,
                                       set_name="external")
        if tiles:
            plots.gradcam_grid_png(folder / OUTPUT_FILES["gradcam"], tiles,
                                        title="Grad-CAM of the most confident errors (at the stored threshold)")
        else:
            message_png(folder / OUTPUT_FILES["gradcam"], "Grad-CAM of the most confident errors",
                        f"no tiles: {report['gradcam']['reason']}")


# --- the summary printed at the end -------------------------------------------------------------------------


def _value(value: float | None, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _with_ci(value: float | None, ci: list[float] | None) -> str:
    return _value(value) + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "")


def summary_lines(result: ExternalResult) -> list[str]:
    report = result.report
    metrics, counts, threshold = report["metrics"], report["counts"], report["threshold"]
    model, shortcut, duplicates = report["model"], report["shortcut"], report["duplicates"]
    level = report["settings"]["confidence_level"]
    ignored = report["ignored"]["folders"]
    lines = [
        f"external validation of {report['data_dir']}: "
        + ", ".join(f"{folder!r} -> {entry['class']}" for folder, entry in report["label_map"].items())
        + (f"; ignored: {', '.join(repr(entry['folder']) for entry in ignored)}" if ignored else ""),
        f"model: {model['format']} {model['sha256'][:12]} from {model['export_dir']}, threshold "
        f"{threshold['value']:.4f} ({threshold['method'] or 'method not recorded'}, chosen on "
        f"{threshold['chosen_on'] or '?'}; stored in the export, not tuned here)",
        f"scored n={metrics['n']} ({metrics['n_normal']} Normal, {metrics['n_cancer']} Cancer) of {counts['files']} "
        f"files; {counts['unreadable']} unreadable, {counts['skipped']} skipped (links, non-regular files), "
        f"{counts['hidden_skipped']} hidden skipped",
        f"AUC          {_with_ci(metrics['auc'], metrics['auc_ci'])}  ({level:.0%} CI, "
        f"{report['settings']['bootstrap_resamples']} stratified bootstrap resamples)",
        f"sensitivity  {_with_ci(metrics['sensitivity'], metrics['sensitivity_ci'])}  "
        f"(TP {metrics['tp']}, FN {metrics['fn']}; Wilson CI, at threshold {threshold['value']:.4f})",
        f"specificity  {_with_ci(metrics['specificity'], metrics['specificity_ci'])}  "
        f"(TN {metrics['tn']}, FP {metrics['fp']})",
        f"PPV {_value(metrics['ppv'])}  NPV {_value(metrics['npv'])}  DOR {_value(metrics['dor'], 2)}  "
        f"Brier {_value(metrics['brier'])}",
    ]
    selective = report["domain"]["selective"]
    lines.append(f"domain check: {report['domain']['out_of_domain_share']:.1%} flagged out of domain; on the "
                 f"{selective['covered']} left (coverage {_value(selective['coverage'])}): AUC "
                 f"{_value(selective['auc'])}, sensitivity {_value(selective['sensitivity'])}, specificity "
                 f"{_value(selective['specificity'])}")
    shortcut_auc, model_auc = shortcut["intensity_std_auc"], shortcut["model_auc"]
    line = f"intensity shortcut AUC {_value(shortcut_auc)}"
    line += f" ({shortcut['folds']}-fold out-of-fold mean/std rule)" if shortcut["folds"] else " (too few images)"
    if shortcut_auc is not None and model_auc is not None and shortcut_auc >= model_auc:
        line += ": brightness alone does as well as the model on this set"
    lines.append(line)
    duplicate_line = (f"duplicates: {duplicates['groups']} exact groups ({duplicates['files_in_groups']} files), "
                      f"{duplicates['cross_label_groups']} across labels")
    if duplicates["dedup"]:
        duplicate_line += (f"; --dedup left out {counts['duplicate_copies_left_out']} copies and "
                           f"{counts['conflicting_files_left_out']} conflicting files")
    elif duplicates["groups"]:
        duplicate_line += "; every copy scored (--dedup scores each content once)"
    lines.append(duplicate_line)
    for kind in ("unreadable", "skipped"):
        for entry in report[kind][:_LISTED]:
            lines.append(f"{kind}: {entry['file']}: {entry['reason']}")
        if len(report[kind]) > _LISTED:
            lines.append(f"{kind}: ... {len(report[kind]) - _LISTED} more in metrics.json")
    if report["gradcam"]["reason"]:
        lines.append(f"Grad-CAM: no tiles: {report['gradcam']['reason']}")
    lines.append(f"report: {result.out_dir}/ ({', '.join(report['outputs'].values())})")
    return lines
