"""External validation's inputs: the label map, the files under the mapped folders, their hashes and copies.

Everything here runs before any model is loaded, so a map that cannot be honoured is refused at once.
"""

from __future__ import annotations

import hashlib
import os
import stat
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
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
    skipped: list[dict] = field(default_factory=list)  # {"file", "folder", "reason"}: links and non-regular files


@dataclass(frozen=True)
class _Mapping:
    entry: str  # as typed, for the messages
    folder: str  # posix path relative to data_dir
    label: int
    resolved: Path  # the real folder, every link followed


def _child_folders(folder: Path) -> list[str]:
    return sorted(entry.name for entry in folder.iterdir() if entry.is_dir() and not entry.name.startswith("."))


def _parse_entry(entry: str, data_dir: Path) -> _Mapping:
    """One FOLDER=LABEL entry, checked: the folder exists under data_dir and the label is known."""
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
    return _Mapping(entry, key, LABEL_WORDS[label_word], (data_dir / key).resolve())


def _shown(resolved: Path, data_dir: Path) -> str:
    """A resolved folder as the user knows it: relative to the data folder when inside it."""
    root = data_dir.resolve()
    return repr(resolved.relative_to(root).as_posix()) if resolved.is_relative_to(root) else str(resolved)


def _check_no_shared_folders(mappings: list[_Mapping], data_dir: Path) -> None:
    """Refuse two entries naming one folder, or one inside the other, compared by the real (resolved) folder, so
    a link such as normal/loop_up -> .. cannot file the same images under both labels."""
    for index, first in enumerate(mappings):
        for second in mappings[index + 1:]:
            pair = f"label map entries {first.entry!r} and {second.entry!r}"
            if first.resolved == second.resolved:
                via = "" if first.folder == second.folder else \
                    f" (both resolve to {_shown(first.resolved, data_dir)}, through a link)"
                consequence = ("one folder cannot hold both Normal and Cancer" if first.label != second.label else
                               "its files would be counted twice")
                raise ExternalDataError(f"{pair} name the same folder{via}: {consequence}; map each folder once")
            for outer, inner in ((first, second), (second, first)):
                if inner.resolved.is_relative_to(outer.resolved):
                    raise ExternalDataError(
                        f"{pair} overlap: {inner.folder!r} resolves to {_shown(inner.resolved, data_dir)}, inside "
                        f"{outer.folder!r} ({_shown(outer.resolved, data_dir)}), so its files would be filed under "
                        f"both; map only one of them")


def parse_label_map(entries: Sequence[str], data_dir: Path) -> dict[str, int]:
    """["Normal cases=0", "Malignant cases=cancer"] -> {"Normal cases": 0, "Malignant cases": 1}.

    A folder is a path relative to `data_dir` (a direct child, or nested like "test/Normal") that must exist;
    a label is 0/normal or 1/cancer (any case). Both classes must be mapped and no two folders may be the same
    folder or lie one in the other, once links are followed.
    """
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise ExternalDataError(f"{data_dir}: folder not found; give the folder that holds the class folders")
    if not entries:
        raise ExternalDataError('no --label-map given: name the folders, e.g. --label-map "Normal cases=0" '
                                '"Malignant cases=1"')
    mappings = [_parse_entry(entry, data_dir) for entry in entries]
    _check_no_shared_folders(mappings, data_dir)
    mapping = {item.folder: item.label for item in mappings}
    missing = [CLASS_NAMES[label] for label in (NORMAL, CANCER) if label not in mapping.values()]
    if missing:
        raise ExternalDataError(f"the label map names no {missing[0]} folder; map at least one folder to each "
                                f"class (0/normal and 1/cancer)")
    return mapping


def _is_hidden(name: str) -> bool:
    return name.startswith(".")


def _skip_reason(entry: os.DirEntry) -> str | None:
    """Why a listed entry is not read (None: a regular file to score). Links are not followed: a linked folder
    may lead into another mapped folder or loop, a linked file may be filed under the other label too."""
    if entry.is_symlink():
        path = entry.path
        kind = "a folder" if os.path.isdir(path) else "a file" if os.path.isfile(path) else None
        if kind is None:
            return "a broken symbolic link or a link loop; not followed"
        return (f"a symbolic link to {kind}, not followed (links could file the same images under both labels); "
                f"copy it in, or map the folder it points to")
    if entry.is_file(follow_symlinks=False):
        return None
    try:
        mode = entry.stat(follow_symlinks=False).st_mode
    except OSError as exc:
        return f"cannot be inspected ({exc.strerror or exc})"
    kind = ("a FIFO" if stat.S_ISFIFO(mode) else "a socket" if stat.S_ISSOCK(mode) else
            "a device" if stat.S_ISBLK(mode) or stat.S_ISCHR(mode) else "of an unknown type")
    return f"not a regular file ({kind}); only regular files are read"


@dataclass
class FileListing:
    files: list[Path] = field(default_factory=list)
    hidden: int = 0
    skipped: list[tuple[Path, str]] = field(default_factory=list)  # (path, reason)


def walk_files(folder: Path) -> FileListing:
    """Every regular file under `folder` (sorted), links and non-regular entries with their reason, and the number
    of hidden entries skipped. Only `folder` itself may be reached through a link (the user named it)."""
    listing = FileListing()
    pending = [folder]
    while pending:
        current = pending.pop()
        try:
            entries = list(os.scandir(current))
        except OSError as exc:  # a sub-folder without read permission: say so rather than stop the run
            listing.skipped.append((current, f"a folder that cannot be listed ({exc.strerror or exc})"))
            continue
        for entry in entries:
            if _is_hidden(entry.name):
                listing.hidden += 1
            elif entry.is_dir(follow_symlinks=False):
                pending.append(Path(entry.path))
            elif (reason := _skip_reason(entry)) is None:
                listing.files.append(Path(entry.path))
            else:
                listing.skipped.append((Path(entry.path), reason))
    listing.files.sort()
    listing.skipped.sort()
    return listing


def discover_files(data_dir: Path, label_map: dict[str, int]) -> Discovery:
    """The files under the mapped folders (sorted by relative path), and what was left aside."""
    data_dir = Path(data_dir)
    files: list[ExternalFile] = []
    skipped: list[dict] = []
    hidden = 0
    for folder, label in label_map.items():
        listing = walk_files(data_dir / folder)
        hidden += listing.hidden
        files.extend(ExternalFile(path, path.relative_to(data_dir).as_posix(), folder, label)
                     for path in listing.files)
        skipped.extend({"file": path.relative_to(data_dir).as_posix(), "folder": folder, "reason": reason}
                       for path, reason in listing.skipped)
    files.sort(key=lambda item: item.relative)
    skipped.sort(key=lambda item: item["file"])

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
                ignored.append({"folder": relative.as_posix(), "files": len(walk_files(entry).files)})
            else:
                loose += 1
    return Discovery(files, hidden, ignored, loose, skipped)


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
