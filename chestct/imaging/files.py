"""Read one image file from disk: regular files only, never more than a byte limit.

A FIFO opened for reading waits for a writer forever and a device can stream without end, so only regular files
are read, and the read stops at the limit whatever the file claims. Every failure is an UnreadableFileError or an
ImageTooLargeError naming the path and saying what to do.
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

from chestct.imaging.errors import ImageDecodeError, ImageTooLargeError, UnreadableFileError

# The service's default per-file limit (params.yaml serve.max_upload_mb: 20, counted as 1 MB = 1e6 bytes). The
# CLI and the pipeline stages read files with the same default; the service passes its configured limit.
DEFAULT_MAX_BYTES = 20_000_000

_SPECIAL_FILES = ((stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISCHR, "a character device"),
                  (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))

_OS_ERROR_ADVICE = {
    errno.ENOENT: "file not found; check the path",
    errno.ENOTDIR: "a part of the path is a file, not a folder; check the path",
    errno.EISDIR: "is a folder, not an image file; give the image files inside it",
    errno.ELOOP: "too many levels of symbolic links (a symlink loop); point the link at a real file",
    errno.ENAMETOOLONG: "the file name or path is too long for the file system; rename the file or shorten the path",
    errno.EACCES: "permission denied; make the file readable by this user",
    errno.EPERM: "permission denied; make the file readable by this user",
}


def upload_limit_bytes(max_upload_mb: float) -> int:
    """serve.max_upload_mb as bytes, counted as the service counts it (1 MB = 1e6 bytes)."""
    return int(max_upload_mb * 1e6)


def _refuse_non_regular(mode: int, label: str) -> None:
    if stat.S_ISREG(mode):
        return
    if stat.S_ISDIR(mode):
        raise UnreadableFileError(f"{label}: {_OS_ERROR_ADVICE[errno.EISDIR]}")
    kind = next((name for is_kind, name in _SPECIAL_FILES if is_kind(mode)), "not a regular file")
    raise UnreadableFileError(f"{label}: is {kind}, not a regular file; copy the image into a regular file")


def _refuse_oversize(size: int, label: str, max_bytes: int, read_stopped: bool = False) -> None:
    """`read_stopped`: `size` is where a bounded read stopped, not the file's size."""
    if size > max_bytes:
        amount = f"more than {max_bytes:,} bytes" if read_stopped else f"{size:,} bytes"
        raise ImageTooLargeError(f"{label}: the file is {amount}, over the limit of {max_bytes:,} bytes per image "
                                 "(serve.max_upload_mb); downscale or recompress it")


def read_image_file(path: str | Path, label: str | None = None, max_bytes: int = DEFAULT_MAX_BYTES) -> bytes:
    """The bytes of a regular file of at most `max_bytes` bytes (symlinks are followed to their target)."""
    label = label or str(path)
    try:
        info = os.stat(path)  # before opening: a FIFO or a device is refused without being opened
        _refuse_non_regular(info.st_mode, label)
        _refuse_oversize(info.st_size, label, max_bytes)
        # O_NONBLOCK: if a FIFO took the file's place since the stat, opening it does not wait for a writer;
        # fstat below then refuses it. Reading a regular file is unaffected by the flag.
        descriptor = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
        with os.fdopen(descriptor, "rb") as handle:
            _refuse_non_regular(os.fstat(handle.fileno()).st_mode, label)
            data = handle.read(max_bytes + 1)  # bounded even if the file grew since the stat
    except ImageDecodeError:
        raise
    except OSError as exc:
        advice = _OS_ERROR_ADVICE.get(exc.errno, f"cannot be read ({exc.strerror or exc}); check the file")
        raise UnreadableFileError(f"{label}: {advice}") from None
    except ValueError as exc:  # a path with a NUL byte
        raise UnreadableFileError(f"{label}: not a usable path ({exc})") from None
    _refuse_oversize(len(data), label, max_bytes, read_stopped=True)  # it grew since the stat
    return data
