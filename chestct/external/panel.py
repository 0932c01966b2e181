"""The cross-source panel: every set declared under `external.sets` scored with the exported model.

Each set is scored exactly as `chestct predict` scores files (the export's predictor: its decoding, preprocessing
and stored threshold). Nothing is chosen on these sets: no threshold, no epoch, no calibration. They measure.

Kinds:
- `labelled`: class folders with a label map, scored by `chestct evaluate-external` itself (its report folder goes
  under plots/external/<set>/): AUC with its CI, sensitivity and specificity at the stored threshold.
- `normal_only`: any folder of normal scans: specificity with its Wilson interval, and the score distribution.
- `annotated_series`: DICOM series with Pascal VOC boxes named by SOPInstanceUID. Per series, boxed slices
  against the other slices of the same series (same patient, scanner, kernel and storage: only the tumour
  differs); the same slice under two reconstruction kernels; Grad-CAM mass inside the box.

`metrics/external.json` holds one flat section per set (`<set>.<figure>`), for `dvc metrics diff` and
`dvc exp show`; the details (every file's score, what was skipped and why) go to plots/external/<set>/.
"""

from __future__ import annotations

import csv
import os
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from sklearn.metrics import roc_auc_score

from chestct.atomic_io import atomic_path, write_json
from chestct.decision import decide
from chestct.errors import ChestctError
from chestct.evaluation.metrics import wilson_interval
from chestct.evaluation.plots import gradcam_grid_png, score_histogram_png
from chestct.external.batch import list_inputs, score_inputs
from chestct.external.boxes import BoxFileError, read_box_files
from chestct.external.records import ExternalDataError, walk_files
from chestct.external.series import SAME_POSITION_MM, Series, list_series
from chestct.external.series_plots import z_profile_png
from chestct.external.series_scoring import SeriesScore, SliceScore, score_series
from chestct.external.validation import evaluate_external
from chestct.imaging.anatomy import mask_share
from chestct.imaging.files import upload_limit_bytes
from chestct.imaging.preprocess import carry_region
from chestct.params import ExternalSetParams

SCORE_QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95)
OUTLINE_KERNEL = cv2.getStructuringElement(cv2.MORPH_CROSS, (3, 3))  # a region less its eroded self: its outline


class PanelError(ChestctError, ValueError):
    """A declared set cannot be scored; the message names the set, the file and what to do."""


@dataclass(frozen=True)
class PanelSettings:
    confidence_level: float
    bootstrap_resamples: int
    seed: int
    gradcam_images: int
    params_file: Path  # handed to evaluate-external for the same settings
    batch_size: int = 32
    progress: bool = True


def _round(value: float | None, digits: int = 6) -> float | None:
    return None if value is None else round(float(value), digits)


def resolve_set_folder(entry: ExternalSetParams, root: Path) -> Path:
    """The set's folder (relative paths are relative to the project root); PanelError when it is not one."""
    folder = Path(entry.path) if os.path.isabs(entry.path) else root / entry.path
    if not folder.exists():
        raise PanelError(f"external set {entry.name!r}: path {entry.path} does not exist (resolved to {folder}); "
                         f"fix external.sets in params.yaml or remove the set")
    if not folder.is_dir():
        raise PanelError(f"external set {entry.name!r}: path {entry.path} is a file; give the folder that holds "
                         f"the set's images")
    return folder


def _relative(path: str | Path, folder: Path) -> str:
    return Path(os.path.relpath(path, folder)).as_posix()


def _skipped_entries(listing_skipped: Sequence[tuple[Path, str]], folder: Path) -> list[dict]:
    return [{"file": _relative(path, folder), "reason": reason} for path, reason in listing_skipped]


# --- labelled: evaluate-external's own run ------------------------------------------------------------------


