"""DICOM series: the slices under a folder (any layout), grouped by SeriesInstanceUID, ordered along z, checked.

A series is only a series when its slices can be put in order along the patient's axis: every slice an axial
slice (ImageOrientationPatient close to rows along x and columns along y), every slice with a table position
(ImagePositionPatient), one position per slice, one image size, and more than one slice. A series that fails any
of these keeps its slices (each can still be scored on its own) and carries the reasons it is not a series, so a
caller never averages or profiles what cannot be ordered. Only headers are read here (no pixel data).
"""

from __future__ import annotations

import io
import os
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom

from chestct.imaging.dicom import looks_like_dicom
from chestct.imaging.files import read_image_file

AXIAL_TOLERANCE = 0.05  # largest deviation of a direction cosine from the axial one (about 3 degrees)
SAME_POSITION_MM = 0.1  # table positions closer than this are the same position


@dataclass(frozen=True)
class SliceHeader:
    path: Path
    relative: str  # what reports show: the path relative to the folder that was listed
    sop_uid: str
    series_uid: str
    study_uid: str
    patient_id: str
    series_number: str
    series_description: str
    kernel: str  # ConvolutionKernel, joined when multi-valued ("" when absent)
    manufacturer: str
    z: float | None  # ImagePositionPatient's third value, in mm
    axial: bool | None  # None: no ImageOrientationPatient
    size: tuple[int, int]  # (rows, columns)
    instance_number: int | None


@dataclass
class Series:
    uid: str
    slices: list[SliceHeader]  # in z order when the geometry allows it, else in instance-number or file order
    problems: list[str] = field(default_factory=list)  # why it is not a series that can be profiled along z

    @property
    def profiled(self) -> bool:
        return not self.problems

    @property
    def first(self) -> SliceHeader:
        return self.slices[0]

    @property
    def label(self) -> str:
        """A short readable name, unique within a patient: patient, series number, kernel."""
        parts = [self.first.patient_id or "patient?", f"s{self.first.series_number or '?'}"]
        if self.first.kernel:
            parts.append(self.first.kernel)
        return "_".join("".join(ch if ch.isalnum() or ch in "-_" else "-" for ch in part) for part in parts)


@dataclass
class SeriesListing:
    series: list[Series]
    not_dicom: list[tuple[Path, str]] = field(default_factory=list)  # files that are not DICOM slices, and why


def _text(ds, keyword: str) -> str:
    value = ds.get(keyword)
    if value is None:
        return ""
    if isinstance(value, pydicom.multival.MultiValue):
        return "\\".join(str(item) for item in value)
    return str(value).strip()


def _floats(ds, keyword: str, count: int) -> list[float] | None:
    value = ds.get(keyword)
    try:
        numbers = [float(item) for item in value]
    except (TypeError, ValueError):
        return None
    return numbers if len(numbers) == count and all(np.isfinite(numbers)) else None


def _is_axial(orientation: list[float]) -> bool:
    return bool(np.all(np.abs(np.array(orientation) - np.array([1, 0, 0, 0, 1, 0])) <= AXIAL_TOLERANCE))


def read_header(path: Path, relative: str, max_bytes: int) -> SliceHeader:
    """The header of one DICOM slice (pixel data not decoded). ValueError says why a file is not one."""
    data = read_image_file(path, relative, max_bytes)
    if not looks_like_dicom(data):
        raise ValueError("not a DICOM file (no DICM marker at byte 128)")
    try:
        ds = pydicom.dcmread(io.BytesIO(data))  # the pixel bytes are read, not decoded
    except Exception as exc:  # noqa: BLE001  (pydicom raises many types for a damaged header)
        raise ValueError(f"unreadable DICOM header ({' '.join(str(exc).split()) or type(exc).__name__})") from None
    if "PixelData" not in ds:
        raise ValueError("a DICOM file without pixel data (a report or structured document)")
    series_uid, sop_uid = _text(ds, "SeriesInstanceUID"), _text(ds, "SOPInstanceUID")
    if not series_uid or not sop_uid:
        raise ValueError("a DICOM slice without SeriesInstanceUID or SOPInstanceUID: it cannot be put in a series")
    position = _floats(ds, "ImagePositionPatient", 3)
    orientation = _floats(ds, "ImageOrientationPatient", 6)
    try:
        instance = int(ds.get("InstanceNumber")) if ds.get("InstanceNumber") not in (None, "") else None
    except (TypeError, ValueError):
        instance = None
    return SliceHeader(path=path, relative=relative, sop_uid=sop_uid, series_uid=series_uid,
                       study_uid=_text(ds, "StudyInstanceUID"), patient_id=_text(ds, "PatientID"),
                       series_number=_text(ds, "SeriesNumber"), series_description=_text(ds, "SeriesDescription"),
                       kernel=_text(ds, "ConvolutionKernel"), manufacturer=_text(ds, "Manufacturer"),
                       z=None if position is None else position[2],
                       axial=None if orientation is None else _is_axial(orientation),
                       size=(int(ds.get("Rows") or 0), int(ds.get("Columns") or 0)), instance_number=instance)


