"""External validation: score a labelled folder of scans with an exported model, with the evaluate stage's metrics.

The official test split is confounded and full of copies of training images, so "how does the model do on *my*
scans?" needs a folder the model has never seen. `evaluate_external` takes such a folder and a label map
(FOLDER=LABEL: which sub-folders hold Normal and which hold Cancer scans), and:

- finds every file under the mapped folders (recursively; dotfiles and dot-folders are skipped and counted),
  lists the folders that were not mapped, and refuses a map it cannot honour before any model work;
- hashes every file (sha256 of its bytes) to find exact copies, including copies filed under both labels;
- decodes and scores each distinct content once with `chestct.predictor.Predictor` (PNG, JPEG and DICOM, the
  type read from the bytes, the preprocessing and the threshold from the export's metadata). A file that cannot
  be read or decoded is listed with its reason and never stops the run;
- computes `chestct.clinical_metrics.binary_metrics` (the evaluate stage's metric set) at the stored threshold,
  the ROC band, and an intensity-shortcut AUC by out-of-fold cross-validation on this very set (there is no
  train split here);
- writes metrics.json, predictions.csv and PNGs (`chestct.external_report`) into one folder, atomically.

Without `dedup` every file is a row (a copied image counts once per copy); with it each content is scored once
(the first path in sorted order) and contents filed under both labels are left out as conflicting.
"""

from __future__ import annotations

import hashlib
import os
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import numpy as np

from chestct.errors import ChestctError
from chestct.labels import CANCER, CLASS_NAMES, NORMAL

REPORT_KIND = "chestct external validation"
DEFAULT_REPORTS_DIR = Path("reports/external")
# When no params.yaml is found (the command run outside the project), the evaluate stage's defaults.
FALLBACK_SETTINGS = {"bootstrap_resamples": 2000, "confidence_level": 0.95, "seed": 42, "gradcam_images": 8}
SHORTCUT_FOLDS = 5
LABEL_WORDS = {"0": NORMAL, "normal": NORMAL, "1": CANCER, "cancer": CANCER}
_HASH_CHUNK = 1 << 20
_GROUP_LIST_LIMIT = 500  # duplicate groups listed one by one in metrics.json (all are counted)

LIMITS = [
    "Each image is scored on its own (single slices, no patient grouping). Slices of one patient are not "
    "independent, so when a folder holds many slices per patient the confidence intervals are narrower than the "
    "evidence supports: read them as optimistic.",
    "The threshold is the one stored with the model (chosen on the project's validation split) and is applied "
    "unchanged: sensitivity and specificity are at that fixed operating point, not re-tuned on this data.",
    "PPV and NPV depend on this set's share of Cancer images, which is rarely the prevalence in practice.",
    "Duplicates are exact byte copies only (sha256); re-saved, resized or re-windowed copies are not detected.",
    "The intensity shortcut AUC is cross-validated on this set itself: a high value means global brightness and "
    "contrast alone separate the folders, so the model's AUC here may measure that rather than disease.",
]


class ExternalDataError(ChestctError, ValueError):
    """The external folder, its label map or the output folder cannot be used; the message says what to do."""


@dataclass(frozen=True)
class ExternalFile:
    path: Path  # data_dir / relative
    relative: str  # posix path relative to data_dir: what the report and the CSV show
    folder: str  # the label-map folder it was found under
    label: int


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
class Discovery:
    files: list[ExternalFile]
    hidden_skipped: int
    ignored_folders: list[dict]  # {"folder": relative path, "files": count}
    loose_files: int  # regular files beside the mapped folders, in no mapped folder


@dataclass
class ScoredContents:
    """Results per sha256: a probability and the raw intensity (mean, std), or the reason it could not be read."""

    probability: dict[str, float] = field(default_factory=dict)
    intensity: dict[str, tuple[float, float]] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)


# --- the label map and the files ----------------------------------------------------------------------------


def _child_folders(folder: Path) -> list[str]:
    return sorted(entry.name for entry in folder.iterdir() if entry.is_dir() and not entry.name.startswith("."))