def score_labelled(entry: ExternalSetParams, folder: Path, predictor, out_dir: Path,
                   settings: PanelSettings) -> tuple[dict, dict]:
    try:
        result = evaluate_external(folder, entry.label_map, export_dir=predictor.export_dir, out_dir=out_dir,
                                   params_path=settings.params_file, batch_size=settings.batch_size,
                                   progress=settings.progress, predictor=predictor)
    except ExternalDataError as exc:
        raise PanelError(f"external set {entry.name!r} ({entry.path}): {exc}") from None
    metrics = result.report["metrics"]
    figures = {"kind": entry.kind, "n": metrics["n"], "auc": _round(metrics["auc"]), "auc_ci": metrics["auc_ci"],
               "sensitivity": _round(metrics["sensitivity"]), "sensitivity_ci": metrics["sensitivity_ci"],
               "specificity": _round(metrics["specificity"]), "specificity_ci": metrics["specificity_ci"],
               "out_of_domain_share": result.report["domain"]["out_of_domain_share"],
               "in_domain": _selective(result.report["domain"]["selective"]),
               "skipped": result.report["counts"]["skipped"] + result.report["counts"]["unreadable"]}
    return figures, {"report": str(out_dir / "metrics.json")}


# --- normal_only ----------------------------------------------------------------------------------------------


def score_normal_only(entry: ExternalSetParams, folder: Path, predictor, out_dir: Path,
                      settings: PanelSettings) -> tuple[dict, dict]:
    # The batch scoring of `chestct predict DIR --csv`: one row per file, with its probability or its error.
    rows = score_inputs(predictor, list_inputs([folder]), settings.batch_size, settings.progress)
    scored = [(_relative(row["file"], folder), float(row["probability"])) for row in rows if not row["error"]]
    skipped = [{"file": _relative(row["file"], folder), "reason": row["error"]} for row in rows if row["error"]]
    if not scored:
        shown = "; ".join(f"{item['file']}: {item['reason']}" for item in skipped[:5])
        raise PanelError(f"external set {entry.name!r}: no image under {folder} could be scored"
                         + (f" ({len(skipped)} files left out: {shown})" if skipped else " (the folder is empty)"))
    scores = np.array([probability for _, probability in scored])
    decisions = decide(scores, predictor.threshold)
    normals_called_normal = int((decisions == 0).sum())
    in_domain = np.array([row["in_domain"] for row in rows if not row["error"]], bool)
    quantiles = np.quantile(scores, SCORE_QUANTILES)
    figures = {"kind": entry.kind, "n": len(scores),
               "specificity": _round(normals_called_normal / len(scores)),
               "specificity_ci": wilson_interval(normals_called_normal, len(scores), settings.confidence_level),
               "false_positives": int(len(scores) - normals_called_normal),
               "score_mean": _round(scores.mean()),
               **{f"score_p{int(q * 100):02d}": _round(value) for q, value in zip(SCORE_QUANTILES, quantiles,
                                                                                   strict=True)},
               # The domain check (chestct.imaging.domain, then the feature distance): the share it flags, and
               # the specificity on the slices it passes (None when it passes none).
               "out_of_domain_share": _round(1.0 - in_domain.mean()),
               "coverage": _round(in_domain.mean()),
               "specificity_in_domain": _round(float((decisions[in_domain] == 0).mean())) if in_domain.any() else None,
               "skipped": len(skipped)}
    with atomic_path(out_dir / "scores.csv") as temp, open(temp, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["file", "probability", "decision"])
        for (name, probability), decision in zip(scored, decisions, strict=True):
            writer.writerow([name, f"{probability:.6g}", int(decision)])
    score_histogram_png(out_dir / "scores.png", np.zeros(len(scores), int), scores, predictor.threshold,
                        set_name=entry.name)
    return figures, {"skipped": skipped}


# --- annotated_series -----------------------------------------------------------------------------------------


