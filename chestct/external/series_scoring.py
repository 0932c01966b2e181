"""Score DICOM series slice by slice with an exported model, and give each series one score.

Every slice is decoded and scored once, exactly as `chestct predict` scores a file (the predictor's decoding,
preprocessing and stored threshold). A series' score is the highest slice probability among the slices whose
lung fields the anatomy finds (`chestct.imaging.anatomy.lung_mask`): a tumour shows on some slices of a series,
not on most, so an average would dilute it, and slices above the apex or below the bases say nothing about the
lungs. When no slice shows lung fields, the score is the maximum over all slices, and the note says so. A series
that cannot be ordered along z (`Series.problems`) gets no series score: its slices are reported one by one,
with the reason.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
from tqdm import tqdm

from chestct.decision import decide
from chestct.external.series import Series, SliceHeader
from chestct.external.validation import error_reason
from chestct.imaging.anatomy import lung_mask
from chestct.imaging.domain import ChestCheck, check_chest_ct

SERIES_RULE = ("the series' score is the highest slice probability among the slices where lung fields are found "
               "(the maximum over all slices when none shows them); each slice is scored on its own")
# The maximum of many slice scores passes a slice threshold more often than one slice does.
THRESHOLD_NOTE = ("the threshold is the model's slice threshold (chosen on single slices of its validation data); "
                  "no series-level operating point has been validated, and the maximum over many slices passes it "
                  "more often than a single slice would")


@dataclass
class SliceScore:
    header: SliceHeader
    probability: float | None = None
    decision: int | None = None
    in_lungs: bool | None = None
    in_domain: bool | None = None  # the domain check: chestct.imaging.domain, then the feature distance
    domain_reason: str | None = None
    error: str | None = None
    image: np.ndarray | None = None  # the model input (S, S, 1), kept when asked for (Grad-CAM, figures)
    gray: np.ndarray | None = None  # the decoded slice, kept when asked for (lesion boxes)

    def to_dict(self) -> dict:
        return {"file": self.header.relative, "sop_instance_uid": self.header.sop_uid, "z": self.header.z,
                "instance_number": self.header.instance_number, "probability": self.probability,
                "decision": self.decision, "in_lungs": self.in_lungs, "in_domain": self.in_domain,
                "domain_reason": self.domain_reason, "error": self.error}


@dataclass
class SeriesScore:
    series: Series
    slices: list[SliceScore]
    score: float | None = None
    decision: int | None = None
    top: SliceScore | None = None  # the slice that gave the score
    note: str = ""
    skipped: list[str] = field(default_factory=list)  # slices left out of the series score, with the reason

    def to_dict(self, threshold: float) -> dict:
        header = self.series.first
        return {"series_instance_uid": self.series.uid, "label": self.series.label, "patient_id": header.patient_id,
                "study_instance_uid": header.study_uid, "series_number": header.series_number,
                "description": header.series_description, "kernel": header.kernel,
                "manufacturer": header.manufacturer, "slices": len(self.slices),
                "score": self.score, "decision": self.decision,
                "diagnosis": None if self.decision is None else ("Cancer" if self.decision else "Normal"),
                "threshold": threshold, "top_slice": None if self.top is None else self.top.to_dict(),
                "rule": SERIES_RULE, "threshold_note": THRESHOLD_NOTE, "note": self.note,
                "problems": list(self.series.problems),
                "skipped": list(self.skipped), "per_slice": [item.to_dict() for item in self.slices]}


def _series_score(result: SeriesScore, threshold: float) -> None:
    """Fill the score, the slice that gave it and the note, from the slices already scored."""
    scored = [item for item in result.slices if item.probability is not None]
    result.skipped = [f"{item.header.relative}: {item.error}" for item in result.slices if item.error]
    if result.series.problems:
        result.note = ("no series score: " + "; ".join(result.series.problems)
                       + ". Each slice is scored on its own below.")
        return
    if not scored:
        result.note = "no series score: no slice could be decoded"
        return
    in_lungs = [item for item in scored if item.in_lungs]
    pool = in_lungs or scored
    result.top = max(pool, key=lambda item: item.probability)
    result.score = result.top.probability
    result.decision = int(decide(result.score, threshold))
    if in_lungs:
        result.note = (f"maximum over the {len(in_lungs)} of {len(scored)} slices where lung fields are found")
    else:
        result.note = f"no slice shows lung fields: maximum over all {len(scored)} slices"
    if result.skipped:
        result.note += f"; {len(result.skipped)} slice(s) could not be decoded and are left out (listed)"


def score_series(predictor, series: Sequence[Series], batch_size: int = 32,
                 keep: bool | Callable[[SliceHeader], bool] = False, progress: bool = True) -> list[SeriesScore]:
    """Every slice of every series scored once (in batches); one SeriesScore per series, in the order given.

    `keep` (True, or a predicate such as "is boxed") chooses the slices whose decoded image and model input stay
    in memory for figures and Grad-CAM; the others are dropped once scored."""
    if batch_size < 1:
        raise ValueError(f"batch size must be at least 1, got {batch_size}")
    results = [SeriesScore(item, [SliceScore(header) for header in item.slices]) for item in series]
    everything = [slice_ for result in results for slice_ in result.slices]
    pending: list[tuple[SliceScore, ChestCheck]] = []
    pending_images: list[np.ndarray] = []

    def flush() -> None:
        if pending:
            outputs = predictor.outputs(np.stack(pending_images))
            distances = predictor.domain_distances(outputs)
            distances = [None] * len(pending) if distances is None else distances
            for (item, check), probability, distance in zip(pending, outputs.scores, distances, strict=True):
                item.probability = float(probability)
                item.decision = int(decide(item.probability, predictor.threshold))
                item.domain_reason = predictor.domain_reason(check, distance)
                item.in_domain = item.domain_reason is None
            pending.clear()
            pending_images.clear()

    for item in tqdm(everything, desc="scoring slices", unit="slice", disable=not progress):
        try:
            gray = predictor.decode(item.header.path, item.header.relative)
            image = predictor.prepare_decoded(gray)
        except Exception as exc:  # noqa: BLE001  (one bad slice never stops the series: it is listed)
            item.error = error_reason(exc, item.header.relative)
            continue
        item.in_lungs = bool(lung_mask(gray).any())
        check = check_chest_ct(gray)
        if keep(item.header) if callable(keep) else keep:
            item.image, item.gray = image, gray
        pending.append((item, check))
        pending_images.append(image)
        if len(pending) >= batch_size:
            flush()
    flush()
    for result in results:
        _series_score(result, predictor.threshold)
    return results
