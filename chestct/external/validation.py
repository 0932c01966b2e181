"""External validation: score a labelled folder of scans with an exported model, with the evaluate stage's metrics.

The official test split is confounded and full of copies of training images, so "how does the model do on *my*
scans?" needs a folder the model has never seen. `evaluate_external` takes such a folder and a label map
(FOLDER=LABEL: which sub-folders hold Normal and which hold Cancer scans), and:

- finds every regular file under the mapped folders (recursively; dotfiles and dot-folders are skipped and
  counted; links, FIFOs, sockets and devices are not followed or read but listed with the reason), lists the
  folders that were not mapped, and refuses a map it cannot honour (one folder under two mappings, compared with
  every link followed) before any model work;
- hashes every file (sha256 of its bytes) to find exact copies, including copies filed under both labels;
- decodes and scores each distinct content once with `chestct.serving.predictor.Predictor` (PNG, JPEG and DICOM, the
  type read from the bytes, the preprocessing and the threshold from the export's metadata). A file that cannot
  be read or decoded is listed with its reason and never stops the run;
- computes `chestct.evaluation.metrics.binary_metrics` (the evaluate stage's metric set) at the stored threshold,
  the ROC band, and an intensity-shortcut AUC by out-of-fold cross-validation on this very set (there is no
  train split here);
- writes metrics.json, predictions.csv and PNGs (`chestct.external.report`) into one folder, atomically.

Without `dedup` every file is a row (a copied image counts once per copy); with it each content is scored once
(the first path in sorted order) and contents filed under both labels are left out as conflicting.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import StratifiedKFold
from tqdm import tqdm

from chestct.decision import DECISION_RULE, decide
from chestct.errors import ChestctError
from chestct.evaluation.domain import selective_figures
from chestct.evaluation.metrics import binary_metrics, roc_band
from chestct.evaluation.shortcuts import fit_shortcut_model, intensity_features
from chestct.export.metadata import MetadataError, read_metadata
from chestct.external.records import (
    ExternalDataError,
    ExternalFile,
    ExternalResult,
    check_classes_present,
    discover_files,
    duplicate_groups,
    duplicate_summary,
    hash_files,
    parse_label_map,
    select_rows,
)
from chestct.external.report import OUTPUT_FILES, gradcam_tiles, write_report
from chestct.imaging.decode import decode_with_colour
from chestct.imaging.domain import ChestCheck, check_chest_ct
from chestct.imaging.files import read_image_file, upload_limit_bytes
from chestct.labels import CLASS_NAMES
from chestct.params import DEFAULT_PARAMS_FILE, load_params
from chestct.serving.predictor import Predictor, decode_limits, resolve_export_dir

REPORT_KIND = "chestct external validation"
DEFAULT_REPORTS_DIR = Path("reports/external")
SHORTCUT_FOLDS = 5

LIMITS = [
    "Each image is scored on its own (single slices, no patient grouping). Slices of one patient are not "
    "independent, so when a folder holds many slices per patient the confidence intervals are narrower than the "
    "evidence supports: read them as optimistic.",
    "The threshold is the one stored with the model (chosen on the project's validation split, or on its "
    "out-of-fold scores over train + valid: the report's threshold.chosen_on says which) and is applied "
    "unchanged: sensitivity and specificity are at that fixed operating point, not re-tuned on this data.",
    "PPV and NPV depend on this set's share of Cancer images, which is rarely the prevalence in practice.",
    "Duplicates are exact byte copies only (sha256); re-saved, resized or re-windowed copies are not detected.",
    "The intensity shortcut AUC is cross-validated on this set itself: a high value means global brightness and "
    "contrast alone separate the folders, so the model's AUC here may measure that rather than disease.",
]


@dataclass(frozen=True)
class Settings:
    confidence_level: float
    bootstrap_resamples: int
    seed: int
    gradcam_images: int
    source: str  # where the values came from

    def to_dict(self) -> dict:
        return {"confidence_level": self.confidence_level, "bootstrap_resamples": self.bootstrap_resamples,
                "seed": self.seed, "gradcam_images": self.gradcam_images, "from": self.source}


@dataclass
class ScoredContents:
    """Results per sha256: a probability, the domain check's reason (None: in domain) and the raw intensity
    (mean, std), or the reason it could not be read."""

    probability: dict[str, float] = field(default_factory=dict)
    domain_reason: dict[str, str | None] = field(default_factory=dict)
    intensity: dict[str, tuple[float, float]] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)


# --- scoring ------------------------------------------------------------------------------------------------


def error_reason(exc: Exception, name: str) -> str:
    """The decoder's message without the file name it starts with (the report shows the name beside it)."""
    text = str(exc) if isinstance(exc, ChestctError) else f"cannot be decoded ({type(exc).__name__}: {exc})"
    return text[len(name) + 2:] if text.startswith(f"{name}: ") else text


