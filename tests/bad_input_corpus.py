"""The bad-input corpus: one small generated file for each input the entry points must survive (issue 17's table
and the cases handled before it), each with the entry points that must accept it.

An entry is built on demand (`CorpusEntry.data()`), so collecting the tests costs nothing; the largest decodes to a
few million pixels. `write_corpus` puts the files in a folder and `add_path_only_files` adds what exists only on a
file system (a FIFO, a symlink loop), for the entry points that read paths (`chestct predict`, the split stage),
never for uploads. `cli_only_paths` lists the paths that cannot be files in a folder at all (a missing file, a
path under a file, a name too long for the file system). A folder is not among them: `chestct predict` scores the
files inside it.

The entry points, as `accepted_by` names them: "service" (POST /predict), "predict" (`chestct predict`), "external"
(`chestct evaluate-external`) and "split" (the split stage). Files over the service's upload limit are refused by
the three that load an export (its serve.max_upload_mb) and read by the split stage, which has no such limit.
"""

from __future__ import annotations

import functools
import io
import os
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from PIL import Image

from tests.dicom_factory import make_ct_dicom, phantom_to_dicom

ENTRY_POINTS = frozenset({"service", "predict", "external", "split"})
WITH_EXPORT = frozenset({"service", "predict", "external"})  # the entry points bound by serve.max_upload_mb
NONE: frozenset[str] = frozenset()

# The corpus export's serve.max_upload_mb: small, so the oversize entry stays small.
UPLOAD_LIMIT_MB = 0.5
MAX_FILES = 4  # the corpus export's serve.max_files, so "too many files" needs only five


@dataclass(frozen=True)
class CorpusEntry:
    name: str  # the file name on disk and in the upload
    make: Callable[[], bytes]
    accepted_by: frozenset[str]  # the entry points that must accept it; every other one must refuse it, naming it
    case: str  # what it exercises (the table row, or the case it stands for)

    def data(self) -> bytes:
        return _built(self.name)

    def accepted(self, entry_point: str) -> bool:
        return entry_point in self.accepted_by


# --- building blocks ----------------------------------------------------------------------------------------------


def _phantom(seed: int, size: tuple[int, int] = (160, 160)) -> np.ndarray:
    from chestct.data.phantoms import render_phantom

    return render_phantom(np.random.default_rng(seed), size, 2 * (seed % 2))


def _encode(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def _gray(seed: int, fmt: str = "PNG") -> bytes:
    return _encode(Image.fromarray(_phantom(seed)), fmt)


def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def _png(width: int, height: int, idat: bytes, extra_chunks: tuple[bytes, ...] = ()) -> bytes:
    """An 8-bit grayscale PNG assembled by hand, so the header can say what the data does not."""
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header) + b"".join(extra_chunks)
            + _png_chunk(b"IDAT", idat) + _png_chunk(b"IEND", b""))


def _zeros_compressed(row_bytes: int, rows: int) -> bytes:
    """zlib of `rows` filtered rows of zeros, streamed one row at a time (never the whole image in memory)."""
    compressor = zlib.compressobj(9)
    row = bytes(row_bytes + 1)  # filter byte 0, then the pixels
    return b"".join(compressor.compress(row) for _ in range(rows)) + compressor.flush()


def _decompression_bomb() -> bytes:
    """8000 x 8000 real pixels (64 Mpx, over the 40 Mpx limit) in about 60 KB."""
    return _png(8000, 8000, _zeros_compressed(8000, 8000))


def _header_claims_huge() -> bytes:
    """A header claiming 60000 x 60000 (3.6 Gpx) over a few bytes of data."""
    return _png(60000, 60000, zlib.compress(bytes(60001)))


def _text_chunk_bomb() -> bytes:
    """A 16x16 image whose zTXt metadata chunk inflates to 64 MB."""
    compressor = zlib.compressobj(9)
    inflated = b"".join(compressor.compress(bytes(1 << 20)) for _ in range(64)) + compressor.flush()
    text = _png_chunk(b"zTXt", b"Comment\x00\x00" + inflated)
    return _png(16, 16, zlib.compress(bytes(17 * 16)), extra_chunks=(text,))


def _gray16(size: int) -> bytes:
    """A 16-bit grayscale PNG: a smooth ramp (compresses well, so a large one stays a small file)."""
    ramp = np.linspace(0, 65535, size, dtype=np.float64).astype(np.uint16)
    return _encode(Image.fromarray(np.broadcast_to(ramp, (size, size)).copy()), "PNG")


