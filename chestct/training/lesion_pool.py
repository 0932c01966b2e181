"""The training images with outlined lesions, built once per run: the sources of the lesion map's dense targets.

- procedural, bank (`train.lesion_supervision.procedural_rate`, `bank_rate`): each Normal training slice gets
  `augment.lesion_insertion.variants` lesions, one per copy, drawn from a seed of its own.
- crop (`crop_rate`): every LIDC nodule crop of the bank at its own scale, the whole crop as the input (through
  the same preprocessing as a slice, without the lung-field crop: it is a crop already). Its consensus outline is
  the target and the rest of the crop, another hospital's lung, is negative.

The input pipeline draws the Normal half of every batch from the plain Normals and these pools at the configured
rates, and geometry, acquisition augmentation and MixUp then vary every copy anew each time it is drawn.
A fixed pool rather than insertion inside tf.data: insertion needs the lung fields and distance transforms
(OpenCV), and a pool keeps the pipeline pure TensorFlow, parallel and deterministic.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from chestct.imaging.preprocess import prepare_gray
from chestct.imaging.transforms import resize_square
from chestct.params import LesionInsertionParams, LesionSupervisionParams, PreprocessParams
from chestct.training.lesion_bank import BankNodule, bank_digest, read_nodule_bank
from chestct.training.lesion_insertion import insert, placement_region

INSERTED_SOURCES = ("procedural", "bank")  # lesions put into the Normal training slices
SOURCE_DESCRIPTIONS = {"procedural": "procedural inserted lesions", "bank": "LIDC nodules inserted",
                       "crop": "LIDC nodule crops at their own scale"}
_SALT = {"procedural": 1, "bank": 2}


@dataclass
class LesionPool:
    """Inserted copies of Normal slices, per source: images (N, S, S) uint8 and masks (N, S, S) bool."""

    images: dict[str, np.ndarray] = field(default_factory=dict)
    masks: dict[str, np.ndarray] = field(default_factory=dict)
    diameters_px: dict[str, np.ndarray] = field(default_factory=dict)
    rates: dict[str, float] = field(default_factory=dict)
    bank_digest: str | None = None

    def summary(self) -> dict:
        """What training logs: counts, rates and the lesion size in input pixels, per source."""
        report: dict = {}
        for source, images in self.images.items():
            diameters = self.diameters_px[source]
            report[source] = {"rate": self.rates[source], "images": int(len(images)),
                              "diameter_px_p05": round(float(np.percentile(diameters, 5)), 1),
                              "diameter_px_median": round(float(np.median(diameters)), 1),
                              "diameter_px_p95": round(float(np.percentile(diameters, 95)), 1),
                              "mask_px_median": int(np.median(self.masks[source].sum(axis=(1, 2))))}
        if self.bank_digest:
            report["bank_digest"] = self.bank_digest
        return report


def _insert_all(hosts: np.ndarray, regions: list[np.ndarray], params: LesionInsertionParams, seed: int,
                source: str, bank: list[BankNodule] | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng([seed, _SALT[source]])
    images, masks, diameters = [], [], []
    started, total = time.perf_counter(), len(hosts) * params.variants
    for index, (host, region) in enumerate(zip(hosts, regions, strict=True)):
        for _ in range(params.variants):
            nodule = None if bank is None else bank[int(rng.integers(len(bank)))]
            inserted = insert(host, rng, params, nodule=nodule, region=region)
            if inserted is not None and inserted.mask.any():
                images.append(inserted.image)
                masks.append(inserted.mask)
                diameters.append(inserted.diameter_px)
        done = (index + 1) * params.variants
        if index + 1 == len(hosts) or (index + 1) % 50 == 0:
            print(f"lesion insertion ({source}): {done}/{total} copies, {time.perf_counter() - started:.0f} s",
                  file=sys.stderr, flush=True)
    if not images:
        raise ValueError(f"lesion insertion ({source}): no Normal training slice had room for a lesion; "
                         f"lower augment.lesion_insertion.diameter or border_margin")
    return np.stack(images), np.stack(masks), np.asarray(diameters)


@dataclass(frozen=True)
class CropPreparation:
    """How a nodule crop becomes a training input: the slices' preprocessing without the lung-field crop, at the
    training slices' size, ending where training starts (the unstandardised image when training redoes the
    standardisation)."""

    preprocess: PreprocessParams
    restandardised: bool

    def __call__(self, crop: np.ndarray, outline: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
        """(image (size, size) uint8, target mask (size, size) bool) of one crop and its outline."""
        params = self.preprocess.model_copy(update={"crop": "none", "image_size": size})
        prepared = prepare_gray(crop, params)
        image = prepared.unstandardised if self.restandardised else prepared.image[..., 0]
        if image is None:
            raise ValueError("training redoes the standardisation but preprocess keeps no unstandardised image")
        mask = resize_square(outline.astype(np.uint8) * 255, size, params.resize_mode) > 127
        return image, mask


def _crops(bank: list[BankNodule], prepare: CropPreparation, size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    images, masks = [], []
    started = time.perf_counter()
    for index, nodule in enumerate(bank):
        image, mask = prepare(nodule.crop, nodule.outline, size)
        if mask.any():
            images.append(image)
            masks.append(mask)
        if index + 1 == len(bank) or (index + 1) % 200 == 0:
            print(f"nodule crops at their own scale: {index + 1}/{len(bank)}, {time.perf_counter() - started:.0f} s",
                  file=sys.stderr, flush=True)
    if not images:
        raise ValueError(f"nodule crops: no outline survives the resize to {size} px; set crop_rate: 0")
    masks_array = np.stack(masks)
    diameters = 2.0 * np.sqrt(masks_array.sum(axis=(1, 2)) / np.pi)  # of the disc with the outline's area
    return np.stack(images), masks_array, diameters


def build_lesion_pool(normals: np.ndarray, insertion: LesionInsertionParams, supervision: LesionSupervisionParams,
                      seed: int, bank: list[BankNodule] | None = None,
                      crop_preparation: CropPreparation | None = None) -> LesionPool:
    """The pool for `normals` (N, S, S) uint8. The bank is read from `supervision.bank_path` unless given; nodule
    crops (crop_rate > 0) need `crop_preparation`."""
    pool = LesionPool()
    rates = supervision.source_rates
    if supervision.reads_bank:
        bank = bank if bank is not None else read_nodule_bank(Path(supervision.bank_path))
        pool.bank_digest = bank_digest(bank)
    regions = [placement_region(host) for host in normals] if any(rates[s] for s in INSERTED_SOURCES) else []
    for source in INSERTED_SOURCES:
        if rates[source] <= 0:
            continue
        nodules = bank if source == "bank" else None
        images, masks, diameters = _insert_all(normals, regions, insertion, seed, source, nodules)
        pool.images[source], pool.masks[source], pool.diameters_px[source] = images, masks, diameters
        pool.rates[source] = rates[source]
    if rates["crop"] > 0:
        if crop_preparation is None:
            raise ValueError("train.lesion_supervision.crop_rate > 0 needs the preprocessing the crops go through")
        crops = _crops(bank, crop_preparation, size=normals.shape[-1])  # at the training slices' size
        pool.images["crop"], pool.masks["crop"], pool.diameters_px["crop"] = crops
        pool.rates["crop"] = rates["crop"]
    return pool
