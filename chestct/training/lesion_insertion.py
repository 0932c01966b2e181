"""Lesion insertion: a lesion put into a Normal training slice, with the mask of where it went.

A Normal slice with an inserted lesion is the one kind of training image whose lesion outline is known, so it
is what teaches the lesion map WHERE a lesion is (train.lesion_supervision). The insertion works on the image
training starts from - the unstandardised masked slice when training redoes the intensity standardisation
(0 outside what preprocess kept, >= 1 inside), so the pipeline's own standardisation follows it as for any
real lesion - and tries to leave nothing but the lesion as a cue:

- placed inside the lung fields (chestct.imaging.anatomy.lung_mask) and away from their border, the whole
  lesion inside them;
- sized by the lung field's width (`augment.lesion_insertion.diameter`, a fraction of it), so it is visible
  at the model's input resolution whatever that is;
- as dense as the host's own soft tissue (its chest wall and mediastinum where preprocess kept them, else the
  brightest tenth of what it kept), times a contrast drawn in `contrast`;
- with the host's own noise added back inside the lesion (the blend would otherwise leave it smooth), and a
  feathered edge;
- shaped by the phantom renderer (procedural) or cut from a real nodule of the LIDC bank along its consensus
  outline, its texture contrast-normalised and rescaled to the drawn size (bank).

Everything is drawn from one numpy Generator: the same seed gives the same lesions.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from chestct.data.phantoms import lesion_alpha
from chestct.imaging.anatomy import lung_mask
from chestct.imaging.standardise import noise_level
from chestct.params import LesionInsertionParams
from chestct.training.lesion_bank import BankNodule

MIN_TISSUE_PIXELS = 50  # fewer pixels of kept soft tissue than this: estimate the density from the lung fields
MASK_LEVEL = 0.5  # the lesion's opacity from which a pixel counts as lesion in the target mask
MIN_DIAMETER_PX = 3.0  # a smaller lesion is invisible at the input's resolution: no room for one


@dataclass(frozen=True)
class Inserted:
    image: np.ndarray  # (S, S) uint8, the host with the lesion
    mask: np.ndarray  # (S, S) bool, where the lesion is (opacity >= MASK_LEVEL)
    diameter_px: float  # the drawn lesion diameter in input pixels


def placement_region(host: np.ndarray) -> np.ndarray:
    """The lung fields of a host slice, or what preprocess kept when no lung field is found in it.

    What preprocess kept (non-zero) is the body: `lung_mask`'s own body estimate would take the bright
    mediastinum of a lungs-masked slice for the body and look for lungs inside the heart."""
    kept = host > 0
    lungs = lung_mask(host, kept if not kept.all() else None)
    return lungs if lungs.any() else kept


def tissue_level(host: np.ndarray, lungs: np.ndarray) -> float:
    """The grey level of the host's soft tissue: the median of kept pixels outside the lung fields, or (too few
    of them: preprocess kept little more than the lungs) the 90th percentile of the lung fields' pixels."""
    tissue = host[(host > 0) & ~lungs]
    if tissue.size >= MIN_TISSUE_PIXELS:
        return float(np.median(tissue))
    inside = host[lungs & (host > 0)]
    return float(np.percentile(inside, 90)) if inside.size else 128.0


def _centre(rng: np.random.Generator, region: np.ndarray, radius: float, margin_px: float) -> tuple[int, int] | None:
    """A random point of `region` at least radius + margin from its border, or None when there is none."""
    inside = cv2.distanceTransform(region.astype(np.uint8), cv2.DIST_L2, 5)
    ys, xs = np.nonzero(inside >= radius + margin_px)
    if not len(xs):
        return None
    pick = int(rng.integers(len(xs)))
    return int(xs[pick]), int(ys[pick])


def _field_width(region: np.ndarray) -> int:
    _, _, width, _ = cv2.boundingRect(region.astype(np.uint8))
    return width


def procedural_lesion(rng: np.random.Generator, diameter: float) -> tuple[np.ndarray, np.ndarray]:
    """(opacity, texture) of a phantom-renderer mass of this diameter, on a square patch around it."""
    radius = diameter / 2
    side = int(np.ceil(3.6 * radius)) | 1
    alpha = lesion_alpha(rng, (side, side), (side / 2, side / 2), radius)
    return alpha, np.zeros_like(alpha)


