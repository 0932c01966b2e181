"""Preprocessed phantom slices for the lesion tests: hosts to insert lesions into, and small training splits."""

from __future__ import annotations

import numpy as np

from chestct.data.phantoms import render_phantom
from chestct.imaging.preprocess import prepare_gray
from chestct.imaging.processed import SplitArrays
from chestct.params import Params


def preprocessed_phantoms(params: Params, count: int, size: int = 64, seed: int = 0, lesions: int = 0
                          ) -> tuple[np.ndarray, np.ndarray]:
    """(images (N, S, S, 1), unstandardised (N, S, S)) of `count` phantoms through the default preprocessing."""
    preprocess = params.preprocess.model_copy(update={"image_size": size})
    rng = np.random.default_rng(seed)
    images, unstandardised = [], []
    for _ in range(count):
        prepared = prepare_gray(render_phantom(rng, (256, 256), lesions), preprocess)
        images.append(prepared.image)
        unstandardised.append(prepared.unstandardised)
    return np.stack(images), np.stack(unstandardised)


def phantom_split(params: Params, normals: int, cancers: int, size: int = 64, seed: int = 0) -> SplitArrays:
    """A split of preprocessed Normal and Cancer phantoms, with their unstandardised images."""
    normal_images, normal_raw = preprocessed_phantoms(params, normals, size, seed)
    cancer_images, cancer_raw = preprocessed_phantoms(params, cancers, size, seed + 1, lesions=1)
    labels = np.r_[np.zeros(normals, np.int64), np.ones(cancers, np.int64)]
    return SplitArrays(np.concatenate([normal_images, cancer_images]), labels,
                       np.where(labels == 0, "normal", "adenocarcinoma"),
                       np.array([f"p{i:03d}" for i in range(len(labels))]), np.concatenate([normal_raw, cancer_raw]))
