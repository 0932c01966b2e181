"""Run THE preprocessing (chestct.imaging) over the manifest and store one .npz per split.

Each .npz holds `images` (N x S x S x 1 uint8), `labels` (N,), `subtypes` (N,) and `ids` (N,), in manifest
order, so every later stage reads exactly the arrays the model trains on.
"""

from __future__ import annotations

from functools import partial
from multiprocessing import Pool
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm import tqdm

from chestct.atomic_io import atomic_path
from chestct.imaging import preprocess_image
from chestct.labels import SPLITS
from chestct.params import PreprocessParams


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
    """Write <split>.npz for every split; the folder appears only once all are written."""
    with atomic_path(folder) as temp:
        temp.mkdir()
        for split, split_arrays in arrays.items():
            np.savez(temp / f"{split}.npz", **split_arrays)