def parse_label_map(entries: Sequence[str], data_dir: Path) -> dict[str, int]:
    """["Normal cases=0", "Malignant cases=cancer"] -> {"Normal cases": 0, "Malignant cases": 1}.

    A folder is a path relative to `data_dir` (a direct child, or nested like "test/Normal") that must exist;
    a label is 0/normal or 1/cancer (any case). Both classes must be mapped and no folder may lie in another.
    """
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise ExternalDataError(f"{data_dir}: folder not found; give the folder that holds the class folders")
    if not entries:
        raise ExternalDataError('no --label-map given: name the folders, e.g. --label-map "Normal cases=0" '
                                '"Malignant cases=1"')
    mapping: dict[str, int] = {}
    for entry in entries:
        if "=" not in entry:
            raise ExternalDataError(f"label map entry {entry!r} has no '=': write FOLDER=LABEL, e.g. "
                                    f'"Normal cases=0" "Malignant cases=1"')
        folder_text, _, label_text = entry.rpartition("=")
        label_word = label_text.strip().lower()
        if label_word not in LABEL_WORDS:
            raise ExternalDataError(f"label map entry {entry!r}: unknown label {label_text.strip()!r}; use 0 or "
                                    f"normal for Normal, 1 or cancer for Cancer")
        relative = PurePosixPath(folder_text.strip().replace(os.sep, "/"))
        if not folder_text.strip() or relative.is_absolute() or ".." in relative.parts or relative.as_posix() == ".":
            raise ExternalDataError(f"label map entry {entry!r}: the folder must be a sub-folder of {data_dir}, "
                                    f"written relative to it (e.g. \"Normal cases\" or \"test/Normal\")")
        key = relative.as_posix()
        if not (data_dir / key).is_dir():
            present = _child_folders(data_dir)
            shown = ", ".join(repr(name) for name in present[:20]) + (" ..." if len(present) > 20 else "")
            raise ExternalDataError(f"label map folder {key!r} is not a folder in {data_dir} (folders there: "
                                    f"{shown or 'none'}); check the spelling, names are matched exactly")
        label = LABEL_WORDS[label_word]
        if mapping.get(key, label) != label:
            raise ExternalDataError(f"label map folder {key!r} is mapped to both Normal and Cancer; map it once")
        mapping[key] = label
    keys = sorted(mapping)
    for outer in keys:
        for inner in keys:
            if inner != outer and PurePosixPath(inner).is_relative_to(outer):
                raise ExternalDataError(f"label map folders {outer!r} and {inner!r} overlap (one lies inside the "
                                        f"other); map only one of them")
    missing = [CLASS_NAMES[label] for label in (NORMAL, CANCER) if label not in mapping.values()]
    if missing:
        raise ExternalDataError(f"the label map names no {missing[0]} folder; map at least one folder to each "
                                f"class (0/normal and 1/cancer)")
    return mapping


def _is_hidden(name: str) -> bool:
    return name.startswith(".")


def _walk_files(folder: Path) -> tuple[list[Path], int]:
    """Every non-hidden file entry under `folder` (sorted, links to files included) and the hidden entries skipped."""
    found: list[Path] = []
    hidden = 0
    for root, dirnames, filenames in os.walk(folder):
        hidden += sum(_is_hidden(name) for name in dirnames) + sum(_is_hidden(name) for name in filenames)
        dirnames[:] = sorted(name for name in dirnames if not _is_hidden(name))
        found.extend(Path(root) / name for name in filenames if not _is_hidden(name))
    return sorted(found), hidden


def discover_files(data_dir: Path, label_map: dict[str, int]) -> Discovery:
    """The files under the mapped folders (sorted by relative path), and what was left aside."""
    data_dir = Path(data_dir)
    files: list[ExternalFile] = []
    hidden = 0
    for folder, label in label_map.items():
        paths, skipped = _walk_files(data_dir / folder)
        hidden += skipped
        files.extend(ExternalFile(path, path.relative_to(data_dir).as_posix(), folder, label) for path in paths)
    files.sort(key=lambda item: item.relative)

    # Folders beside the mapped ones: children of data_dir and of every folder on the way to a nested mapping.
    mapped = {PurePosixPath(folder) for folder in label_map}
    on_the_way = {parent for folder in mapped for parent in folder.parents}  # includes PurePosixPath(".")
    ignored, loose = [], 0
    for parent in sorted(on_the_way):
        for entry in sorted((data_dir / parent).iterdir()):
            relative = PurePosixPath(entry.relative_to(data_dir).as_posix())
            if _is_hidden(entry.name) or relative in mapped or relative in on_the_way:
                continue
            if entry.is_dir():
                ignored.append({"folder": relative.as_posix(), "files": len(_walk_files(entry)[0])})
            else:
                loose += 1
    return Discovery(files, hidden, ignored, loose)