def series_problems(slices: Sequence[SliceHeader]) -> list[str]:
    """Why these slices cannot be ordered and profiled along z as one series (empty: they can)."""
    problems = []
    if len(slices) < 2:
        problems.append("a single slice: there is nothing to compare it with along z (score it as an image)")
    sizes = sorted({item.size for item in slices})
    if len(sizes) > 1:
        shown = ", ".join(f"{cols}x{rows}" for rows, cols in sizes)
        problems.append(f"mixed image sizes ({shown}): not one acquisition")
    missing_orientation = sum(item.axial is None for item in slices)
    if missing_orientation:
        problems.append(f"{missing_orientation} slice(s) without ImageOrientationPatient: the slice direction is "
                        f"unknown")
    elif not all(item.axial for item in slices):
        problems.append("not axial (ImageOrientationPatient is not rows along x, columns along y): the model reads "
                        "axial slices")
    missing_z = sum(item.z is None for item in slices)
    if missing_z:
        problems.append(f"{missing_z} slice(s) without ImagePositionPatient: they cannot be put in order along z")
    else:
        positions = np.sort(np.array([item.z for item in slices]))
        repeated = int(np.sum(np.diff(positions) < SAME_POSITION_MM))
        if repeated:
            problems.append(f"{repeated} table position(s) repeated within the series: inconsistent geometry "
                            f"(two acquisitions under one SeriesInstanceUID?)")
    return problems


def _ordered(slices: list[SliceHeader], profiled: bool) -> list[SliceHeader]:
    if profiled:
        return sorted(slices, key=lambda item: item.z)
    return sorted(slices, key=lambda item: (item.instance_number is None, item.instance_number or 0, item.relative))


def group_series(headers: Sequence[SliceHeader]) -> list[Series]:
    """Slices grouped by SeriesInstanceUID, each group ordered and checked; series in patient and number order."""
    grouped: dict[str, list[SliceHeader]] = defaultdict(list)
    for header in headers:
        grouped[header.series_uid].append(header)
    series = []
    for uid, slices in grouped.items():
        problems = series_problems(slices)
        series.append(Series(uid, _ordered(slices, not problems), problems))
    return sorted(series, key=lambda item: (item.first.patient_id, item.first.study_uid,
                                            item.first.series_number.zfill(8), item.uid))


def list_series(files: Sequence[Path], root: Path, max_bytes: int,
                names: Sequence[str] | None = None) -> SeriesListing:
    """Every DICOM slice among `files` grouped into series; the other files with the reason they were left.

    Reports name each file by its path relative to `root`, or by `names` when given (parallel to `files`: the
    member names of an uploaded zip whose files were written under other names)."""
    if names is not None and len(names) != len(files):
        raise ValueError(f"{len(names)} names for {len(files)} files: give one name per file")
    headers, not_dicom = [], []
    for index, path in enumerate(files):
        if names is not None:
            shown = names[index]
        else:
            relative = os.path.relpath(path, root) if Path(path).is_relative_to(root) else str(path)
            shown = Path(relative).as_posix()
        try:
            headers.append(read_header(Path(path), shown, max_bytes))
        except (ValueError, OSError) as exc:
            not_dicom.append((Path(path), str(exc)))
    return SeriesListing(group_series(headers), not_dicom)