def _noise_png(side: int) -> bytes:
    """A PNG of random pixels: incompressible, so its size is about side * side bytes."""
    return _encode(Image.fromarray(np.random.default_rng(5).integers(0, 256, (side, side), dtype=np.uint8)), "PNG")


def _lab_tiff() -> bytes:
    return _encode(Image.fromarray(_phantom(3)).convert("RGB").convert("LAB"), "TIFF")


def _dicom_dataset(seed: int = 4) -> pydicom.Dataset:
    return pydicom.dcmread(io.BytesIO(phantom_to_dicom(_phantom(seed))))


def _dicom_bytes(dataset: pydicom.Dataset) -> bytes:
    buffer = io.BytesIO()
    dataset.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def _dicom_multiframe() -> bytes:
    dataset = _dicom_dataset()
    dataset.NumberOfFrames = 2
    dataset.PixelData = dataset.PixelData * 2
    return _dicom_bytes(dataset)


def _dicom_rgb() -> bytes:
    dataset = _dicom_dataset()
    rgb = np.stack([_phantom(4)] * 3, axis=-1)
    dataset.SamplesPerPixel, dataset.PhotometricInterpretation, dataset.PlanarConfiguration = 3, "RGB", 0
    dataset.BitsAllocated, dataset.BitsStored, dataset.HighBit, dataset.PixelRepresentation = 8, 8, 7, 0
    dataset.PixelData = rgb.tobytes()
    return _dicom_bytes(dataset)


def _dicom_slope(slope: float) -> bytes:
    """A CT slice whose stored values are fine but whose RescaleSlope makes the HU absurd (1e308: infinite)."""
    dataset = _dicom_dataset()
    dataset.RescaleSlope = slope
    return _dicom_bytes(dataset)