def score_contents(predictor, files: Sequence[ExternalFile], digests: dict[str, str], batch_size: int = 32,
                   progress: bool = True) -> ScoredContents:
    """Decode and score every distinct content once, in batches; decoding failures are recorded, not raised.

    The model input comes from `predictor.prepare` (the pipeline's preprocessing, the export's DICOM window and
    pixel limit) on the file's bytes, read within the export's per-file limit (serve.max_upload_mb); the
    intensity features from the decoded grayscale before preprocessing, as the evaluate stage's shortcut audit
    computes them.
    """
    result = ScoredContents()
    pending: list[tuple[str, ChestCheck]] = []
    pending_images: list[np.ndarray] = []

    def flush() -> None:
        if pending_images:
            outputs = predictor.outputs(np.stack(pending_images))
            distances = predictor.domain_distances(outputs)
            distances = [None] * len(pending) if distances is None else distances
            for (digest, check), probability, distance in zip(pending, outputs.scores, distances, strict=True):
                result.probability[digest] = float(probability)
                result.domain_reason[digest] = predictor.domain_reason(check, distance)
            pending.clear()
            pending_images.clear()

    seen: set[str] = set()
    max_bytes = upload_limit_bytes(predictor.serve_params.max_upload_mb)  # the export's limit, as the service's
    for item in tqdm(files, desc="scoring", unit="img", disable=not progress):
        digest = digests.get(item.relative)
        if digest is None or digest in seen:
            continue
        seen.add(digest)
        try:
            data = read_image_file(item.path, item.relative, max_bytes)  # regular files only, bounded
            gray, colour = decode_with_colour(data, item.relative, **decode_limits(predictor.serve_params))
            image = predictor.prepare_decoded(gray)
        except Exception as exc:  # noqa: BLE001  (one bad file never stops the run: it is reported)
            result.errors[digest] = error_reason(exc, item.relative)
            continue
        mean, std = intensity_features([gray])[0]
        result.intensity[digest] = (float(mean), float(std))
        pending.append((digest, check_chest_ct(gray, colour)))
        pending_images.append(image)
        if len(pending_images) >= batch_size:
            flush()
    flush()
    return result


def _check_classes_present(files: Sequence[ExternalFile], label_map: dict[str, int], what: str,
                           skipped: Sequence[dict], unreadable: Sequence[dict] = ()) -> None:
    """check_classes_present, its message extended by the files left out and why (the likely cause)."""
    try:
        check_classes_present(files, label_map, what)
    except ExternalDataError as exc:
        message = str(exc)
        for kind, entries in (("unreadable", unreadable), ("skipped", skipped)):
            if entries:
                shown = "; ".join(f"{entry['file']}: {entry['reason']}" for entry in entries[:5])
                message += f" ({len(entries)} {kind}: {shown})"
        raise ExternalDataError(message) from None


# --- duplicates, rows, metrics ------------------------------------------------------------------------------


def out_of_fold_shortcut(features: np.ndarray, labels: np.ndarray, seed: int) -> dict:
    """AUC of the intensity mean/std rule, each image scored by a model fitted on the other folds only.

    The model is `chestct.evaluation.shortcuts.fit_shortcut_model` (StandardScaler + logistic regression), the one the
    evaluate stage fits on train; k = min(5, smallest class count) stratified folds. None with < 2 of a class.
    """
    labels = np.asarray(labels, dtype=int)
    smallest = int(np.bincount(labels, minlength=2).min())
    if smallest < 2:
        return {"intensity_std_auc": None, "folds": None,
                "method": "not computed: a class has fewer than 2 images, too few to cross-validate"}
    folds = min(SHORTCUT_FOLDS, smallest)
    out_of_fold = np.empty(len(labels), dtype=np.float64)
    splitter = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    for train, test in splitter.split(features, labels):
        out_of_fold[test] = fit_shortcut_model(features[train], labels[train]).predict_proba(features[test])[:, 1]
    return {"intensity_std_auc": float(roc_auc_score(labels, out_of_fold)), "folds": folds,
            "method": f"{folds}-fold out-of-fold logistic regression on per-image intensity mean and std (the "
                      f"decoded grayscale before preprocessing); there is no train split for external data"}


def _outcome(label: int, decision: int) -> str:
    return ("TN", "FP", "FN", "TP")[2 * label + decision]


# --- settings and the output folder -------------------------------------------------------------------------