def _within_series(result: SeriesScore, boxed: set[str]) -> dict:
    scored = [item for item in result.slices if item.probability is not None]
    labels = np.array([item.header.sop_uid in boxed for item in scored], int)
    probabilities = np.array([item.probability for item in scored])
    decisions = np.array([item.decision for item in scored], int)
    n_boxed, n_other = int(labels.sum()), int(len(labels) - labels.sum())
    auc = float(roc_auc_score(labels, probabilities)) if n_boxed and n_other else None
    return {"slices": len(scored), "boxed": n_boxed, "other": n_other, "auc": _round(auc),
            "auc_note": None if auc is not None else "not defined: the series needs boxed and other slices",
            "lesion_sensitivity": _round(decisions[labels == 1].mean()) if n_boxed else None,
            "other_slices_positive_rate": _round(decisions[labels == 0].mean()) if n_other else None,
            "kernel": result.series.first.kernel, "problems": result.series.problems}


def _series_in_domain(results: Sequence[SeriesScore], boxed: set[str]) -> dict:
    """The series figures on the slices the domain check passes: coverage, the mean within-series AUC over the
    series that keep boxed and other slices, the lesion sensitivity and the other slices' positive rate."""
    kept = [SeriesScore(result.series, [item for item in result.slices if item.in_domain]) for result in results]
    scored = [item for result in results for item in result.slices if item.probability is not None]
    within = [_within_series(result, boxed) for result in kept]
    defined = [values["auc"] for values in within if values["auc"] is not None]
    boxed_kept = [item for result in kept for item in result.slices
                  if item.probability is not None and item.header.sop_uid in boxed]
    other_kept = [item for result in kept for item in result.slices
                  if item.probability is not None and item.header.sop_uid not in boxed]
    return {"coverage": _round(np.mean([bool(item.in_domain) for item in scored])) if scored else None,
            "within_series_auc": _round(np.mean(defined)) if defined else None,
            "lesion_sensitivity": _round(np.mean([item.decision for item in boxed_kept])) if boxed_kept else None,
            "other_slices_positive_rate": _round(np.mean([item.decision for item in other_kept]))
            if other_kept else None}


def _selective(figures: dict) -> dict:
    """chestct.evaluation.domain.selective_figures as the panel reports them."""
    return {"coverage": figures["coverage"], "auc": _round(figures["auc"]),
            "sensitivity": _round(figures["sensitivity"]), "specificity": _round(figures["specificity"])}


def kernel_pairs(results: Sequence[SeriesScore]) -> list[tuple[SeriesScore, SeriesScore, list[tuple]]]:
    """Series of one patient and study with different ConvolutionKernel, their slices paired by table position
    (|dz| <= SAME_POSITION_MM): [(first, second, [(slice of first, slice of second), ...])]."""
    groups: dict[tuple[str, str], list[SeriesScore]] = defaultdict(list)
    for result in results:
        if result.series.profiled:
            groups[(result.series.first.patient_id, result.series.first.study_uid)].append(result)
    pairs = []
    for members in groups.values():
        for index, first in enumerate(members):
            for second in members[index + 1:]:
                if first.series.first.kernel == second.series.first.kernel:
                    continue
                by_z = sorted(second.slices, key=lambda item: item.header.z)
                positions = np.array([item.header.z for item in by_z])
                matched = []
                for item in first.slices:
                    nearest = int(np.argmin(np.abs(positions - item.header.z)))
                    if abs(positions[nearest] - item.header.z) <= SAME_POSITION_MM:
                        matched.append((item, by_z[nearest]))
                if matched:
                    pairs.append((first, second, matched))
    return pairs


def _kernel_figures(pairs) -> tuple[dict, dict]:
    per_pair, differences, agreements = {}, [], []
    for first, second, matched in pairs:
        both = [(a, b) for a, b in matched if a.probability is not None and b.probability is not None]
        difference = [abs(a.probability - b.probability) for a, b in both]
        agreement = [a.decision == b.decision for a, b in both]
        differences += difference
        agreements += agreement
        per_pair[f"{first.series.label}~{second.series.label}"] = {
            "slices": len(both), "mean_abs_diff": _round(np.mean(difference)) if both else None,
            "agreement": _round(np.mean(agreement)) if both else None}
    return ({"kernel_pairs": len(per_pair), "kernel_paired_slices": len(differences),
             "kernel_mean_abs_diff": _round(np.mean(differences)) if differences else None,
             "kernel_agreement": _round(np.mean(agreements)) if agreements else None}, per_pair)


