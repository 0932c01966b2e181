"""Unpack an uploaded zip of a DICOM series folder into a temporary folder, safely.

The zip comes from anyone who can reach the service, so nothing in it is trusted:
- its members are written under generated names (000001.member, ...) directly in the target folder, never under
  their own names, so no member name can place a file anywhere (zip-slip); the names are kept for the answers.
  Absolute names, names with `..`, links and encrypted members are refused all the same, saying which member;
- its size is bounded three times: the number of members (before zipfile reads the directory, from the zip's end
  record, and after), each member's uncompressed size, and the total uncompressed size, each checked on the sizes
  the zip declares before anything is written and again on the bytes actually written (a zip bomb);
- folders, dotfiles (`.DS_Store`, `._x` resource forks) and `__MACOSX/` are skipped without a word.
Every refusal is a ZipRefusedError (an UploadError: 400 or 413) whose message starts with the upload's name.
"""

from __future__ import annotations

import io
import os
import re
import stat
import struct
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from chestct.imaging.files import upload_limit_bytes
from chestct.params import ServeParams
from chestct.serving.schema import SERIES_FIELD
from chestct.serving.upload_errors import UploadError

# A zip may hold serve.max_files * MEMBERS_PER_FILE members (1024 with the defaults). A 512x512 16-bit CT slice is
# about 0.5 MB, so MAX_EXTRACTED_BYTES holds about 1000 slices: the member limit matches what the total allows
# (a chest series of 1-5 mm slices, or a few thick-slice series) and scales with the operator's own request limit.
MEMBERS_PER_FILE = 64
# The most a zip may unpack to, whatever each member declares: the zip-bomb guard for the disk and for the time
# spent reading, while the request holds a prediction slot.
MAX_EXTRACTED_BYTES = 512_000_000
# The central directory zipfile reads into memory before anything can be counted: a legitimate entry is
# 46 bytes plus its name and extras (a few hundred bytes), so this bounds what a directory of tiny fake entries
# can cost.
DIRECTORY_BYTES_PER_MEMBER = 1024
CHUNK = 1 << 20

_EOCD = struct.Struct("<4s4H2LH")  # end of central directory record
_ZIP64_LOCATOR = struct.Struct("<4sLQL")
_ZIP64_EOCD = struct.Struct("<4sQ2H2L4Q")
_MAX_COMMENT = 0xFFFF


@dataclass
class ZipRefusedError(UploadError):
    """An uploaded zip refused (400 or 413); `reason` is its metric label."""

    reason: str = ""

    def __post_init__(self) -> None:
        self.reason = self.reason or ("zip_too_large" if self.status_code == 413 else "bad_zip")


@dataclass
class ExtractedZip:
    """The members written to `folder`: files[i] holds the member named names[i]."""

    folder: Path
    files: list[Path] = field(default_factory=list)
    names: list[str] = field(default_factory=list)


def member_limit(limits: ServeParams) -> int:
    return limits.max_files * MEMBERS_PER_FILE


def _megabytes(size: float) -> str:
    return f"{size / 1e6:.1f} MB" if size >= 100_000 else f"{size / 1e3:.1f} kB"


def _declared_directory(file: BinaryIO) -> tuple[int, int] | None:
    """(members, central directory bytes) as the zip's end record declares them (zip64 aware), read before
    zipfile loads the directory; None without an end record (not a zip)."""
    size = file.seek(0, os.SEEK_END)
    start = max(0, size - _EOCD.size - _MAX_COMMENT)
    file.seek(start)
    tail = file.read()
    at = tail.rfind(b"PK\x05\x06")
    if at < 0 or len(tail) - at < _EOCD.size:
        return None
    members, directory = _EOCD.unpack_from(tail, at)[4:6]
    if members == 0xFFFF or directory == 0xFFFFFFFF:  # zip64: the real values are in the zip64 end record
        record_at = start + at - _ZIP64_LOCATOR.size - _ZIP64_EOCD.size
        if record_at >= 0:
            file.seek(record_at)
            data = file.read(_ZIP64_EOCD.size + _ZIP64_LOCATOR.size)
            if data[:4] == b"PK\x06\x06" and data[_ZIP64_EOCD.size:_ZIP64_EOCD.size + 4] == b"PK\x06\x07":
                members, directory = _ZIP64_EOCD.unpack_from(data)[7:9]
    return members, directory


def _skipped(name: str) -> bool:
    """Folders, dotfiles and macOS's __MACOSX/ metadata: not part of the series, left out silently."""
    parts = [part for part in re.split(r"[/\\]", name) if part not in ("", ".")]  # "./a.dcm" is a.dcm
    return name.endswith(("/", "\\")) or not parts or any(part.startswith(".") or part == "__MACOSX"
                                                           for part in parts)


def _unsafe(name: str) -> str | None:
    """Why a member name would point outside the folder it is unpacked into (None: it would not)."""
    if name.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", name):
        return "an absolute path"
    if ".." in re.split(r"[/\\]", name):
        return "a path with '..' that leads out of the zip's folder"
    if "\0" in name:
        return "a name with a NUL byte"
    return None


def _is_link(info: zipfile.ZipInfo) -> bool:
    return stat.S_ISLNK(info.external_attr >> 16)