def resolve_settings(params_path: Path | None, export_dir: Path, resamples: int | None = None,
                     level: float | None = None, seed: int | None = None) -> Settings:
    """evaluate.bootstrap_resamples, evaluate.confidence_level, evaluate.gradcam_images and seed: from the given
    params file, else ./params.yaml when there is one, else the settings the model was evaluated with (recorded in
    its export's metadata.json); flags override."""
    path = params_path if params_path is not None else DEFAULT_PARAMS_FILE
    if params_path is not None or path.is_file():
        params = load_params(path)
        values = {"bootstrap_resamples": params.evaluate.bootstrap_resamples,
                  "confidence_level": params.evaluate.confidence_level, "seed": params.seed,
                  "gradcam_images": params.evaluate.gradcam_images}
        source = str(path)
    else:
        try:
            evaluated_with = read_metadata(export_dir).evaluation
        except MetadataError as exc:
            raise ExternalDataError(f"no params.yaml here and no usable export metadata for the settings ({exc}); "
                                    f"pass --params, or --export-dir to an export folder") from None
        values = {"bootstrap_resamples": evaluated_with.bootstrap_resamples,
                  "confidence_level": evaluated_with.confidence_level, "seed": evaluated_with.seed,
                  "gradcam_images": evaluated_with.gradcam_images}
        source = f"the model's evaluation settings ({export_dir / 'metadata.json'}; no params.yaml here)"
    overrides = {"bootstrap_resamples": resamples, "confidence_level": level, "seed": seed}
    given = {key: value for key, value in overrides.items() if value is not None}
    if given:
        values.update(given)
        source += " with " + ", ".join(f"{key}={value}" for key, value in given.items()) + " from the command line"
    if not 0.0 < values["confidence_level"] < 1.0:
        raise ExternalDataError(f"--level must lie strictly between 0 and 1, got {values['confidence_level']}")
    if values["bootstrap_resamples"] < 1:
        raise ExternalDataError(f"--resamples must be at least 1, got {values['bootstrap_resamples']}")
    return Settings(values["confidence_level"], int(values["bootstrap_resamples"]), int(values["seed"]),
                    int(values["gradcam_images"]), source)


def default_out_dir(data_dir: Path) -> Path:
    return DEFAULT_REPORTS_DIR / Path(data_dir).resolve().name


def check_out_dir(out_dir: Path, data_dir: Path, label_map: dict[str, int]) -> None:
    """Refuse an output folder whose replacement would destroy something that is not an earlier report."""
    out, data = Path(out_dir).resolve(), Path(data_dir).resolve()
    if data.is_relative_to(out):
        raise ExternalDataError(f"--out {out_dir} contains the data folder {data_dir}; the report replaces its "
                                f"folder, so choose a folder outside the data")
    for folder in label_map:
        if out.is_relative_to((data / folder).resolve()):
            raise ExternalDataError(f"--out {out_dir} lies inside the mapped folder {folder!r}: a later run would "
                                    f"score the report's PNGs; choose a folder outside it")
    if out.is_file():
        raise ExternalDataError(f"--out {out_dir} is a file; give a folder for the report")
    if out.is_dir() and any(out.iterdir()):
        try:
            earlier = json.loads((out / "metrics.json").read_text()).get("report") == REPORT_KIND
        except (OSError, ValueError, AttributeError):
            earlier = False
        if not earlier:
            raise ExternalDataError(f"--out {out_dir} exists and is not an earlier external-validation report; "
                                    f"the report replaces its folder, so choose another --out or empty it")


# --- the whole run ------------------------------------------------------------------------------------------