def check_classes_present(files: Sequence[ExternalFile], label_map: dict[str, int], what: str = "files") -> None:
    for label in (NORMAL, CANCER):
        if not any(item.label == label for item in files):
            folders = ", ".join(repr(folder) for folder, value in label_map.items() if value == label)
            raise ExternalDataError(f"no {what} under {folders} (mapped to {CLASS_NAMES[label]}): both Normal and "
                                    f"Cancer need images to validate a classifier")


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(_HASH_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def hash_files(files: Sequence[ExternalFile], progress: bool = True) -> tuple[dict[str, str], dict[str, str]]:
    """sha256 per relative path, and the reason for each file that could not be read at all."""
    from tqdm import tqdm

    digests, errors = {}, {}
    for item in tqdm(files, desc="hashing", unit="file", disable=not progress):
        if not item.path.is_file():
            errors[item.relative] = "not a regular file (a broken link, a socket or a device)"
            continue
        try:
            digests[item.relative] = sha256_of(item.path)
        except OSError as exc:
            errors[item.relative] = f"cannot be read ({exc.strerror or exc})"
    return digests, errors


# --- scoring ------------------------------------------------------------------------------------------------


def _reason(exc: Exception, name: str) -> str:
    """The decoder's message without the file name it starts with (the report shows the name beside it)."""
    text = str(exc) if isinstance(exc, ChestctError) else f"cannot be decoded ({type(exc).__name__}: {exc})"
    return text[len(name) + 2:] if text.startswith(f"{name}: ") else text


def score_contents(predictor, files: Sequence[ExternalFile], digests: dict[str, str], batch_size: int = 32,
                   progress: bool = True) -> ScoredContents:
    """Decode and score every distinct content once, in batches; decoding failures are recorded, not raised.

    The model input comes from `predictor.prepare` (the pipeline's preprocessing, the export's DICOM window and
    pixel limit); the intensity features from the decoded grayscale before preprocessing, as the evaluate
    stage's shortcut audit computes them.
    """
    from tqdm import tqdm

    from chestct.imaging import decode_grayscale
    from chestct.shortcuts import intensity_features

    result = ScoredContents()
    pending_digests: list[str] = []
    pending_images: list[np.ndarray] = []

    def flush() -> None:
        if pending_images:
            probabilities = predictor.probabilities(np.stack(pending_images))
            for digest, probability in zip(pending_digests, probabilities, strict=True):
                result.probability[digest] = float(probability)
            pending_digests.clear()
            pending_images.clear()

    seen: set[str] = set()
    for item in tqdm(files, desc="scoring", unit="img", disable=not progress):
        digest = digests.get(item.relative)
        if digest is None or digest in seen:
            continue
        seen.add(digest)
        try:
            data = item.path.read_bytes()
            image = predictor.prepare(data, item.relative)
            gray = decode_grayscale(data, item.relative, max_pixels=predictor.serve_params.max_pixels,
                                    dicom_window=predictor.serve_params.dicom_window)
        except Exception as exc:  # noqa: BLE001  (one bad file never stops the run: it is reported)
            result.errors[digest] = _reason(exc, item.relative)
            continue
        mean, std = intensity_features([gray])[0]
        result.intensity[digest] = (float(mean), float(std))
        pending_digests.append(digest)
        pending_images.append(image)
        if len(pending_images) >= batch_size:
            flush()
    flush()
    return result


# --- duplicates, rows, metrics ------------------------------------------------------------------------------


def duplicate_groups(files: Sequence[ExternalFile], digests: dict[str, str]) -> dict[str, list[ExternalFile]]:
    """sha256 -> the files (two or more, sorted) that share those bytes."""
    by_digest: dict[str, list[ExternalFile]] = defaultdict(list)
    for item in files:
        by_digest[digests[item.relative]].append(item)
    return {digest: members for digest, members in by_digest.items() if len(members) > 1}


def duplicate_summary(groups: dict[str, list[ExternalFile]], dedup: bool) -> dict:
    cross = {digest for digest, members in groups.items() if len({item.label for item in members}) > 1}
    listed = sorted(groups.items(), key=lambda pair: pair[1][0].relative)
    return {
        "method": "sha256 of the file bytes (exact copies only)",
        "groups": len(groups),
        "files_in_groups": sum(len(members) for members in groups.values()),
        "extra_copies": sum(len(members) - 1 for members in groups.values()),
        "cross_label_groups": len(cross),
        "cross_label_files": sum(len(groups[digest]) for digest in cross),
        "dedup": dedup,
        "handling": ("each content scored once (the first path in sorted order); contents filed under both "
                     "labels left out as conflicting") if dedup else
                    ("every copy scored as its own row (a copied image weighs more than once); --dedup scores "
                     "each content once"),
        "group_list": [{"sha256": digest, "files": [item.relative for item in members],
                        "labels": sorted({CLASS_NAMES[item.label] for item in members}),
                        "cross_label": digest in cross} for digest, members in listed[:_GROUP_LIST_LIMIT]],
        "group_list_truncated": len(listed) > _GROUP_LIST_LIMIT,
    }


def select_rows(readable: Sequence[ExternalFile], digests: dict[str, str], groups: dict[str, list[ExternalFile]],
                dedup: bool) -> tuple[list[ExternalFile], int, int]:
    """The files that become rows, the copies left out and the conflicting files left out (dedup only)."""
    if not dedup:
        return list(readable), 0, 0
    conflicting = {digest for digest, members in groups.items() if len({item.label for item in members}) > 1}
    rows, seen, copies, conflicts = [], set(), 0, 0
    for item in readable:  # sorted by relative path: the first path of each content is kept
        digest = digests[item.relative]
        if digest in conflicting:
            conflicts += 1
        elif digest in seen:
            copies += 1
        else:
            seen.add(digest)
            rows.append(item)
    return rows, copies, conflicts


def out_of_fold_shortcut(features: np.ndarray, labels: np.ndarray, seed: int) -> dict:
    """AUC of the intensity mean/std rule, each image scored by a model fitted on the other folds only.

    The model is `chestct.shortcuts.fit_shortcut_model` (StandardScaler + logistic regression), the one the
    evaluate stage fits on train; k = min(5, smallest class count) stratified folds. None with < 2 of a class.
    """
    from sklearn.metrics import roc_auc_score
    from sklearn.model_selection import StratifiedKFold

    from chestct.shortcuts import fit_shortcut_model

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


def error_selection(labels: np.ndarray, scores: np.ndarray, threshold: float, count: int) -> list[tuple[int, str]]:
    """Up to `count` errors, FP (highest probability first) and FN (lowest first) taken in turn."""
    from chestct.evaluation import gradcam_selection  # imports keras: only called when Grad-CAM is available

    picks = gradcam_selection(labels, scores, threshold, len(scores))
    return [pick for pick in picks if pick[1] in ("FP", "FN")][:count]


def _outcome(label: int, decision: int) -> str:
    return ("TN", "FP", "FN", "TP")[2 * label + decision]


# --- settings and the output folder -------------------------------------------------------------------------


def resolve_settings(params_path: Path | None, resamples: int | None = None, level: float | None = None,
                     seed: int | None = None) -> Settings:
    """evaluate.bootstrap_resamples, evaluate.confidence_level, evaluate.gradcam_images and seed from params.yaml
    (the given file, else ./params.yaml when there is one, else the stage's defaults), flags overriding."""
    from chestct.params import DEFAULT_PARAMS_FILE, load_params

    path = params_path if params_path is not None else DEFAULT_PARAMS_FILE
    if params_path is not None or path.is_file():
        params = load_params(path)
        values = {"bootstrap_resamples": params.evaluate.bootstrap_resamples,
                  "confidence_level": params.evaluate.confidence_level, "seed": params.seed,
                  "gradcam_images": params.evaluate.gradcam_images}
        source = str(path)
    else:
        values, source = dict(FALLBACK_SETTINGS), "built-in defaults (no params.yaml here)"
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
    import json

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


@dataclass
class ExternalResult:
    report: dict  # what metrics.json holds
    table: list[dict]  # the CSV rows
    labels: np.ndarray
    scores: np.ndarray
    out_dir: Path


def evaluate_external(data_dir: str | Path, label_map_entries: Sequence[str], export_dir: str | Path | None = None,
                      formats: tuple[str, ...] | None = None, out_dir: str | Path | None = None,
                      dedup: bool = False, params_path: str | Path | None = None, resamples: int | None = None,
                      level: float | None = None, seed: int | None = None, batch_size: int = 32,
                      progress: bool = True) -> ExternalResult:
    """Score every image under the mapped folders and write the report folder; see the module docstring."""
    from chestct.clinical_metrics import binary_metrics, roc_band
    from chestct.external_report import OUTPUT_FILES, gradcam_tiles, write_report
    from chestct.predictor import Predictor
    from chestct.thresholds import predict

    data_dir = Path(data_dir)
    if batch_size < 1:
        raise ExternalDataError(f"--batch-size must be at least 1, got {batch_size}")
    # Everything that can be refused is checked before the model is loaded.
    label_map = parse_label_map(label_map_entries, data_dir)
    settings = resolve_settings(None if params_path is None else Path(params_path), resamples, level, seed)
    out_dir = Path(out_dir) if out_dir is not None else default_out_dir(data_dir)
    check_out_dir(out_dir, data_dir, label_map)
    found = discover_files(data_dir, label_map)
    check_classes_present(found.files, label_map)

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
    try:
        check_classes_present(rows, label_map, "readable images")
    except ExternalDataError as exc:
        shown = "; ".join(f"{entry['file']}: {entry['reason']}" for entry in unreadable[:5])
        raise ExternalDataError(f"{exc}" + (f" ({len(unreadable)} unreadable: {shown})" if unreadable else "")) \
            from None

    labels = np.array([item.label for item in rows], dtype=int)
    scores = np.array([scored.probability[digests[item.relative]] for item in rows], dtype=np.float64)
    threshold = predictor.threshold
    decisions = predict(scores, threshold)
    metrics = binary_metrics(labels, scores, threshold, level=settings.confidence_level,
                             resamples=settings.bootstrap_resamples, seed=settings.seed)
    band = roc_band(labels, scores, resamples=settings.bootstrap_resamples, seed=settings.seed,
                    level=settings.confidence_level)
    features = np.array([scored.intensity[digests[item.relative]] for item in rows], dtype=np.float64)
    shortcut = out_of_fold_shortcut(features, labels, settings.seed)

    copies = defaultdict(int)
    for item in readable:
        copies[digests[item.relative]] += 1
    table = [{"file": item.relative, "folder": item.folder, "label": item.label,
              "probability": scores[index], "decision": int(decisions[index]),
              "outcome": _outcome(item.label, int(decisions[index])),
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
                  "backbone": metadata.get("backbone"), "weights": metadata.get("weights"),
                  "image_size": predictor.image_size, "load_report": predictor.load_report},
        "threshold": {"value": threshold, "source": str(predictor.export_dir / "metadata.json"),
                      "method": metadata.get("threshold_method"), "chosen_on": metadata.get("threshold_chosen_on"),
                      "decision": "Cancer when probability >= threshold"},
        "label_map": by_folder,
        "settings": {**settings.to_dict(), "dedup": dedup},
        "counts": {"files": len(found.files), "hidden_skipped": found.hidden_skipped, "unreadable": len(unreadable),
                   "readable": len(readable), "scored": len(rows),
                   "scored_by_class": {name: int((labels == label).sum()) for label, name in enumerate(CLASS_NAMES)},
                   "duplicate_copies_left_out": copies_left_out, "conflicting_files_left_out": conflicting_left_out},
        "metrics": metrics,
        "shortcut": {"model_auc": metrics["auc"], **shortcut},
        "unreadable": unreadable,
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
