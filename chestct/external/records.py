"""External validation's inputs: the label map, the files under the mapped folders, their hashes and copies.

Everything here runs before any model is loaded, so a map that cannot be honoured is refused at once.
"""

from __future__ import annotations

import hashlib
import os
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np
from tqdm import tqdm

from chestct.errors import ChestctError
from chestct.labels import CANCER, CLASS_NAMES, NORMAL

LABEL_WORDS = {"0": NORMAL, "normal": NORMAL, "1": CANCER, "cancer": CANCER}


_HASH_CHUNK = 1 << 20


_GROUP_LIST_LIMIT = 500  # duplicate groups listed one by one in metrics.json (all are counted)


class ExternalDataError(ChestctError, ValueError):
    """The external folder, its label map or the output folder cannot be used; the message says what to do."""


@dataclass(frozen=True)
class ExternalFile:
    path: Path  # data_dir / relative
    relative: str  # posix path relative to data_dir: what the report and the CSV show
    folder: str  # the label-map folder it was found under
    label: int


@dataclass
class Discovery:
    files: list[ExternalFile]
    hidden_skipped: int
    ignored_folders: list[dict]  # {"folder": relative path, "files": count}
    loose_files: int  # regular files beside the mapped folders, in no mapped folder


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


@dataclass
class ExternalResult:
    report: dict  # what metrics.json holds
    table: list[dict]  # the CSV rows
    labels: np.ndarray
    scores: np.ndarray
    out_dir: Path
