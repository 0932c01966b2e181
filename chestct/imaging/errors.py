"""Typed decoding errors: the service maps each kind to its own HTTP status, the CLI and stages print the message."""

from __future__ import annotations

from chestct.errors import ChestctError


class ImageDecodeError(ChestctError, ValueError):
    """A file is not a readable image (empty, truncated, not an image, or too large)."""


class EmptyImageError(ImageDecodeError):
    """The file has no bytes at all."""


class UnsupportedImageError(ImageDecodeError):
    """Not an image this project reads: not PNG, JPEG or DICOM content (whatever the file name says), a pixel mode
    that has no grayscale, or a DICOM kind it does not handle (multi-frame, colour)."""


class CorruptImageError(ImageDecodeError):
    """The format is recognised but the data cannot be decoded (truncated, damaged, a DICOM without pixels, or
    Hounsfield values no CT scanner produces)."""


class ImageTooLargeError(ImageDecodeError):
    """The file is over the byte limit, or the decoded image would exceed the pixel limit (decompression bomb)."""


class UnreadableFileError(ImageDecodeError):
    """A path that cannot be read as an image file: missing, a folder, not a regular file (FIFO, device, socket),
    a symlink loop, a name too long, or no permission. Only files on disk raise it, never uploaded bytes."""


class OutOfDomainError(ImageDecodeError):
    """The image is not an axial chest CT slice (chestct.imaging.domain), and the caller asked to refuse such
    images (serve.refuse_out_of_domain, chestct predict --refuse-out-of-domain) rather than answer with a warning."""
