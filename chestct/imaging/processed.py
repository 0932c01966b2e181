"""Processed splits: THE preprocessing run over the manifest into `data/processed/<split>/`, and read back.

`preprocess_manifest` streams every manifest image through the preprocessing (chestct.imaging.preprocess) on
`preprocess.workers` processes and writes each one straight into its split's shards (chestct.imaging.shards), so
memory does not grow with the dataset. `save_processed` writes arrays already in memory the same way (the
perturbed validation copy, tests, benchmarks). `load_split` opens a split as `SplitArrays`: labels, subtypes and
ids from the index, images memory-mapped from the shards (nothing is read until a row is used), and the layout
the training input pipeline streams from. Every later stage reads exactly the arrays the model trains on.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from functools import partial
from multiprocessing import Pool
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm import tqdm

from chestct.atomic_io import atomic_path
from chestct.errors import ChestctError
from chestct.imaging.decode import decode_grayscale
from chestct.imaging.preprocess import Prepared, prepare_gray
from chestct.imaging.shards import ShardedImages, ShardedSplitWriter, ShardError, SplitLayout, read_layout
from chestct.labels import CANCER, NORMAL, SPLITS
from chestct.params import PreprocessParams

ARRAY_KEYS = ("images", "labels", "subtypes", "ids")
OPTIONAL_KEYS = ("unstandardised",)  # (N, S, S) uint8 before intensity standardisation, when preprocess masks
DEFAULT_SHARD_IMAGES = 1024


class SplitFileError(ChestctError, ValueError):
    """A processed split file is missing or does not hold the expected arrays."""


@dataclass(frozen=True)
class SplitArrays:
    """One processed split: uint8 images (N, S, S, 1), int labels (N,), str subtypes (N,) and ids (N,), and
    optionally the unstandardised masked images (N, S, S) that photometric augmentation starts from.

    Read from disk, the images are memory-mapped `ShardedImages` and `layout` names the shard files the training
    input pipeline streams; built in memory (tests, benchmarks), they are arrays and `layout` is None.
    """

    images: np.ndarray | ShardedImages
    labels: np.ndarray
    subtypes: np.ndarray
    ids: np.ndarray
    unstandardised: np.ndarray | ShardedImages | None = None
    layout: SplitLayout | None = None

    def __post_init__(self) -> None:
        if self.images.ndim != 4 or self.images.shape[-1] != 1 or self.images.shape[1] != self.images.shape[2]:
            raise ValueError(f"images must be (N, S, S, 1), got shape {self.images.shape}")
        if self.images.dtype != np.uint8:
            raise ValueError(f"images must be uint8 (0..255), got {self.images.dtype}")
        count = len(self.images)
        for name in ARRAY_KEYS[1:]:
            if getattr(self, name).shape != (count,):
                raise ValueError(f"{name} must have shape ({count},), got {getattr(self, name).shape}")
        if self.unstandardised is not None and (self.unstandardised.shape != self.images.shape[:3]
                                                or self.unstandardised.dtype != np.uint8):
            raise ValueError(f"unstandardised must be uint8 of shape {self.images.shape[:3]}, got "
                             f"{self.unstandardised.dtype} {self.unstandardised.shape}")
        unknown = set(np.unique(self.labels).tolist()) - {NORMAL, CANCER}
        if unknown:
            raise ValueError(f"labels must be {NORMAL} (Normal) or {CANCER} (Cancer), found {sorted(unknown)}")

    def __len__(self) -> int:
        return len(self.images)

    @property
    def image_size(self) -> int:
        return int(self.images.shape[1])

    def in_memory(self) -> SplitArrays:
        """The same split with its images read into memory, for the stages that need whole arrays (evaluation's
        audits and Grad-CAM, the export's parity images); training streams instead."""
        unstandardised = None if self.unstandardised is None else np.asarray(self.unstandardised)
        return replace(self, images=np.asarray(self.images), unstandardised=unstandardised)

    def take(self, rows: np.ndarray) -> SplitArrays:
        """The given rows only, read into memory (from the shards, only those rows are read)."""
        unstandardised = None if self.unstandardised is None else self.unstandardised[rows]
        return SplitArrays(images=self.images[rows], labels=self.labels[rows], subtypes=self.subtypes[rows],
                           ids=self.ids[rows], unstandardised=unstandardised)


def split_folder(processed: str | Path, split: str) -> Path:
    return Path(processed) / split


def load_split(folder: str | Path, unstandardised: bool = True) -> SplitArrays:
    """Open one `data/processed/<split>/`; a missing or malformed split fails with its name and a way out.

    `unstandardised=False` leaves out what only photometric training reads: evaluation and export then read (and
    hold in memory) the model's input alone, not a second array of the same size."""
    folder = Path(folder)
    try:
        layout, index = read_layout(folder)
    except ShardError as exc:
        raise SplitFileError(str(exc)) from None
    wanted = [field for field in layout.fields if unstandardised or field != "unstandardised"]
    fields = {field: ShardedImages(layout, index, field) for field in wanted}
    try:
        return SplitArrays(images=fields["images"], unstandardised=fields.get("unstandardised"),
                           labels=index["label"].to_numpy(dtype=np.int64),
                           subtypes=index["subtype"].to_numpy(dtype=str), ids=index["id"].to_numpy(dtype=str),
                           layout=layout)
    except (KeyError, ValueError) as exc:
        raise SplitFileError(f"{folder}: {exc}; rerun `dvc repro preprocess`") from None


def _prepare_one(image_id: str, data_folder: Path, params: PreprocessParams) -> Prepared:
    return prepare_gray(decode_grayscale(data_folder / image_id, name=image_id), params)


def _fields(prepared: Prepared) -> dict[str, np.ndarray]:
    fields = {"images": prepared.image}
    if prepared.unstandardised is not None:
        fields["unstandardised"] = prepared.unstandardised
    return fields


def preprocess_manifest(manifest: pd.DataFrame, data_folder: Path, params: PreprocessParams, folder: Path,
                        progress: bool = True) -> dict:
    """Preprocess every manifest image (in parallel, order kept) into `folder/<split>/` shards, one image in
    memory at a time; return the crop report (how many crop boxes came from the lungs, from the body, or from
    the whole image, per split). The folder appears only once every split is complete."""
    ids = manifest["id"].tolist()
    work = partial(_prepare_one, data_folder=Path(data_folder), params=params)
    bar = dict(total=len(ids), desc="preprocessing", unit="img", disable=not progress)
    crops = {split: {"lungs": 0, "body": 0, "image": 0} for split in SPLITS}
    with atomic_path(folder) as temp:
        temp.mkdir()
        writers: dict[str, ShardedSplitWriter] = {}
        pool = Pool(params.workers) if params.workers > 1 and len(ids) > 1 else None
        try:
            prepared_stream = pool.imap(work, ids, chunksize=8) if pool else map(work, ids)
            for split, prepared in zip(manifest["split"], tqdm(prepared_stream, **bar), strict=True):
                if split not in writers:
                    writers[split] = ShardedSplitWriter(
                        temp / split, manifest[manifest["split"] == split], params.image_size,
                        tuple(_fields(prepared)), params.shard_images)
                writers[split].add(_fields(prepared))
                if prepared.crop in crops[split]:
                    crops[split][prepared.crop] += 1
        finally:
            if pool is not None:
                pool.terminate()
        for split in SPLITS:  # a split with no image still gets its (empty) folder
            if split not in writers:
                writers[split] = ShardedSplitWriter(temp / split, manifest[manifest["split"] == split],
                                                    params.image_size, ("images",), params.shard_images)
            writers[split].close()
    report = {"mode": params.crop}
    if params.crop != "none":
        report.update(crops)
    return {"crop": report}


def save_processed(folder: Path, arrays: dict[str, dict[str, np.ndarray]],
                   shard_images: int = DEFAULT_SHARD_IMAGES) -> None:
    """Write in-memory arrays as `folder/<split>/` shards; the folder appears only once all are written.

    Each split is validated as `SplitArrays` first, so a malformed array never reaches the cache.
    """
    for split, split_arrays in arrays.items():
        try:
            SplitArrays(**{key: split_arrays[key] for key in ARRAY_KEYS + OPTIONAL_KEYS if key in split_arrays})
        except (KeyError, ValueError) as exc:
            raise SplitFileError(f"processed split {split!r} is malformed ({exc}); nothing was written") from None
    with atomic_path(folder) as temp:
        temp.mkdir()
        for split, split_arrays in arrays.items():
            rows = pd.DataFrame({"id": split_arrays["ids"], "label": split_arrays["labels"],
                                 "subtype": split_arrays["subtypes"]})
            fields = tuple(key for key in ("images", *OPTIONAL_KEYS) if key in split_arrays)
            size = int(split_arrays["images"].shape[1])
            writer = ShardedSplitWriter(temp / split, rows, size, fields, shard_images)
            for row in range(len(rows)):
                writer.add({field: split_arrays[field][row] for field in fields})
            writer.close()