def _box_region(item: SliceScore, boxes) -> np.ndarray:
    region = np.zeros(item.gray.shape, bool)
    for box in boxes:
        region |= box.mask(item.gray.shape)
    return region


def _usable_and_regions(predictor, boxed_slices: Sequence[SliceScore], boxes: dict):
    """The boxed slices kept with their input and decoded image, and each one's box in the model input's geometry."""
    usable = [item for item in boxed_slices if item.image is not None and item.gray is not None]
    regions = [carry_region(item.gray, _box_region(item, boxes[item.header.sop_uid][1]),
                            predictor.preprocess_params) for item in usable]
    return usable, regions


def _in_box(maps, usable: Sequence[SliceScore], regions: list[np.ndarray], count: int, name: str):
    """(mean share of the maps' mass inside the boxes or None, a note, overlay tiles of up to `count` slices)."""
    from chestct.evaluation.gradcam import overlay  # TensorFlow, only when there are maps to draw

    shares = [mask_share(heatmap, region) for heatmap, region in zip(maps, regions, strict=True)]
    defined = [share for share in shares if share is not None]
    tiles = []
    for item, heatmap, region, share in list(zip(usable, maps, regions, shares, strict=True))[:count]:
        tile = overlay(item.image, heatmap)
        outline = region & ~cv2.erode(region.astype(np.uint8), OUTLINE_KERNEL).astype(bool)
        tile[outline] = (255, 255, 255)  # the box, in the model input's geometry
        caption = f"p={item.probability:.2f} in box {'n/a' if share is None else f'{share:.2f}'}"
        tiles.append((tile, caption))
    note = f"{len(defined)} boxed slices with a non-zero {name}"
    return (_round(np.mean(defined)) if defined else None), note, tiles


def gradcam_in_box(predictor, boxed_slices: Sequence[SliceScore], boxes: dict, count: int
                   ) -> tuple[dict, list[tuple[np.ndarray, str]]]:
    """Mean share of Grad-CAM mass inside the box over the boxed slices, the share a uniform map would give (the
    box's share of the model input), and overlay tiles of up to `count` boxed slices with the box drawn."""
    usable, regions = _usable_and_regions(predictor, boxed_slices, boxes)
    if not usable:
        return {"in_box_gradcam_share": None, "in_box_area_share": None,
                "in_box_note": "no boxed slice could be scored"}, []
    if not predictor.gradcam_available:
        return {"in_box_gradcam_share": None, "in_box_area_share": None,
                "in_box_note": f"Grad-CAM needs a Keras model; the loaded format is {predictor.format}"}, []
    heatmaps = predictor.heatmaps(np.stack([item.image for item in usable]))
    share, note, tiles = _in_box(heatmaps, usable, regions, count, "Grad-CAM map")
    return {"in_box_gradcam_share": share, "in_box_area_share": _round(np.mean([region.mean() for region in regions])),
            "in_box_note": note}, tiles


def lesion_map_in_box(predictor, boxed_slices: Sequence[SliceScore], boxes: dict, count: int
                      ) -> tuple[dict, list[tuple[np.ndarray, str]]]:
    """As `gradcam_in_box`, for the model's own lesion map (a lesion-map model; None figures otherwise)."""
    usable, regions = _usable_and_regions(predictor, boxed_slices, boxes)
    if not predictor.has_lesion_map or not usable:
        why = "the model has no lesion map" if not predictor.has_lesion_map else "no boxed slice could be scored"
        return {"in_box_lesion_map_share": None, "lesion_map_note": why}, []
    _, maps = predictor.probabilities_and_maps(np.stack([item.image for item in usable]))
    share, note, tiles = _in_box(maps, usable, regions, count, "lesion map")
    return {"in_box_lesion_map_share": share, "lesion_map_note": note}, tiles


