"""The on-disk shape of one processed split: class-pure .npy shards plus an index, written and read only here.

    data/processed/<split>/
        index.csv                     id, label, subtype, shard, offset: one row per image, in manifest order
        layout.json                   image size, fields, and every shard's name, class and count
        images-normal-00000.npy       (n, S, S, 1) uint8, the model's input
        unstandardised-normal-00000.npy   (n, S, S) uint8, when preprocess masks (photometric training)
        images-cancer-00000.npy ...

Why .npy rather than TFRecord (benchmarks/shard_format.py measures both): numpy opens a shard as a memory map
(evaluation and the audits read rows without loading the split), tf.data reads a whole shard with one
`read_file` and a `decode_raw` (no per-image parsing), and both are the same bytes. Shards hold one class each,
so training streams each class on its own for balanced batches without reading anything twice.

Every shard's size is known from the manifest before the first image is processed, so the writer puts each image
straight into its file at its offset, in arrival order: memory stays one image per field, whatever the size.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from chestct.errors import ChestctError
from chestct.labels import CANCER, NORMAL

FORMAT = "chestct-npy-shards"
VERSION = 1
INDEX = "index.csv"
LAYOUT = "layout.json"
INDEX_COLUMNS = ("id", "label", "subtype", "shard", "offset")
CLASS_NAMES = {NORMAL: "normal", CANCER: "cancer"}
# The per-image shape of each field, given the image size S.
FIELD_SHAPES = {"images": lambda size: (size, size, 1), "unstandardised": lambda size: (size, size)}


class ShardError(ChestctError, ValueError):
    """A processed split folder is missing, incomplete or not in the shard layout."""


@dataclass(frozen=True)
class Shard:
    name: str  # e.g. "normal-00000"; the field's file is "<field>-<name>.npy"
    label: int
    count: int

    def file(self, folder: Path, field: str) -> Path:
        return folder / f"{field}-{self.name}.npy"


@dataclass(frozen=True)
class SplitLayout:
    """What layout.json says about one split folder."""

    folder: Path
    image_size: int
    fields: tuple[str, ...]
    shards: tuple[Shard, ...]

    def shards_of(self, label: int) -> tuple[Shard, ...]:
        return tuple(shard for shard in self.shards if shard.label == label)

    def files(self, field: str, label: int | None = None) -> list[str]:
        chosen = self.shards if label is None else self.shards_of(label)
        return [str(shard.file(self.folder, field)) for shard in chosen]

    def image_bytes(self, field: str) -> int:
        return int(np.prod(FIELD_SHAPES[field](self.image_size)))


def _npy_header(count: int, shape: tuple[int, ...]) -> bytes:
    buffer = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        buffer, {"descr": np.dtype(np.uint8).str, "fortran_order": False, "shape": (count, *shape)})
    return buffer.getvalue()


def plan_shards(labels: np.ndarray, shard_images: int) -> tuple[list[Shard], np.ndarray, np.ndarray]:
    """Assign every row (in order) to a class-pure shard of at most `shard_images` images.

    Returns the shards and, per row, its shard's position in the list and its offset inside the shard.
    """
    labels = np.asarray(labels)
    shards: list[Shard] = []
    shard_of, offset_of = np.zeros(len(labels), np.int64), np.zeros(len(labels), np.int64)
    for label in (NORMAL, CANCER):
        rows = np.flatnonzero(labels == label)
        for number, start in enumerate(range(0, len(rows), shard_images)):
            members = rows[start:start + shard_images]
            shard_of[members] = len(shards)
            offset_of[members] = np.arange(len(members))
            shards.append(Shard(f"{CLASS_NAMES[label]}-{number:05d}", int(label), len(members)))
    return shards, shard_of, offset_of


class ShardedSplitWriter:
    """Writes one split's images row by row, in index order, straight into their shard files.

    `rows` is a frame with id, label and subtype in the order images will arrive. Call `add(fields)` once per
    row, then `close()`, which checks every row arrived and writes index.csv and layout.json.
    """

    def __init__(self, folder: Path, rows: pd.DataFrame, image_size: int, fields: tuple[str, ...],
                 shard_images: int):
        self.folder, self.image_size, self.fields = Path(folder), image_size, fields
        self.folder.mkdir(parents=True, exist_ok=True)
        labels = rows["label"].to_numpy(dtype=np.int64)
        self.shards, shard_of, offset_of = plan_shards(labels, shard_images)
        self.index = pd.DataFrame({
            "id": rows["id"].astype(str).to_numpy(), "label": labels, "subtype": rows["subtype"].astype(str).to_numpy(),
            "shard": [self.shards[i].name for i in shard_of], "offset": offset_of,
        })
        self._shard_of, self._offset_of = shard_of, offset_of
        self._open: dict[tuple[str, int], object] = {}
        self._written = 0

    def _handle(self, field: str, shard_number: int):
        key = (field, shard_number)
        if key not in self._open:
            shard = self.shards[shard_number]
            handle = open(shard.file(self.folder, field), "wb")  # noqa: SIM115 - closed when the shard is full
            handle.write(_npy_header(shard.count, FIELD_SHAPES[field](self.image_size)))
            self._open[key] = handle
        return self._open[key]

    def add(self, fields: dict[str, np.ndarray]) -> None:
        row = self._written
        if row >= len(self.index):
            raise ShardError(f"{self.folder}: more images than the {len(self.index)} rows planned")
        if set(fields) != set(self.fields):
            raise ShardError(f"{self.folder}: row {row} has fields {sorted(fields)}, expected {sorted(self.fields)}")
        shard_number, offset = int(self._shard_of[row]), int(self._offset_of[row])
        for field, image in fields.items():
            expected = FIELD_SHAPES[field](self.image_size)
            if image.shape != expected or image.dtype != np.uint8:
                raise ShardError(f"{self.folder}: {field} of {self.index.at[row, 'id']} is {image.dtype} "
                                 f"{image.shape}, expected uint8 {expected}")
            handle = self._handle(field, shard_number)
            handle.write(np.ascontiguousarray(image).tobytes())
            if offset == self.shards[shard_number].count - 1:  # the shard is full: free its buffer now
                handle.close()
                del self._open[(field, shard_number)]
        self._written += 1

    def close(self) -> SplitLayout:
        for handle in self._open.values():
            handle.close()
        self._open.clear()
        if self._written != len(self.index):
            raise ShardError(f"{self.folder}: {self._written} of {len(self.index)} images were written")
        self.index.to_csv(self.folder / INDEX, index=False)
        layout = {"format": FORMAT, "version": VERSION, "image_size": self.image_size, "fields": list(self.fields),
                  "shards": [vars(shard) for shard in self.shards]}
        (self.folder / LAYOUT).write_text(json.dumps(layout, indent=2) + "\n")
        return SplitLayout(self.folder, self.image_size, self.fields, tuple(self.shards))


def read_layout(folder: Path) -> tuple[SplitLayout, pd.DataFrame]:
    """layout.json and index.csv of a split folder, checked against each other and the shard files."""
    folder = Path(folder)
    how = "rerun `dvc repro preprocess`"
    if not (folder / LAYOUT).is_file() or not (folder / INDEX).is_file():
        raise ShardError(f"{folder}: processed split not found (no {LAYOUT} and {INDEX}); {how} to create it")
    try:
        raw = json.loads((folder / LAYOUT).read_text())
        if raw.get("format") != FORMAT or raw.get("version") != VERSION:
            raise ShardError(f"{folder / LAYOUT}: format {raw.get('format')!r} version {raw.get('version')!r}, "
                             f"expected {FORMAT!r} {VERSION}; {how}")
        shards = tuple(Shard(**shard) for shard in raw["shards"])
        layout = SplitLayout(folder, int(raw["image_size"]), tuple(raw["fields"]), shards)
        index = pd.read_csv(folder / INDEX, keep_default_na=False, dtype={"id": str, "subtype": str, "shard": str})
    except (OSError, ValueError, KeyError, TypeError) as exc:
        if isinstance(exc, ShardError):
            raise
        raise ShardError(f"{folder}: unreadable shard layout or index ({exc}); {how}") from None
    if tuple(index.columns) != INDEX_COLUMNS:
        raise ShardError(f"{folder / INDEX}: columns {list(index.columns)}, expected {list(INDEX_COLUMNS)}; {how}")
    counts = index["shard"].value_counts().to_dict()
    for shard in shards:
        if counts.get(shard.name, 0) != shard.count:
            raise ShardError(f"{folder}: shard {shard.name} holds {shard.count} images but the index lists "
                             f"{counts.get(shard.name, 0)}; {how}")
        for field in layout.fields:
            path, expected = shard.file(folder, field), (shard.count, *FIELD_SHAPES[field](layout.image_size))
            try:
                array = np.load(path, mmap_mode="r")
            except (OSError, ValueError) as exc:
                raise ShardError(f"{path}: missing or unreadable ({exc}); {how}") from None
            if array.shape != expected or array.dtype != np.uint8:
                raise ShardError(f"{path}: holds {array.dtype} {array.shape}, expected uint8 {expected}; {how}")
    return layout, index


class ShardedImages:
    """One field of a split as a read-only array in index order, backed by memory-mapped shards.

    Supports what the stages do with image arrays: len, shape, dtype, ndim, indexing by int, slice, boolean
    mask or index list (which reads only those rows), and np.asarray (which reads them all).
    """

    def __init__(self, layout: SplitLayout, index: pd.DataFrame, field: str):
        self.field = field
        names = {shard.name: number for number, shard in enumerate(layout.shards)}
        self._shard = index["shard"].map(names).to_numpy(dtype=np.int64)
        self._offset = index["offset"].to_numpy(dtype=np.int64)
        self._maps = [np.load(shard.file(layout.folder, field), mmap_mode="r") for shard in layout.shards]
        self.shape = (len(index), *FIELD_SHAPES[field](layout.image_size))
        self.dtype = np.dtype(np.uint8)
        self.ndim = len(self.shape)

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, key):
        if isinstance(key, tuple):  # e.g. images[..., 0]: read the rows, then index the array
            return np.asarray(self)[key]
        rows = np.arange(len(self))[key]
        if np.ndim(rows) == 0:
            return np.array(self._maps[self._shard[rows]][self._offset[rows]])
        out = np.empty((len(rows), *self.shape[1:]), self.dtype)
        shard_of_rows = self._shard[rows]
        for number in np.unique(shard_of_rows):
            picked = shard_of_rows == number
            out[picked] = self._maps[number][self._offset[rows[picked]]]
        return out

    def __array__(self, dtype=None, copy=None):
        array = self[:]
        return array if dtype is None else array.astype(dtype)

    def __iter__(self):
        for row in range(len(self)):
            yield self[row]