def bank_lesion(nodule: BankNodule, diameter: float) -> tuple[np.ndarray, np.ndarray]:
    """(opacity, texture) of a bank nodule: cut out along its consensus outline, rescaled so the outline's
    equivalent diameter is `diameter`, the texture its grey levels inside the outline in units of their std."""
    outline = nodule.outline.astype(np.float32)
    ys, xs = np.nonzero(nodule.outline)
    pad = 2
    y0, y1 = max(0, ys.min() - pad), min(outline.shape[0], ys.max() + pad + 1)
    x0, x1 = max(0, xs.min() - pad), min(outline.shape[1], xs.max() + pad + 1)
    outline, crop = outline[y0:y1, x0:x1], nodule.crop[y0:y1, x0:x1].astype(np.float32)
    scale = diameter / (2 * np.sqrt(nodule.outline.sum() / np.pi))
    size = (max(3, round(outline.shape[1] * scale)), max(3, round(outline.shape[0] * scale)))
    outline = cv2.resize(outline, size, interpolation=cv2.INTER_LINEAR)
    crop = cv2.resize(crop, size, interpolation=cv2.INTER_LINEAR)
    inside = outline >= MASK_LEVEL
    values = crop[inside] if inside.any() else crop.ravel()
    texture = (crop - values.mean()) / max(float(values.std()), 1.0)
    feather = cv2.GaussianBlur(outline, (0, 0), max(0.5, 0.06 * diameter))
    margin = int(np.ceil(0.3 * diameter)) + 2  # room for the feathered edge around the cut-out
    return (np.pad(feather, margin), np.pad(np.clip(texture, -3, 3) * inside, margin))


def insert(host: np.ndarray, rng: np.random.Generator, params: LesionInsertionParams,
           nodule: BankNodule | None = None, region: np.ndarray | None = None) -> Inserted | None:
    """`host` (S, S) uint8 with one lesion inserted (procedural, or `nodule` from the bank), or None when the
    lung fields have no room for a lesion of the drawn size."""
    host = np.asarray(host)
    region = placement_region(host) if region is None else region
    if not region.any():
        return None
    diameter = float(rng.uniform(*params.diameter)) * _field_width(region)
    if diameter < MIN_DIAMETER_PX:
        return None
    alpha, texture = procedural_lesion(rng, diameter) if nodule is None else bank_lesion(nodule, diameter)
    centre = _centre(rng, region, diameter / 2, params.border_margin * host.shape[0])
    if centre is None:
        return None
    level = tissue_level(host, region) * float(rng.uniform(*params.contrast))
    sigma = noise_level(host)
    spread = max(sigma, 0.06 * level)  # the texture's grey-level spread (a bank nodule's own detail)
    patch = level + texture * spread + rng.standard_normal(alpha.shape).astype(np.float32) * sigma
    return _blend(host, region, alpha * region_patch(region, alpha.shape, centre), patch, centre, diameter)


def region_patch(region: np.ndarray, shape: tuple[int, int], centre: tuple[int, int]) -> np.ndarray:
    """The region's pixels under a patch of `shape` centred at `centre` (0 beyond the image): the lesion is
    clipped to the lung fields, so nothing of it lands on the wall or outside the body."""
    return _window(region.astype(np.float32), shape, centre)


def _window(image: np.ndarray, shape: tuple[int, int], centre: tuple[int, int]) -> np.ndarray:
    height, width = shape
    x0, y0 = centre[0] - width // 2, centre[1] - height // 2
    padded = np.pad(image, ((height, height), (width, width)))
    return padded[y0 + height:y0 + 2 * height, x0 + width:x0 + 2 * width]


def _blend(host: np.ndarray, region: np.ndarray, alpha: np.ndarray, patch: np.ndarray, centre: tuple[int, int],
           diameter: float) -> Inserted:
    height, width = alpha.shape
    full_alpha = np.zeros(host.shape, np.float32)
    full_patch = np.zeros(host.shape, np.float32)
    x0, y0 = centre[0] - width // 2, centre[1] - height // 2
    ys = slice(max(0, y0), min(host.shape[0], y0 + height))
    xs = slice(max(0, x0), min(host.shape[1], x0 + width))
    inner = (slice(ys.start - y0, ys.stop - y0), slice(xs.start - x0, xs.stop - x0))
    full_alpha[ys, xs] = alpha[inner]
    full_patch[ys, xs] = patch[inner]
    blended = host.astype(np.float32) * (1 - full_alpha) + full_patch * full_alpha
    kept = host > 0
    image = np.where(kept, np.clip(np.rint(blended), 1, 255), 0).astype(np.uint8)
    return Inserted(image, (full_alpha >= MASK_LEVEL) & region, diameter)
