"""Unlabelled batch prediction (`chestct predict DIR --csv out.csv`): the counterpart of external validation.

Every regular file under the folders given (recursively, listed as evaluate-external lists them: dotfiles skipped
and counted, links and special files not followed but reported) and every file named is decoded with the
predictor's preprocessing and scored in batches. Each file becomes one CSV row: its probability and decision at
the export's threshold, or the reason it could not be read. One bad file never stops the run.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from chestct.atomic_io import atomic_path
from chestct.errors import ChestctError
from chestct.external.records import walk_files
from chestct.external.validation import error_reason

CSV_COLUMNS = ("file", "probability", "probability_calibrated", "diagnosis", "threshold", "in_domain",
               "domain_reason", "model_format", "model_sha256", "error")


class BatchPredictionError(ChestctError, ValueError):
    """The CSV cannot be written where asked, or nothing under the inputs could be scored."""


@dataclass
class Inputs:
    files: list[Path] = field(default_factory=list)  # to score, in order: named files, then each folder's, sorted
    skipped: list[tuple[Path, str]] = field(default_factory=list)  # links, special files, unlistable folders
    hidden: int = 0  # dotfiles and dot-folders under the folders given


def list_inputs(paths: Sequence[Path]) -> Inputs:
    """Folders expanded to the regular files under them; anything else kept as named (a missing file becomes a
    row with its error rather than stopping the listing)."""
    inputs = Inputs()
    for path in paths:
        if os.path.isdir(path):  # not Path.is_dir: it raises on a name too long for the file system
            listing = walk_files(path)
            inputs.files.extend(listing.files)
            inputs.skipped.extend(listing.skipped)
            inputs.hidden += listing.hidden
        else:
            inputs.files.append(path)
    return inputs


def check_csv_target(path: Path) -> None:
    """Refuse, before any model work, a CSV path that cannot be written."""
    if path.is_dir():
        raise BatchPredictionError(f"--csv {path} is a folder; give a file name such as {path / 'predictions.csv'}")
    parent = path.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise BatchPredictionError(f"--csv {path}: cannot create its folder ({exc.strerror or exc}); choose another "
                                   f"place") from None
    if not os.access(parent, os.W_OK | os.X_OK):
        raise BatchPredictionError(f"--csv {path}: the folder {parent} is not writable by this user; choose another "
                                   f"place")


def _scored_row(predictor, path: Path, image: np.ndarray, probability: float, check,
                distance: float | None) -> dict:
    prediction = predictor.decide(str(path), image, float(probability), domain=check, distance=distance)
    return {"file": str(path), "probability": prediction.cancer_probability,
            "probability_calibrated": prediction.cancer_probability_calibrated, "diagnosis": prediction.diagnosis,
            "threshold": prediction.threshold, "in_domain": prediction.in_domain,
            "domain_reason": prediction.domain_reason or "", "model_format": prediction.model_format,
            "model_sha256": prediction.model_sha256, "error": ""}


def _error_row(path: Path, reason: str) -> dict:
    return {"file": str(path), "probability": "", "probability_calibrated": "", "diagnosis": "", "threshold": "",
            "in_domain": "", "domain_reason": "", "model_format": "", "model_sha256": "", "error": reason}


def score_inputs(predictor, inputs: Inputs, batch_size: int = 32, progress: bool = True) -> list[dict]:
    """One row per file (in listing order) and per skipped entry (after them); images go to the model
    `batch_size` at a time, so memory holds one batch of decoded images however large the folder."""
    if batch_size < 1:
        raise BatchPredictionError(f"--batch-size must be at least 1, got {batch_size}")
    rows: list[dict | None] = [None] * len(inputs.files)
    pending: list[tuple[int, tuple]] = []  # (row, (image, domain check))

    def flush() -> None:
        if pending:
            outputs = predictor.outputs(np.stack([image for _, (image, _) in pending]))
            distances = predictor.domain_distances(outputs)
            distances = [None] * len(pending) if distances is None else distances
            for (index, (image, check)), probability, distance in zip(pending, outputs.scores, distances,
                                                                      strict=True):
                refused = predictor.refusal(distance)  # the first layer refused in inspect(), before the model
                rows[index] = (_error_row(inputs.files[index], refused) if refused else
                               _scored_row(predictor, inputs.files[index], image, probability, check, distance))
            pending.clear()

    for index, path in enumerate(tqdm(inputs.files, desc="scoring", unit="img", disable=not progress)):
        try:
            pending.append((index, predictor.inspect(path, str(path))))
        except Exception as exc:  # noqa: BLE001  (one bad file never stops the run: its row says why)
            rows[index] = _error_row(path, error_reason(exc, str(path)))  # the file column shows the name
            continue
        if len(pending) >= batch_size:
            flush()
    flush()
    return [*rows, *(_error_row(path, reason) for path, reason in inputs.skipped)]


def write_predictions_csv(path: Path, rows: Sequence[dict]) -> None:
    """The CSV, written completely or not at all; probabilities keep every digit (Python's shortest repr)."""
    with atomic_path(path) as temp, open(temp, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=CSV_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
