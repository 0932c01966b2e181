"""The inserted-lesion training images: every Normal training slice with lesions put in, built once per run.

For each source with a rate above 0 (`train.lesion_supervision.procedural_rate`, `bank_rate`), each Normal
training slice gets `augment.lesion_insertion.variants` lesions, one per copy, drawn from a seed of its own. The
input pipeline draws the Normal half of every batch from the plain Normals and these pools at the configured
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

from chestct.params import LesionInsertionParams, LesionSupervisionParams
from chestct.training.lesion_bank import BankNodule, bank_digest, read_nodule_bank
from chestct.training.lesion_insertion import insert, placement_region

SOURCES = ("procedural", "bank")
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


def build_lesion_pool(normals: np.ndarray, insertion: LesionInsertionParams, supervision: LesionSupervisionParams,
                      seed: int, bank: list[BankNodule] | None = None) -> LesionPool:
    """The pool for `normals` (N, S, S) uint8. The bank is read from `supervision.bank_path` unless given."""
    pool = LesionPool()
    rates = {"procedural": supervision.procedural_rate, "bank": supervision.bank_rate}
    if not any(rates.values()):
        return pool
    regions = [placement_region(host) for host in normals]
    for source in SOURCES:
        if rates[source] <= 0:
            continue
        nodules = None
        if source == "bank":
            nodules = bank if bank is not None else read_nodule_bank(Path(supervision.bank_path))
            pool.bank_digest = bank_digest(nodules)
        images, masks, diameters = _insert_all(normals, regions, insertion, seed, source, nodules)
        pool.images[source], pool.masks[source], pool.diameters_px[source] = images, masks, diameters
        pool.rates[source] = rates[source]
    return pool
