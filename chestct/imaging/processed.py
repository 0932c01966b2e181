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
from chestct.imaging.decode import decode_grayscale
from chestct.imaging.preprocess import Prepared, prepare_gray
from chestct.labels import CANCER, NORMAL, SPLITS
from chestct.params import PreprocessParams

ARRAY_KEYS = ("images", "labels", "subtypes", "ids")
OPTIONAL_KEYS = ("unstandardised",)  # (N, S, S) uint8 before intensity standardisation, when preprocess masks


class SplitFileError(ChestctError, ValueError):
    """A processed split file is missing or does not hold the expected arrays."""


@dataclass(frozen=True)
class SplitArrays:
    """One processed split: uint8 images (N, S, S, 1), int labels (N,), str subtypes (N,) and ids (N,), and
    optionally the unstandardised masked images (N, S, S) that photometric augmentation starts from."""

    images: np.ndarray
    labels: np.ndarray
    subtypes: np.ndarray
    ids: np.ndarray
    unstandardised: np.ndarray | None = None

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
            arrays = {key: npz[key] for key in ARRAY_KEYS + OPTIONAL_KEYS if key in npz.files}
    except (OSError, ValueError) as exc:
        if isinstance(exc, SplitFileError):
            raise
        raise SplitFileError(f"{path}: not a readable processed split ({exc}); rerun `dvc repro preprocess`") from None
    try:
        return SplitArrays(**arrays)
    except ValueError as exc:
        raise SplitFileError(f"{path}: {exc}; rerun `dvc repro preprocess`") from None


def _prepare_one(image_id: str, data_folder: Path, params: PreprocessParams) -> Prepared:
    return prepare_gray(decode_grayscale(data_folder / image_id, name=image_id), params)


def preprocess_manifest(manifest: pd.DataFrame, data_folder: Path, params: PreprocessParams,
                        progress: bool = True) -> tuple[dict[str, dict[str, np.ndarray]], dict]:
    """Preprocess every manifest image (in parallel, order kept) into per-split arrays; also return the crop
    report (how many crop boxes came from the lungs, from the body, or from the whole image, per split)."""
    ids = manifest["id"].tolist()
    work = partial(_prepare_one, data_folder=Path(data_folder), params=params)
    bar = dict(total=len(ids), desc="preprocessing", unit="img", disable=not progress)
    if params.workers > 1 and len(ids) > 1:
        with Pool(params.workers) as pool:
            prepared = list(tqdm(pool.imap(work, ids, chunksize=8), **bar))
    else:
        prepared = [work(image_id) for image_id in tqdm(ids, **bar)]
    size = params.image_size
    stacked = np.stack([p.image for p in prepared]) if prepared else np.zeros((0, size, size, 1), np.uint8)
    keep_unstandardised = bool(prepared) and prepared[0].unstandardised is not None
    found = np.array([p.crop for p in prepared], dtype=object)
    arrays, crops = {}, {"mode": params.crop}
    for split in SPLITS:
        members = (manifest["split"] == split).to_numpy()
        arrays[split] = {
            "images": stacked[members],
            "labels": manifest.loc[members, "label"].to_numpy(dtype=np.int64),
            "subtypes": manifest.loc[members, "subtype"].to_numpy(dtype=str),
            "ids": manifest.loc[members, "id"].to_numpy(dtype=str),
        }
        if keep_unstandardised:
            arrays[split]["unstandardised"] = np.stack(
                [p.unstandardised for p, member in zip(prepared, members, strict=True) if member]
            ) if members.any() else np.zeros((0, size, size), np.uint8)
        if params.crop != "none":
            crops[split] = {source: int(np.sum(found[members] == source)) for source in ("lungs", "body", "image")}
    return arrays, {"crop": crops}


def save_processed(folder: Path, arrays: dict[str, dict[str, np.ndarray]]) -> None:
    """Write <split>.npz for every split; the folder appears only once all are written.

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
            np.savez(temp / f"{split}.npz",
                     **{key: split_arrays[key] for key in ARRAY_KEYS + OPTIONAL_KEYS if key in split_arrays})