def evaluate_external(data_dir: str | Path, label_map_entries: Sequence[str], export_dir: str | Path | None = None,
                      formats: tuple[str, ...] | None = None, out_dir: str | Path | None = None,
                      dedup: bool = False, params_path: str | Path | None = None, resamples: int | None = None,
                      level: float | None = None, seed: int | None = None, batch_size: int = 32,
                      progress: bool = True, predictor: Predictor | None = None) -> ExternalResult:
    """Score every image under the mapped folders and write the report folder; see the module docstring.
    `predictor`: an already loaded model to score with (the external stage's), instead of loading the export's."""
    data_dir = Path(data_dir)
    if batch_size < 1:
        raise ExternalDataError(f"--batch-size must be at least 1, got {batch_size}")
    # Everything that can be refused is checked before the model is loaded.
    label_map = parse_label_map(label_map_entries, data_dir)
    settings = resolve_settings(None if params_path is None else Path(params_path), resolve_export_dir(export_dir),
                                resamples, level, seed)
    out_dir = Path(out_dir) if out_dir is not None else default_out_dir(data_dir)
    check_out_dir(out_dir, data_dir, label_map)
    found = discover_files(data_dir, label_map)
    _check_classes_present(found.files, label_map, "files", found.skipped)

    if predictor is None:
        predictor = Predictor(export_dir, formats)  # formats None: $CHESTCT_FORMATS or the default order
    digests, read_errors = hash_files(found.files, progress)
    scored = score_contents(predictor, found.files, digests, batch_size, progress)

    unreadable = []
    readable: list[ExternalFile] = []
    for item in found.files:
        reason = read_errors.get(item.relative) or scored.errors.get(digests.get(item.relative, ""))
        if reason is None:
            readable.append(item)
        else:
            unreadable.append({"file": item.relative, "folder": item.folder, "label": item.label, "reason": reason})
    groups = duplicate_groups(readable, digests)
    rows, copies_left_out, conflicting_left_out = select_rows(readable, digests, groups, dedup)
    _check_classes_present(rows, label_map, "readable images", found.skipped, unreadable)

    labels = np.array([item.label for item in rows], dtype=int)
    scores = np.array([scored.probability[digests[item.relative]] for item in rows], dtype=np.float64)
    threshold = predictor.threshold
    decisions = decide(scores, threshold)
    metrics = binary_metrics(labels, scores, threshold, level=settings.confidence_level,
                             resamples=settings.bootstrap_resamples, seed=settings.seed)
    band = roc_band(labels, scores, resamples=settings.bootstrap_resamples, seed=settings.seed,
                    level=settings.confidence_level)
    features = np.array([scored.intensity[digests[item.relative]] for item in rows], dtype=np.float64)
    shortcut = out_of_fold_shortcut(features, labels, settings.seed)
    reasons = [scored.domain_reason[digests[item.relative]] for item in rows]
    in_domain = np.array([reason is None for reason in reasons], bool)
    domain = {"out_of_domain_share": round(float(1.0 - in_domain.mean()), 4),
              "feature_distance": predictor.domain is not None,
              # What abstaining on the flagged images buys: the figures on the images left in domain.
              "selective": selective_figures(labels, scores, threshold, in_domain, settings.confidence_level,
                                             settings.bootstrap_resamples, settings.seed)}

    copies = defaultdict(int)
    for item in readable:
        copies[digests[item.relative]] += 1
    table = [{"file": item.relative, "folder": item.folder, "label": item.label,
              "probability": scores[index], "decision": int(decisions[index]),
              "outcome": _outcome(item.label, int(decisions[index])),
              "in_domain": bool(in_domain[index]), "domain_reason": reasons[index] or "",
              "copies": copies[digests[item.relative]], "sha256": digests[item.relative]}
             for index, item in enumerate(rows)]

    tiles, gradcam_note = gradcam_tiles(predictor, rows, labels, scores, settings.gradcam_images)
    by_folder = {folder: {"label": label, "class": CLASS_NAMES[label], "files": 0, "unreadable": 0, "scored": 0}
                 for folder, label in label_map.items()}
    for item in found.files:
        by_folder[item.folder]["files"] += 1
    for entry in unreadable:
        by_folder[entry["folder"]]["unreadable"] += 1
    for item in rows:
        by_folder[item.folder]["scored"] += 1
    metadata = predictor.metadata
    report = {
        "report": REPORT_KIND,
        "data_dir": str(data_dir),
        "model": {"export_dir": str(predictor.export_dir), "format": predictor.format, "sha256": predictor.sha256,
                  "backbone": metadata.backbone, "weights": metadata.weights,
                  "image_size": predictor.image_size, "load_report": predictor.load_report},
        "threshold": {"value": threshold, "source": str(predictor.export_dir / "metadata.json"),
                      "method": metadata.threshold_method, "chosen_on": metadata.threshold_chosen_on,
                      "decision": DECISION_RULE},
        "label_map": by_folder,
        "settings": {**settings.to_dict(), "dedup": dedup},
        "counts": {"files": len(found.files), "hidden_skipped": found.hidden_skipped, "skipped": len(found.skipped),
                   "unreadable": len(unreadable),
                   "readable": len(readable), "scored": len(rows),
                   "scored_by_class": {name: int((labels == label).sum()) for label, name in enumerate(CLASS_NAMES)},
                   "duplicate_copies_left_out": copies_left_out, "conflicting_files_left_out": conflicting_left_out},
        "metrics": metrics,
        "domain": domain,
        "shortcut": {"model_auc": metrics["auc"], **shortcut},
        "unreadable": unreadable,
        "skipped": found.skipped,
        "ignored": {"folders": found.ignored_folders, "loose_files": found.loose_files,
                    "note": "folders not named in --label-map are not scored; dotfiles and dot-folders are skipped "
                            "unread"},
        "duplicates": duplicate_summary(groups, dedup),
        "gradcam": gradcam_note,
        "limits": LIMITS,
        "outputs": dict(OUTPUT_FILES),
    }
    result = ExternalResult(report, table, labels, scores, out_dir)
    write_report(result, band, tiles)
    return result
