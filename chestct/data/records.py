"""Kaggle layout -> one record per image: label from the folder prefix, content hashes, real format and size.

Reading every image here (once, in parallel) also finds the unreadable ones before any stage depends on them.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass
from multiprocessing import Pool
from pathlib import Path

import imagehash
import numpy as np
import pandas as pd
from PIL import Image
from tqdm import tqdm

from chestct.errors import ChestctError
from chestct.imaging.decode import open_image, to_grayscale
from chestct.imaging.errors import ImageDecodeError
from chestct.imaging.files import read_image_file
from chestct.labels import SPLITS, label_of_subtype, subtype_of_folder

# What each real format is usually called; a mismatch (a JPEG named .png) is reported, never trusted.
EXTENSIONS_BY_FORMAT = {"PNG": {".png"}, "JPEG": {".jpg", ".jpeg"}}


class DatasetError(ChestctError, RuntimeError):
    """The raw layout or an image in it cannot be used; the message names it."""


@dataclass(frozen=True)
class ImageRecord:
    id: str  # path under Data/, e.g. "train/normal/10.png": unique and stable
    split: str
    class_folder: str
    subtype: str
    label: int
    sha256: str
    phash: str  # 64-bit perceptual hash (hex) of the grayscale image
    width: int
    height: int
    mode: str
    format: str
    extension_matches: bool
    file_bytes: int


@dataclass(frozen=True)
class UnreadableImage:
    id: str
    reason: str


def list_image_files(data_folder: Path) -> list[tuple[str, str, Path]]:
    """(split, class folder, path) for every file under Data/<split>/<class>/, sorted for stable order."""
    entries = []
    for split in SPLITS:
        split_folder = data_folder / split
        if not split_folder.is_dir():
            raise DatasetError(f"{split_folder}: missing split folder; rerun the download stage")
        for class_folder in sorted(p for p in split_folder.iterdir() if p.is_dir()):
            subtype_of_folder(class_folder.name)  # fails early, naming an unknown folder
            for path in sorted(class_folder.iterdir()):
                # everything but folders and hidden files: a FIFO, a broken link or a loop is listed, so reading
                # it reports it as unreadable instead of leaving it out unnoticed
                if not path.name.startswith(".") and not path.is_dir():
                    entries.append((split, class_folder.name, path))
    if not entries:
        raise DatasetError(f"{data_folder}: no image files found")
    return entries


def inspect_image(entry: tuple[str, str, Path], data_folder: Path) -> ImageRecord | UnreadableImage:
    """Hash and decode one file; an unreadable file becomes an UnreadableImage with the reason."""
    split, class_folder, path = entry
    image_id = path.relative_to(data_folder).as_posix()
    try:
        data = read_image_file(path, image_id)
        image = open_image(data, image_id)
        # what the file holds, before to_grayscale applies its EXIF orientation in place
        width, height, mode, real_format = image.width, image.height, image.mode, image.format or "unknown"
        gray = to_grayscale(image, image_id)
    except ImageDecodeError as exc:
        return UnreadableImage(image_id, str(exc))
    subtype = subtype_of_folder(class_folder)
    return ImageRecord(
        id=image_id,
        split=split,
        class_folder=class_folder,
        subtype=subtype,
        label=label_of_subtype(subtype),
        sha256=hashlib.sha256(data).hexdigest(),
        phash=str(imagehash.phash(Image.fromarray(gray))),
        width=width,
        height=height,
        mode=mode,
        format=real_format,
        extension_matches=path.suffix.lower() in EXTENSIONS_BY_FORMAT.get(real_format, set()),
        file_bytes=len(data),
    )


def _inspect_star(args: tuple) -> ImageRecord | UnreadableImage:
    return inspect_image(*args)


def scan_dataset(data_folder: Path, workers: int = 2, progress: bool = True
                 ) -> tuple[pd.DataFrame, list[UnreadableImage]]:
    """Inspect every image under Data/ in parallel; returns the records table and the unreadable files."""
    data_folder = Path(data_folder)
    entries = list_image_files(data_folder)
    jobs = [(entry, data_folder) for entry in entries]
    bar = dict(total=len(jobs), desc="hashing images", unit="img", disable=not progress)
    if workers > 1:
        with Pool(workers) as pool:
            results = list(tqdm(pool.imap(_inspect_star, jobs, chunksize=8), **bar))
    else:
        results = [inspect_image(*job) for job in tqdm(jobs, **bar)]
    records = [r for r in results if isinstance(r, ImageRecord)]
    unreadable = [r for r in results if isinstance(r, UnreadableImage)]
    columns = list(ImageRecord.__dataclass_fields__)
    table = pd.DataFrame([asdict(r) for r in records], columns=columns)
    return table, unreadable


def phash_bits(phashes: pd.Series) -> np.ndarray:
    """Hex perceptual hashes -> (N, 64) bool matrix, for vectorised Hamming distances."""
    values = np.array([int(h, 16) for h in phashes], dtype=np.uint64)
    shifts = np.arange(63, -1, -1, dtype=np.uint64)
    return ((values[:, None] >> shifts) & np.uint64(1)).astype(bool)