def _cut(make: Callable[[], bytes]) -> Callable[[], bytes]:
    return lambda: (data := make())[: len(data) // 2]


# --- the corpus ---------------------------------------------------------------------------------------------------

LONG_NAME = "a_very_long_file_name_" + "x" * 170 + ".png"  # 196 bytes: long, but a valid name on every file system

CORPUS: tuple[CorpusEntry, ...] = (
    # readable: every entry point must score them
    CorpusEntry("valid.png", lambda: _gray(1), ENTRY_POINTS, "control: an 8-bit grayscale PNG"),
    CorpusEntry("valid.jpg", lambda: _gray(2, "JPEG"), ENTRY_POINTS, "control: a JPEG"),
    CorpusEntry("jpeg_named.png", lambda: _gray(3, "JPEG"), ENTRY_POINTS,
                "a JPEG named .png (the real data has them): the type comes from the bytes"),
    CorpusEntry("gray16.png", lambda: _gray16(64), ENTRY_POINTS, "a 16-bit PNG"),
    CorpusEntry("gray16_2500px.png", lambda: _gray16(2500), ENTRY_POINTS,
                "row 2: a small file that decodes to a large 16-bit image (6.25 Mpx)"),
    CorpusEntry("palette.png", lambda: _encode(Image.fromarray(_phantom(5)).convert("P"), "PNG"), ENTRY_POINTS,
                "a palette PNG"),
    CorpusEntry("rgba.png", lambda: _encode(Image.fromarray(_phantom(6)).convert("RGBA"), "PNG"), ENTRY_POINTS,
                "an RGBA PNG"),
    CorpusEntry("one_pixel.png", lambda: _encode(Image.new("L", (1, 1), 128), "PNG"), ENTRY_POINTS, "a 1x1 PNG"),
    CorpusEntry("strip_1x100000.png", lambda: _encode(Image.new("L", (1, 100_000), 128), "PNG"), ENTRY_POINTS,
                "a 1x100000 PNG"),
    CorpusEntry("ünïcödé 画像.png", lambda: _gray(7), ENTRY_POINTS, "odd name: non-ASCII"),
    CorpusEntry("with  spaces .png", lambda: _gray(8), ENTRY_POINTS, "odd name: spaces"),
    CorpusEntry("""quotes ' and " ;semicolon.png""", lambda: _gray(9), ENTRY_POINTS,
                "odd name: quotes and a semicolon (multipart header syntax)"),
    CorpusEntry(LONG_NAME, lambda: _gray(10), ENTRY_POINTS, "odd name: 196 characters"),
    CorpusEntry("oversize.png", lambda: _noise_png(800), ENTRY_POINTS - WITH_EXPORT,
                f"a valid PNG over the export's upload limit ({UPLOAD_LIMIT_MB} MB); the split stage has none"),
    # unreadable: every entry point must refuse them, naming the file, and go on with the others
    CorpusEntry("empty.png", lambda: b"", NONE, "zero bytes"),
    CorpusEntry("truncated.png", _cut(lambda: _gray(11)), NONE, "a PNG cut in half"),
    CorpusEntry("truncated.jpg", _cut(lambda: _gray(12, "JPEG")), NONE, "a JPEG cut in half"),
    CorpusEntry("notes.txt", lambda: b"patient notes, not an image\n", NONE, "a text file"),
    CorpusEntry("notes.png", lambda: b"patient notes, named like an image\n", NONE, "a text file named .png"),
    CorpusEntry("lab.tif", _lab_tiff, NONE, "row 1: a LAB-mode TIFF"),
    CorpusEntry("lab_named.png", _lab_tiff, NONE, "row 1: a LAB-mode TIFF named .png"),
    CorpusEntry("image.bmp", lambda: _gray(13, "BMP"), NONE, "a BMP (only PNG, JPEG and DICOM are read)"),
    CorpusEntry("image.gif", lambda: _gray(14, "GIF"), NONE, "a GIF"),
    CorpusEntry("image.webp", lambda: _gray(15, "WEBP"), NONE, "a WEBP"),
    CorpusEntry("claims_60000x60000.png", _header_claims_huge, NONE, "a PNG header claiming 60000x60000"),
    CorpusEntry("bomb_8000x8000.png", _decompression_bomb, NONE, "a decompression bomb: 60 KB, 64 Mpx"),
    CorpusEntry("bomb_ztxt.png", _text_chunk_bomb, NONE, "a zTXt text chunk inflating to 64 MB"),
    CorpusEntry("no_pixels.dcm", lambda: make_ct_dicom(np.zeros((4, 4)), with_pixels=False), NONE,
                "DICOM without pixel data"),
    CorpusEntry("multiframe.dcm", _dicom_multiframe, NONE, "DICOM with two frames"),
    CorpusEntry("rgb.dcm", _dicom_rgb, NONE, "DICOM with RGB pixels"),
    CorpusEntry("truncated.dcm", _cut(lambda: phantom_to_dicom(_phantom(16))), NONE, "DICOM cut in half"),
    CorpusEntry("slope_1e308.dcm", lambda: _dicom_slope(1e308), NONE, "row 6: DICOM RescaleSlope 1e308"),
    CorpusEntry("slope_100.dcm", lambda: _dicom_slope(100.0), NONE,
                "row 6: finite Hounsfield values far outside any CT's range"),
)

BY_NAME = {entry.name: entry for entry in CORPUS}
if len(BY_NAME) != len(CORPUS):
    raise ValueError("two corpus entries share a name")


@functools.cache
def _built(name: str) -> bytes:
    return BY_NAME[name].make()


def write_corpus(folder: Path, entries: tuple[CorpusEntry, ...] = CORPUS) -> dict[str, Path]:
    """Every entry as a file in `folder`; returns {name: path}."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = {}
    for entry in entries:
        path = folder / entry.name
        path.write_bytes(entry.data())
        paths[entry.name] = path
    return paths


# --- what only a file system has ------------------------------------------------------------------------------------

FIFO_NAME = "fifo.png"  # row 5: reading it waits forever for a writer
LOOP_NAME = "loop.png"  # row 5: a symlink to itself (ELOOP)
PATH_ONLY_NAMES = (FIFO_NAME, LOOP_NAME)


def add_path_only_files(folder: Path) -> dict[str, Path]:
    """A FIFO and a symlink loop in `folder` (refused by every path-based entry point); returns {name: path}."""
    os.mkfifo(folder / FIFO_NAME)
    (folder / LOOP_NAME).symlink_to(LOOP_NAME)
    return {FIFO_NAME: folder / FIFO_NAME, LOOP_NAME: folder / LOOP_NAME}


def cli_only_paths(folder: Path, a_file: Path) -> dict[str, Path]:
    """Row 5's paths that name no file (refused by `chestct predict`, naming each): {case: path}."""
    return {"missing file": folder / "missing.png",
            "a path under a file": a_file / "inside.png",
            "a 300-character name": folder / ("n" * 296 + ".png")}
