"""Typed decoding errors: the service maps each kind to its own HTTP status, the CLI and stages print the message."""

from __future__ import annotations

from chestct.errors import ChestctError


class ImageDecodeError(ChestctError, ValueError):
    """A file is not a readable image (empty, truncated, not an image, or too large)."""


class EmptyImageError(ImageDecodeError):
    """The file has no bytes at all."""


class UnsupportedImageError(ImageDecodeError):
    """Not an image this project reads: not PNG, JPEG or DICOM content (whatever the file name says), or a
    DICOM kind it does not handle (multi-frame, colour)."""


class CorruptImageError(ImageDecodeError):
    """The format is recognised but the data cannot be decoded (truncated, damaged, or a DICOM without pixels)."""


class ImageTooLargeError(ImageDecodeError):
    """The decoded image would exceed the pixel limit (decompression-bomb guard)."""
