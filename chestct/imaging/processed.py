"""The processed-array format, its one owner: `data/processed/<split>.npz`, written and read only here.

`preprocess_manifest` runs THE preprocessing (chestct.imaging.preprocess) over the manifest; `save_processed`
writes one .npz per split holding `images` (N x S x S x 1 uint8), `labels` (N,), `subtypes` (N,) and `ids` (N,),
in manifest order; `load_split` reads one back and validates it as `SplitArrays`. Every later stage reads exactly
the arrays the model trains on.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from multiprocessing import Pool
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm import tqdm

from chestct.atomic_io import atomic_path
from chestct.errors import ChestctError
from chestct.imaging.preprocess import preprocess_image
from chestct.labels import CANCER, NORMAL, SPLITS
from chestct.params import PreprocessParams

ARRAY_KEYS = ("images", "labels", "subtypes", "ids")


class SplitFileError(ChestctError, ValueError):
    """A processed split file is missing or does not hold the expected arrays."""


@dataclass(frozen=True)
class SplitArrays:
    """One processed split: uint8 images (N, S, S, 1), int labels (N,), str subtypes (N,) and ids (N,)."""

    images: np.ndarray
    labels: np.ndarray
    subtypes: np.ndarray
    ids: np.ndarray

    def __post_init__(self) -> None:
        if self.images.ndim != 4 or self.images.shape[-1] != 1 or self.images.shape[1] != self.images.shape[2]:
            raise ValueError(f"images must be (N, S, S, 1), got shape {self.images.shape}")
        if self.images.dtype != np.uint8:
            raise ValueError(f"images must be uint8 (0..255), got {self.images.dtype}")
        count = len(self.images)
        for name in ARRAY_KEYS[1:]:
            if getattr(self, name).shape != (count,):
                raise ValueError(f"{name} must have shape ({count},), got {getattr(self, name).shape}")
        unknown = set(np.unique(self.labels).tolist()) - {NORMAL, CANCER}
        if unknown:
            raise ValueError(f"labels must be {NORMAL} (Normal) or {CANCER} (Cancer), found {sorted(unknown)}")

    def __len__(self) -> int:
        return len(self.images)

    @property
    def image_size(self) -> int:
        return int(self.images.shape[1])


def load_split(path: str | Path) -> SplitArrays:
    """Read one `data/processed/<split>.npz`; a missing or malformed file fails with its name and a way out."""
    path = Path(path)
    if not path.is_file():
        raise SplitFileError(f"{path}: processed split not found; run `dvc repro preprocess` to create it")
    try:
        with np.load(path, allow_pickle=False) as npz:
            missing = [key for key in ARRAY_KEYS if key not in npz.files]
            if missing:
                raise SplitFileError(f"{path}: missing arrays {missing}; rerun `dvc repro preprocess`")
            arrays = {key: npz[key] for key in ARRAY_KEYS}
    except (OSError, ValueError) as exc:
        if isinstance(exc, SplitFileError):
            raise
        raise SplitFileError(f"{path}: not a readable processed split ({exc}); rerun `dvc repro preprocess`") from None
    try:
        return SplitArrays(**arrays)
    except ValueError as exc:
        raise SplitFileError(f"{path}: {exc}; rerun `dvc repro preprocess`") from None


def _preprocess_one(image_id: str, data_folder: Path, params: PreprocessParams) -> np.ndarray:
    return preprocess_image(data_folder / image_id, params, name=image_id)


def preprocess_manifest(manifest: pd.DataFrame, data_folder: Path, params: PreprocessParams,
                        progress: bool = True) -> dict[str, dict[str, np.ndarray]]:
    """Preprocess every manifest image (in parallel, order kept) into per-split arrays."""
    ids = manifest["id"].tolist()
    work = partial(_preprocess_one, data_folder=Path(data_folder), params=params)
    bar = dict(total=len(ids), desc="preprocessing", unit="img", disable=not progress)
    if params.workers > 1 and len(ids) > 1:
        with Pool(params.workers) as pool:
            images = list(tqdm(pool.imap(work, ids, chunksize=8), **bar))
    else:
        images = [work(image_id) for image_id in tqdm(ids, **bar)]
    size = params.image_size
    stacked = np.stack(images) if images else np.zeros((0, size, size, 1), np.uint8)
    arrays = {}
    for split in SPLITS:
        members = (manifest["split"] == split).to_numpy()
        arrays[split] = {
            "images": stacked[members],
            "labels": manifest.loc[members, "label"].to_numpy(dtype=np.int64),
            "subtypes": manifest.loc[members, "subtype"].to_numpy(dtype=str),
            "ids": manifest.loc[members, "id"].to_numpy(dtype=str),
        }
    return arrays


def save_processed(folder: Path, arrays: dict[str, dict[str, np.ndarray]]) -> None:
    """Write <split>.npz for every split; the folder appears only once all are written.

    Each split is validated as `SplitArrays` first, so a malformed array never reaches the cache.
    """
    for split, split_arrays in arrays.items():
        try:
            SplitArrays(**{key: split_arrays[key] for key in ARRAY_KEYS})
        except (KeyError, ValueError) as exc:
            raise SplitFileError(f"processed split {split!r} is malformed ({exc}); nothing was written") from None
    with atomic_path(folder) as temp:
        temp.mkdir()
        for split, split_arrays in arrays.items():
            np.savez(temp / f"{split}.npz", **{key: split_arrays[key] for key in ARRAY_KEYS})