def _slices_csv(path: Path, results: Sequence[SeriesScore], boxed: set[str]) -> None:
    with atomic_path(path) as temp, open(temp, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["series", "z", "file", "boxed", "in_lungs", "probability", "decision", "error"])
        for result in results:
            for item in result.slices:
                writer.writerow([result.series.label, item.header.z, item.header.relative,
                                 int(item.header.sop_uid in boxed), item.in_lungs,
                                 "" if item.probability is None else f"{item.probability:.6g}",
                                 "" if item.decision is None else item.decision, item.error or ""])


def _series_with_problems(series: Sequence[Series]) -> list[dict]:
    return [{"series": item.label, "uid": item.uid, "problems": item.problems} for item in series if item.problems]


def score_annotated_series(entry: ExternalSetParams, folder: Path, predictor, out_dir: Path,
                           settings: PanelSettings) -> tuple[dict, dict]:
    listing = walk_files(folder)
    xml_files = [path for path in listing.files if path.suffix.lower() == ".xml"]
    slice_files = [path for path in listing.files if path.suffix.lower() != ".xml"]
    try:
        boxes = read_box_files([(path, _relative(path, folder)) for path in xml_files])
    except BoxFileError as exc:
        raise PanelError(f"external set {entry.name!r}: {exc}") from None
    found = list_series(slice_files, folder, upload_limit_bytes(predictor.serve_params.max_upload_mb))
    if not found.series:
        raise PanelError(f"external set {entry.name!r}: no DICOM slice under {folder} ({len(slice_files)} other "
                         f"files); an annotated_series set holds DICOM series and their Pascal VOC boxes")
    slice_uids = {header.sop_uid for item in found.series for header in item.slices}
    orphans = [{"file": shown, "reason": f"names the slice {uid}, which is not in the set: its box is not used"}
               for uid, (shown, _) in sorted(boxes.items()) if uid not in slice_uids]
    boxed = {uid for uid in boxes if uid in slice_uids}
    if not boxed:
        first = orphans[0]["file"] if orphans else None
        raise PanelError(f"external set {entry.name!r}: no box matches a slice"
                         + (f" ({len(orphans)} XML files, e.g. {first}, name no SOPInstanceUID of the set's slices: "
                            f"each must be named <SOPInstanceUID>.xml)" if orphans else
                            " (no Pascal VOC .xml file under the set)"))

    def is_boxed(header) -> bool:
        return header.sop_uid in boxed

    results = score_series(predictor, found.series, settings.batch_size, keep=is_boxed, progress=settings.progress)
    per_series = {result.series.label: _within_series(result, boxed) for result in results}
    defined = [values["auc"] for values in per_series.values() if values["auc"] is not None]
    scored = [item for result in results for item in result.slices if item.probability is not None]
    boxed_scored = [item for item in scored if is_boxed(item.header)]
    other_scored = [item for item in scored if not is_boxed(item.header)]
    skipped = (_skipped_entries(listing.skipped, folder) + orphans
               + _skipped_entries(found.not_dicom, folder)
               + [{"file": item.header.relative, "reason": item.error} for result in results
                  for item in result.slices if item.error])
    if not scored:
        raise PanelError(f"external set {entry.name!r}: no slice could be decoded ({skipped[0]['file']}: "
                         f"{skipped[0]['reason']})")
    kernel, per_pair = _kernel_figures(kernel_pairs(results))
    attention, tiles = gradcam_in_box(predictor, boxed_scored, boxes, settings.gradcam_images)
    lesion_attention, lesion_tiles = lesion_map_in_box(predictor, boxed_scored, boxes, settings.gradcam_images)
    attention |= lesion_attention
    figures = {"kind": entry.kind, "n": len(scored), "series": len(results), "boxed_slices": len(boxed_scored),
               "within_series_auc": _round(np.mean(defined)) if defined else None,
               "within_series_auc_per_series": {label: values["auc"] for label, values in per_series.items()},
               "lesion_sensitivity": _round(np.mean([item.decision for item in boxed_scored]))
               if boxed_scored else None,
               "other_slices_positive_rate": _round(np.mean([item.decision for item in other_scored]))
               if other_scored else None,
               **kernel, "in_box_gradcam_share": attention["in_box_gradcam_share"],
               "in_box_lesion_map_share": attention["in_box_lesion_map_share"],
               "in_box_area_share": attention["in_box_area_share"],
               "out_of_domain_share": _round(np.mean([not item.in_domain for item in scored])),
               "in_domain": _series_in_domain(results, boxed),
               "skipped": len(skipped)}
    _slices_csv(out_dir / "slices.csv", results, boxed)
    z_profile_png(out_dir / "z_profile.png", results, predictor.threshold, boxed,
                  title=f"{entry.name}: slice probability along z (red: boxed tumour slices)")
    if tiles:
        gradcam_grid_png(out_dir / "gradcam_boxed.png", tiles,
                         title=f"{entry.name}: Grad-CAM on boxed slices (white: the tumour box)")
    if lesion_tiles:
        gradcam_grid_png(out_dir / "lesion_map_boxed.png", lesion_tiles,
                         title=f"{entry.name}: the model's lesion map on boxed slices (white: the tumour box)")
    details = {"per_series": per_series, "kernel_pairs": per_pair, "attention": attention,
               "series_problems": _series_with_problems(found.series), "skipped": skipped,
               "series_rule": "each slice is scored on its own; within-series AUC compares the boxed slices of a "
                              "series with its other slices"}
    return figures, details


