"""The bank of real nodules with radiologists' outlines that lesion insertion cuts lesions from (LIDC-IDRI).

Layout (the public "LIDC-IDRI-slices" layout; ../shared/data/lidc-nodules/PROVENANCE.txt):

    <bank>/LIDC-IDRI-slices/<patient>/nodule-<n>/images/slice-<k>.png    8-bit crop centred on the nodule
    <bank>/LIDC-IDRI-slices/<patient>/nodule-<n>/mask-<r>/slice-<k>.png  reader r's outline (0 / 255)
    <bank>/nodules.csv (optional)                                        image,consensus_area_px: which slices

The consensus outline is what at least two of the readers who outlined the nodule drew (the one reader's
outline when only one did). Every malformed nodule stops the reading with its folder named: a bank that is
silently half-read would change what training sees without anyone knowing.
"""

from __future__ import annotations

import csv
import hashlib
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from chestct.errors import ChestctError

SLICES_FOLDER = "LIDC-IDRI-slices"
INDEX_FILE = "nodules.csv"
MIN_CONSENSUS_PX = 16  # a smaller outline carries no shape worth inserting


class LesionBankError(ChestctError, ValueError):
    """The nodule bank is missing or malformed; the message names the folder or file."""


@dataclass(frozen=True)
class BankNodule:
    name: str  # "<patient>/nodule-<n>/slice-<k>"
    crop: np.ndarray  # (H, W) uint8, the nodule near the centre
    outline: np.ndarray  # (H, W) bool, the consensus outline


def _read_gray(path: Path) -> np.ndarray:
    image = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
    if image is None:
        raise LesionBankError(f"{path}: missing or not a readable PNG")
    return image


def _listed_images(root: Path) -> list[Path]:
    """The crops to read: those nodules.csv names, or every images/slice-*.png under the slices folder."""
    slices = root / SLICES_FOLDER
    if not slices.is_dir():
        raise LesionBankError(f"{root}: no {SLICES_FOLDER}/ folder; train.lesion_supervision.bank_path must name "
                              f"a nodule bank in the LIDC-IDRI-slices layout (or set bank_rate: 0)")
    index = root / INDEX_FILE
    if not index.is_file():
        return sorted(slices.glob("*/nodule-*/images/slice-*.png"))
    with index.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    if not rows or "image" not in rows[0]:
        raise LesionBankError(f"{index}: expected a CSV with an 'image' column (paths under {SLICES_FOLDER}/)")
    return [slices / row["image"] for row in rows]


def consensus(outlines: list[np.ndarray]) -> np.ndarray:
    """Pixels at least two of the readers who drew something marked (all of one reader's when only one did)."""
    drawn = [outline for outline in outlines if outline.any()]
    if not drawn:
        return np.zeros(outlines[0].shape if outlines else (0, 0), bool)
    votes = np.sum(drawn, axis=0)
    return votes >= min(2, len(drawn))


def read_nodule(image_path: Path) -> BankNodule:
    """One crop and its consensus outline; a missing, mismatched or empty outline names the nodule's folder."""
    nodule = image_path.parent.parent
    crop = _read_gray(image_path)
    mask_files = sorted(nodule.glob(f"mask-*/{image_path.name}"))
    if not mask_files:
        raise LesionBankError(f"{nodule}: no reader outline (mask-<r>/{image_path.name}) for {image_path.name}")
    outlines = []
    for mask_file in mask_files:
        outline = _read_gray(mask_file)
        if outline.shape != crop.shape:
            raise LesionBankError(f"{mask_file}: outline is {outline.shape[1]}x{outline.shape[0]} px but the crop is "
                                  f"{crop.shape[1]}x{crop.shape[0]}; each outline must match its crop")
        outlines.append(outline > 127)
    agreed = consensus(outlines)
    if agreed.sum() < MIN_CONSENSUS_PX:
        raise LesionBankError(f"{nodule}: the consensus outline of {image_path.name} covers {int(agreed.sum())} px "
                              f"(at least {MIN_CONSENSUS_PX} needed); remove the nodule from {INDEX_FILE}")
    name = f"{nodule.parent.name}/{nodule.name}/{image_path.stem}"
    return BankNodule(name, crop, agreed)


def read_nodule_bank(root: str | Path) -> list[BankNodule]:
    """Every nodule of the bank at `root`, in a fixed order."""
    root = Path(root)
    if not root.is_dir():
        raise LesionBankError(f"{root}: nodule bank not found; set train.lesion_supervision.bank_path to the "
                              f"lidc-nodules folder, or bank_rate: 0 to train without it")
    images = _listed_images(root)
    if not images:
        raise LesionBankError(f"{root / SLICES_FOLDER}: no nodule crops (<patient>/nodule-<n>/images/slice-<k>.png)")
    return [read_nodule(path) for path in images]


def bank_digest(nodules: list[BankNodule]) -> str:
    """A short digest of every crop and outline, logged with the training so a changed bank is visible."""
    digest = hashlib.sha256()
    for nodule in nodules:
        digest.update(nodule.name.encode())
        digest.update(nodule.crop.tobytes())
        digest.update(np.packbits(nodule.outline).tobytes())
    return digest.hexdigest()[:16]