def _check_members(upload: str, infos: list[zipfile.ZipInfo], limits: ServeParams) -> list[zipfile.ZipInfo]:
    """The members to unpack, once every one of them passed; ZipRefusedError naming the first that does not."""
    per_file = upload_limit_bytes(limits.max_upload_mb)
    kept, total = [], 0
    for info in infos:
        name = info.filename
        reason = _unsafe(name)
        if reason:
            raise ZipRefusedError(400, f"{upload}: member {name!r} is {reason}; zip the series folder with relative "
                                   f"paths (e.g. zip -r series.zip folder/)")
        if info.is_dir() or _skipped(name):
            continue
        if _is_link(info):
            raise ZipRefusedError(400, f"{upload}: member {name!r} is a symbolic link; zip the files themselves "
                                   f"(zip -r without -y)")
        if info.flag_bits & 0x1:
            raise ZipRefusedError(400, f"{upload}: member {name!r} is encrypted; send the zip without a password")
        if info.file_size > per_file:
            raise ZipRefusedError(413, f"{upload}: member {name!r} is {_megabytes(info.file_size)} uncompressed, over "
                                   f"the limit of {limits.max_upload_mb:g} MB per file (serve.max_upload_mb)")
        total += info.file_size
        if total > MAX_EXTRACTED_BYTES:
            raise ZipRefusedError(413, f"{upload}: its members add up to more than {_megabytes(MAX_EXTRACTED_BYTES)} "
                                   f"uncompressed (the limit for one zipped series); send fewer series per zip")
        kept.append(info)
    return kept


def _damaged(upload: str, info: zipfile.ZipInfo, exc: Exception) -> ZipRefusedError:
    reason = " ".join(str(exc).split()) or type(exc).__name__
    return ZipRefusedError(400, f"{upload}: member {info.filename!r} cannot be unpacked ({reason}); the zip may be "
                            f"damaged")


def _copy_member(upload: str, archive: zipfile.ZipFile, info: zipfile.ZipInfo, target: Path, per_file: int,
                 room: int) -> int:
    """Unpack one member to `target`, counting its bytes against `per_file` and the `room` left in the total;
    returns the bytes written. (zipfile stops at the declared size; the count holds whatever it does.)"""
    written = 0
    with open(target, "xb") as sink:
        try:
            source = archive.open(info)
        except Exception as exc:  # noqa: BLE001  (zipfile, zlib, bz2 and lzma raise many types for a damaged zip)
            raise _damaged(upload, info, exc) from None
        with source:
            while True:
                try:
                    chunk = source.read(CHUNK)
                except Exception as exc:  # noqa: BLE001  (as above: a bad CRC, a broken compressed stream)
                    raise _damaged(upload, info, exc) from None
                if not chunk:
                    break
                written += len(chunk)
                if written > per_file or written > room:
                    break
                sink.write(chunk)
    if written > per_file:
        raise ZipRefusedError(413, f"{upload}: member {info.filename!r} unpacks to more than "
                               f"{_megabytes(per_file)} (serve.max_upload_mb per file)")
    if written > room:
        raise ZipRefusedError(413, f"{upload}: its members unpack to more than {_megabytes(MAX_EXTRACTED_BYTES)} "
                               f"(the limit for one zipped series)")
    return written


def extract_zip(upload: str, source: bytes | BinaryIO, folder: Path, limits: ServeParams) -> ExtractedZip:
    """Unpack the zip `source` (its bytes, or a seekable file) into the existing, empty `folder`; `upload` is
    its name in messages. ZipRefusedError (400/413) when it is not a zip or breaks a rule in the module docstring."""
    file = io.BytesIO(source) if isinstance(source, bytes) else source
    most = member_limit(limits)
    too_many = (f"the limit is {most} (serve.max_files x {MEMBERS_PER_FILE}); send fewer series per zip, or zip "
                f"each series on its own")
    not_a_zip = (f"{upload}: not a zip archive; send the series folder zipped (e.g. zip -r series.zip folder/) in "
                 f"the field '{SERIES_FIELD}'")
    try:
        declared = _declared_directory(file)
        if declared is None:
            raise ZipRefusedError(400, not_a_zip)
        if declared[0] > most:
            raise ZipRefusedError(413, f"{upload}: the zip declares {declared[0]} members; {too_many}")
        if declared[1] > most * DIRECTORY_BYTES_PER_MEMBER:
            raise ZipRefusedError(413, f"{upload}: the zip's directory is {_megabytes(declared[1])}, more than "
                                   f"{most} members need; {too_many}")
        file.seek(0)
        archive = zipfile.ZipFile(file)
    except ZipRefusedError:
        raise
    except (zipfile.BadZipFile, OSError, EOFError, ValueError, struct.error) as exc:
        raise ZipRefusedError(400, f"{not_a_zip} ({' '.join(str(exc).split()) or type(exc).__name__})") from None
    with archive:
        infos = archive.infolist()
        if len(infos) > most:  # the end record can understate the directory
            raise ZipRefusedError(413, f"{upload}: the zip holds {len(infos)} members; {too_many}")
        kept = _check_members(upload, infos, limits)
        extracted = ExtractedZip(folder)
        per_file, total = upload_limit_bytes(limits.max_upload_mb), 0
        for index, info in enumerate(kept, start=1):
            target = folder / f"{index:06d}.member"
            total += _copy_member(upload, archive, info, target, per_file, MAX_EXTRACTED_BYTES - total)
            extracted.files.append(target)
            extracted.names.append(info.filename)
    return extracted