SCORERS = {"labelled": score_labelled, "normal_only": score_normal_only, "annotated_series": score_annotated_series}


# --- the whole panel -------------------------------------------------------------------------------------------


def check_sets(sets: Sequence[ExternalSetParams], root: Path) -> dict[str, Path]:
    """Every set's folder, checked before any model work (a bad path stops the stage at once)."""
    return {entry.name: resolve_set_folder(entry, root) for entry in sets}


def run_panel(sets: Sequence[ExternalSetParams], predictor, plots_dir: Path, settings: PanelSettings,
              root: Path = Path(".")) -> tuple[dict, dict]:
    """Score every set; returns (metrics: {set: flat figures}, details: {set: what was skipped and why, ...})."""
    folders = check_sets(sets, root)
    metrics, details = {}, {}
    for entry in sets:
        out_dir = plots_dir / entry.name
        out_dir.mkdir(parents=True, exist_ok=True)
        print(f"external: {entry.name} ({entry.kind}) from {entry.path}", flush=True)
        metrics[entry.name], details[entry.name] = SCORERS[entry.kind](entry, folders[entry.name], predictor,
                                                                      out_dir, settings)
        write_json(out_dir / "report.json", {"set": entry.model_dump(mode="json"), "figures": metrics[entry.name],
                                             **details[entry.name]})
    return metrics, details


def summary_line(name: str, figures: dict) -> str:
    def shown(key: str) -> str:
        value = figures.get(key)
        return "n/a" if value is None else f"{value:.3f}"

    if figures["kind"] == "annotated_series":
        return (f"external: {name}: {figures['n']} slices in {figures['series']} series, {figures['boxed_slices']} "
                f"boxed; within-series AUC {shown('within_series_auc')}, lesion sensitivity "
                f"{shown('lesion_sensitivity')}, other slices called Cancer {shown('other_slices_positive_rate')}, "
                f"kernel agreement {shown('kernel_agreement')} (mean |dp| {shown('kernel_mean_abs_diff')}), "
                f"Grad-CAM in box {shown('in_box_gradcam_share')}, lesion map in box "
                f"{shown('in_box_lesion_map_share')} (box area {shown('in_box_area_share')})")
    if figures["kind"] == "normal_only":
        return f"external: {name}: {figures['n']} normal images, specificity {shown('specificity')}"
    return (f"external: {name}: {figures['n']} images, AUC {shown('auc')}, sensitivity {shown('sensitivity')}, "
            f"specificity {shown('specificity')}")
