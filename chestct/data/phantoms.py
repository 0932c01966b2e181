"""Synthetic chest CT phantoms, written in the exact layout of the Kaggle chest-ctscan-images dataset.

The real images cannot be shipped with the project, and the real dataset is confounded: its Normal class differs
from Cancer in global brightness and contrast. The phantoms are built so that a model can only succeed by finding
the lesion:

* both classes share one anatomy model (body, lungs, mediastinum, spine, ribs, vessels) and one random global
  intensity transform drawn independently of the class, so per-image mean and standard deviation do not separate
  Normal from Cancer;
* a Cancer phantom adds 1-3 soft-tissue masses inside a lung field, 4-12 % of the shorter side across, so they stay
  visible after downscaling to 64 px;
* the files copy the real dataset's quirks: long/short class folder names, mostly RGBA PNG with some RGB, grayscale
  and JPEG files (one JPEG behind a .png name), " - Copy" file names, non-square sizes, and byte-identical train
  images leaked into test/valid.

Generation is deterministic: the same SyntheticParams give byte-identical files.
"""

from __future__ import annotations

import io
import math
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from PIL import Image
from tqdm import tqdm

from chestct.labels import CANCER_SUBTYPES, FOLDER_NAMES_BY_SPLIT, SPLITS, SUBTYPES
from chestct.params import SyntheticParams

__all__ = ["render_phantom", "generate_phantom_dataset"]

MIN_RENDER_SIDE = 32
LESION_DIAMETER = (0.07, 0.16)  # fraction of the shorter image side: masses (>= 3 cm), visible at 64 px
MAX_LESIONS_PER_IMAGE = 3
ASPECT_RANGE = (0.6, 1.0)  # height / width, like the real scans (median about 296 x 419)
WIDTH_LOG_SPREAD = 0.25  # standard deviation of log(width), as in the real scans

# Storage formats, with the real dataset's rough shares (923 RGBA, 58 RGB, 3 L PNG, 16 JPEG of 1000).
RGBA_PNG, RGB_PNG, GRAY_PNG, JPEG, JPEG_NAMED_PNG = "rgba_png", "rgb_png", "grayscale_png", "jpeg", "jpeg_named_png"
STORAGE_SHARES = {RGBA_PNG: 0.84, RGB_PNG: 0.08, GRAY_PNG: 0.02, JPEG: 0.06}
MIN_IMAGES_FOR_EVERY_FORMAT = 8  # a split at least this big gets at least one file of every storage format
COPY_NAMED = "copy_named"
DUPLICATE = "duplicate"

PNG_COMPRESS_LEVEL = 1  # zlib level: phantom noise barely compresses, and level 6 would take 4x the time
_SHIFT = 4  # fractional bits for cv2 drawing: sub-pixel shapes even in small images
_SCALE = 1 << _SHIFT


# --- rendering --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _BodyFrame:
    """Body coordinates (u to the image right, v posterior = down, body semi-axes = 1) to pixels, slightly rotated."""

    cx: float
    cy: float
    ax: float
    ay: float
    angle_deg: float

    def to_px(self, u, v):
        rad = math.radians(self.angle_deg)
        x, y = np.multiply(u, self.ax), np.multiply(v, self.ay)
        return self.cx + x * math.cos(rad) - y * math.sin(rad), self.cy + x * math.sin(rad) + y * math.cos(rad)


class _Slice:
    """The float image being drawn (values in [0, 1] before windowing) and the mask of visible lung."""

    def __init__(self, height: int, width: int):
        self.image = np.zeros((height, width), np.float32)
        self.lung = np.zeros((height, width), np.uint8)
        self.depth = np.zeros((height, width), np.float32)  # px from the lung edge, 0 outside; see measure_lungs
        self.lung_box = (0, 0, 0, 0)  # x, y, width, height

    def measure_lungs(self) -> None:
        """Once the lung mask is final: how deep each pixel lies in the lung, for placing vessels and lesions."""
        self.depth = cv2.distanceTransform(self.lung, cv2.DIST_L2, 3)
        self.lung_box = cv2.boundingRect(self.lung)

    def fill(self, poly: np.ndarray, value: float, lung: bool = False) -> None:
        cv2.fillPoly(self.image, [poly], float(value), shift=_SHIFT)
        cv2.fillPoly(self.lung, [poly], int(lung), shift=_SHIFT)

    def ellipse(self, center, axes, angle: float, value: float) -> None:
        """A filled ellipse of tissue or bone: it hides whatever lung lay there."""
        c, a = _fixed(center), (max(1, round(axes[0] * _SCALE)), max(1, round(axes[1] * _SCALE)))
        cv2.ellipse(self.image, c, a, angle, 0, 360, float(value), -1, cv2.LINE_8, _SHIFT)
        cv2.ellipse(self.lung, c, a, angle, 0, 360, 0, -1, cv2.LINE_8, _SHIFT)


def _fixed(point) -> tuple[int, int]:
    return round(float(point[0]) * _SCALE), round(float(point[1]) * _SCALE)


def _closed_curve(rng: np.random.Generator, points: int, power: float, wobble: float):
    """A unit superellipse whose radius wobbles with a few random low-order harmonics (an irregular outline)."""
    t = np.linspace(0.0, 2.0 * np.pi, points, endpoint=False)
    radius = np.ones_like(t)
    for k in range(2, 6):
        radius += rng.uniform(-wobble, wobble) * np.cos(k * t + rng.uniform(0.0, 2.0 * np.pi))
    c, s = np.cos(t), np.sin(t)
    e = 2.0 / power
    return np.sign(c) * np.abs(c) ** e * radius, np.sign(s) * np.abs(s) ** e * radius


def _shape(rng, frame: _BodyFrame, u0, v0, su, sv, *, tilt=0.0, power=2.0, wobble=0.03, points=64) -> np.ndarray:
    """An irregular closed polygon in body coordinates, as cv2 fixed-point pixel points."""
    x, y = _closed_curve(rng, points, power, wobble)
    rad = math.radians(tilt)
    u = u0 + su * x * math.cos(rad) - sv * y * math.sin(rad)
    v = v0 + su * x * math.sin(rad) + sv * y * math.cos(rad)
    px, py = frame.to_px(u, v)
    return np.round(np.stack([px, py], axis=-1) * _SCALE).astype(np.int32)


def _body_frame(rng: np.random.Generator, height: int, width: int) -> _BodyFrame:
    """Where the body lies: chests are wider than deep, so the body keeps its own aspect inside any canvas."""
    depth_ratio = rng.uniform(0.62, 0.8)
    ax = min(0.46 * width, 0.46 * height / depth_ratio) * rng.uniform(0.82, 1.0)
    ay = ax * depth_ratio
    cx = width / 2 + rng.uniform(-0.04, 0.04) * width
    cy = height / 2 + rng.uniform(-0.04, 0.04) * height
    return _BodyFrame(cx, cy, ax, ay, rng.uniform(-5.0, 5.0))


def _draw_body(rng, sl: _Slice, frame: _BodyFrame) -> None:
    power = rng.uniform(2.2, 2.8)  # boxier than an ellipse, like a real chest
    sl.fill(_shape(rng, frame, 0, 0, 1, 1, power=power, wobble=0.02), rng.uniform(0.30, 0.37))  # skin and fat
    wall = rng.uniform(0.88, 0.94)
    sl.fill(_shape(rng, frame, 0, 0.02, wall, wall - 0.02, power=power, wobble=0.025), rng.uniform(0.46, 0.53))
    if rng.random() < 0.5:  # the scanner couch: a thin arc under the patient
        center = frame.to_px(0, rng.uniform(1.05, 1.12) + 1.6)
        cv2.ellipse(sl.image, _fixed(center), _fixed((1.6 * frame.ax, 1.6 * frame.ay)), frame.angle_deg,
                    240, 300, rng.uniform(0.35, 0.5), max(1, round(0.012 * frame.ax)), cv2.LINE_8, _SHIFT)


def _draw_lungs(rng, sl: _Slice, frame: _BodyFrame) -> None:
    for side in (-1, 1):
        u0 = side * rng.uniform(0.40, 0.47)
        su, sv = rng.uniform(0.29, 0.35), rng.uniform(0.60, 0.72)
        poly = _shape(rng, frame, u0, rng.uniform(-0.06, 0.08), su, sv, tilt=side * rng.uniform(-4, 10),
                      power=rng.uniform(1.8, 2.4), wobble=0.04)
        sl.fill(poly, rng.uniform(0.04, 0.09), lung=True)


def _draw_mediastinum(rng, sl: _Slice, frame: _BodyFrame) -> None:
    r = frame.ax
    sl.fill(_shape(rng, frame, rng.uniform(-0.03, 0.04), rng.uniform(-0.15, 0.0), rng.uniform(0.14, 0.2),
                   rng.uniform(0.5, 0.62), power=2.4, wobble=0.05), rng.uniform(0.36, 0.44))  # mediastinal fat
    if rng.random() < 0.65:  # a slice through the heart
        sl.fill(_shape(rng, frame, rng.uniform(0.03, 0.12), rng.uniform(-0.12, 0.08), rng.uniform(0.2, 0.28),
                       rng.uniform(0.28, 0.4), tilt=rng.uniform(-25, 5), wobble=0.04), rng.uniform(0.57, 0.66))
    else:  # an upper slice: ascending aorta and the dark trachea
        sl.ellipse(frame.to_px(rng.uniform(0.0, 0.08), rng.uniform(-0.35, -0.2)), (0.09 * r, 0.09 * r), 0,
                   rng.uniform(0.58, 0.68))
        sl.ellipse(frame.to_px(rng.uniform(-0.06, 0.0), rng.uniform(-0.02, 0.1)), (0.05 * r, 0.045 * r), 0,
                   rng.uniform(0.0, 0.04))
    aorta = rng.uniform(0.05, 0.07) * r  # the descending aorta, left of the spine
    sl.ellipse(frame.to_px(rng.uniform(0.09, 0.13), rng.uniform(0.3, 0.4)), (aorta, aorta), 0, rng.uniform(0.58, 0.7))


def _draw_spine(rng, sl: _Slice, frame: _BodyFrame) -> None:
    r = rng.uniform(0.075, 0.09) * frame.ax
    vb = rng.uniform(0.5, 0.58)
    body = frame.to_px(0.0, vb)
    bone = rng.uniform(0.86, 0.97)
    sl.ellipse(body, (r, 0.9 * r), frame.angle_deg, bone)  # vertebral body: bright cortex...
    sl.ellipse(body, (0.78 * r, 0.7 * r), frame.angle_deg, bone - rng.uniform(0.12, 0.2))  # ...cancellous core
    down = r / frame.ay  # one vertebral radius, in v units
    sl.ellipse(frame.to_px(0.0, vb + 1.45 * down), (0.55 * r, 0.5 * r), 0, bone)  # neural arch
    sl.ellipse(frame.to_px(0.0, vb + 1.45 * down), (0.35 * r, 0.32 * r), 0, rng.uniform(0.4, 0.48))  # spinal canal
    sl.ellipse(frame.to_px(0.0, vb + 2.3 * down), (0.22 * r, 0.7 * r), frame.angle_deg, bone)  # spinous process
    for side in (-1, 1):  # transverse processes
        sl.ellipse(frame.to_px(side * 1.1 * r / frame.ax, vb + 1.4 * down), (0.75 * r, 0.2 * r),
                   frame.angle_deg + side * rng.uniform(10, 25), bone)


def _draw_ribs(rng, sl: _Slice, frame: _BodyFrame) -> None:
    ring_u, ring_v = rng.uniform(0.84, 0.89), rng.uniform(0.82, 0.87)
    for side in (-1, 1):
        count = int(rng.integers(5, 9))
        # Angles from beside the spine (posterior) round to the front; 90 degrees points posterior.
        for t in np.linspace(112, 245, count) + rng.uniform(-6, 6, count):
            rad = math.radians(t if side < 0 else 180 - t)
            center = frame.to_px(ring_u * math.cos(rad), ring_v * math.sin(rad))
            tangent = math.degrees(math.atan2(frame.ay * math.cos(rad), -frame.ax * math.sin(rad)))
            anterior = math.sin(rad) < -0.5  # costal cartilage in front is dimmer than bone
            value = rng.uniform(0.55, 0.65) if anterior else rng.uniform(0.8, 0.96)
            axes = (rng.uniform(0.025, 0.045) * frame.ax, rng.uniform(0.011, 0.017) * frame.ax)
            sl.ellipse(center, axes, tangent + frame.angle_deg, value)
    sl.ellipse(frame.to_px(0.0, -ring_v - 0.02), (0.06 * frame.ax, 0.022 * frame.ax), frame.angle_deg,
               rng.uniform(0.8, 0.92))  # sternum
    for side in (-1, 1):  # scapulae: thin bright blades outside the posterior-lateral ribs
        rad = math.radians(90 - side * rng.uniform(38, 50))
        center = frame.to_px(0.93 * math.cos(rad), 0.9 * math.sin(rad))
        tangent = math.degrees(math.atan2(frame.ay * math.cos(rad), -frame.ax * math.sin(rad)))
        axes = (rng.uniform(0.1, 0.15) * frame.ax, rng.uniform(0.01, 0.016) * frame.ax)
        sl.ellipse(center, axes, tangent + frame.angle_deg, rng.uniform(0.8, 0.92))


def _random_lung_points(rng, sl: _Slice, count: int, min_depth: float = 0.0) -> np.ndarray:
    """`count` pixel (x, y) points inside the lungs, at least `min_depth` px from their edge.

    Rejection sampling in the lungs' bounding box: far cheaper than listing every lung pixel of a large image.
    """
    x0, y0, width, height = sl.lung_box
    found = np.zeros((0, 2), np.int64)
    for _ in range(50):
        xs = rng.integers(x0, x0 + width, 4 * count + 16)
        ys = rng.integers(y0, y0 + height, 4 * count + 16)
        keep = sl.depth[ys, xs] >= max(min_depth, 1.0)  # depth is >= 1 everywhere inside the lung
        found = np.concatenate([found, np.stack([xs[keep], ys[keep]], axis=-1)])
        if len(found) >= count:
            return found[:count].astype(np.float64)
    deepest = np.flatnonzero(sl.depth >= 0.5 * sl.depth.max())  # a lung thinner than asked: its deepest part
    picks = deepest[rng.integers(0, deepest.size, count)]
    return np.stack([picks % sl.depth.shape[1], picks // sl.depth.shape[1]], axis=-1).astype(np.float64)


def _draw_vessels(rng, sl: _Slice, frame: _BodyFrame) -> None:
    """Bright dots and short branches pointing at the hilum, kept inside the lungs (both classes have them)."""
    if not sl.lung_box[2]:
        return
    drawn = sl.image.copy()
    side = min(sl.image.shape)
    hilum = np.array(frame.to_px(0.0, 0.0))
    for x, y in _random_lung_points(rng, sl, int(rng.integers(12, 45))):
        radius = side * rng.uniform(0.003, 0.011)
        value = rng.uniform(0.42, 0.7)
        cv2.circle(drawn, _fixed((x, y)), max(1, round(radius * _SCALE)), value, -1, cv2.LINE_8, _SHIFT)
        if rng.random() < 0.6:
            toward = hilum - (x, y)
            toward /= max(np.linalg.norm(toward), 1e-6)
            end = np.array((x, y)) + toward * radius * rng.uniform(2.0, 7.0)
            cv2.line(drawn, _fixed((x, y)), _fixed(end), value, max(1, round(radius)), cv2.LINE_8, _SHIFT)
    cv2.copyTo(drawn, sl.lung, sl.image)


def _render_anatomy(rng: np.random.Generator, height: int, width: int) -> _Slice:
    sl = _Slice(height, width)
    frame = _body_frame(rng, height, width)
    _draw_body(rng, sl, frame)
    _draw_lungs(rng, sl, frame)
    _draw_mediastinum(rng, sl, frame)
    _draw_spine(rng, sl, frame)
    _draw_ribs(rng, sl, frame)
    sl.measure_lungs()
    ramp = np.linspace(0.0, rng.uniform(0.0, 0.05), height, dtype=np.float32)[:, None]
    sl.image += sl.lung * ramp  # dependent lung is a little denser posteriorly
    _draw_vessels(rng, sl, frame)
    sl.image = cv2.GaussianBlur(sl.image, (0, 0), max(0.6, 0.8 * min(height, width) / 400))
    return sl


def lesion_alpha(rng, shape: tuple[int, int], center, radius: float) -> np.ndarray:
    """Opacity (0-1) of one irregular mass: a wobbly ellipse plus satellite lobes, maybe spicules or a cavity."""
    alpha = np.zeros(shape, np.float32)
    x, y = _closed_curve(rng, 48, 2.0, rng.uniform(0.06, 0.18))
    rad = rng.uniform(0, np.pi)
    sx, sy = radius * rng.uniform(0.85, 1.0), radius * rng.uniform(0.65, 1.0)
    px = center[0] + sx * x * math.cos(rad) - sy * y * math.sin(rad)
    py = center[1] + sx * x * math.sin(rad) + sy * y * math.cos(rad)
    cv2.fillPoly(alpha, [np.round(np.stack([px, py], -1) * _SCALE).astype(np.int32)], 1.0, shift=_SHIFT)
    for _ in range(int(rng.integers(0, 4))):
        a, d = rng.uniform(0, 2 * np.pi), radius * rng.uniform(0.3, 0.8)
        lobe = (center[0] + d * math.cos(a), center[1] + d * math.sin(a))
        cv2.circle(alpha, _fixed(lobe), round(radius * rng.uniform(0.3, 0.6) * _SCALE), 1.0, -1, cv2.LINE_8, _SHIFT)
    if rng.random() < 0.4:
        for a in rng.uniform(0, 2 * np.pi, int(rng.integers(3, 8))):
            tip = (center[0] + radius * 1.6 * math.cos(a), center[1] + radius * 1.6 * math.sin(a))
            cv2.line(alpha, _fixed(center), _fixed(tip), 0.8, max(1, round(radius * 0.08)), cv2.LINE_8, _SHIFT)
    if rng.random() < 0.12:  # a cavitating mass: air in its centre
        cv2.circle(alpha, _fixed(center), round(radius * rng.uniform(0.3, 0.45) * _SCALE), 0.0, -1, cv2.LINE_8, _SHIFT)
    return cv2.GaussianBlur(alpha, (0, 0), max(0.6, radius * rng.uniform(0.06, 0.16)))


def _add_lesions(rng: np.random.Generator, sl: _Slice, count: int) -> None:
    """Soft-tissue masses blended into the image, clipped to the lung mask so they never touch other anatomy."""
    if count == 0 or not sl.lung_box[2]:
        return
    lung = sl.lung.astype(np.float32)
    height, width = sl.image.shape
    for _ in range(count):
        radius = min(height, width) * rng.uniform(*LESION_DIAMETER) / 2
        (cx, cy), = _random_lung_points(rng, sl, 1, 0.6 * radius)
        half = int(2.2 * radius) + 4  # the mass, its spicules and its blur fit in this box
        x0, y0 = max(0, int(cx) - half), max(0, int(cy) - half)
        x1, y1 = min(width, int(cx) + half + 1), min(height, int(cy) + half + 1)
        alpha = lesion_alpha(rng, (y1 - y0, x1 - x0), (cx - x0, cy - y0), radius) * lung[y0:y1, x0:x1]
        value = rng.uniform(0.45, 0.65)
        box = sl.image[y0:y1, x0:x1]
        box += alpha * (value - box)


def _finish(rng: np.random.Generator, image: np.ndarray) -> np.ndarray:
    """Random window (brightness, contrast, gamma) and noise, drawn the same way for every class."""
    low, high, gamma = rng.uniform(0.0, 0.08), rng.uniform(0.72, 1.0), rng.uniform(0.7, 1.45)
    out = cv2.pow(np.clip(image, 0.0, 1.0, out=image), gamma)
    out *= np.float32(255.0 * (high - low))
    out += np.float32(255.0 * low + 0.5)  # + 0.5: the uint8 cast below then rounds
    # CT noise is spatially correlated: draw it on a coarser grid (cheaper too) and interpolate it up.
    height, width = image.shape
    grain = max(1, round(min(height, width) / 250))
    noise = rng.standard_normal((-(-height // grain), -(-width // grain)), dtype=np.float32)
    noise = cv2.resize(noise, (width, height), interpolation=cv2.INTER_LINEAR)
    out += noise * np.float32(255.0 * rng.uniform(0.006, 0.02))
    return np.clip(out, 0, 255, out=out).astype(np.uint8)


def render_phantom(rng: np.random.Generator, size: tuple[int, int], lesions: int) -> np.ndarray:
    """Render one axial chest CT phantom as a uint8 grayscale (height, width) image.

    `lesions` = 0 gives a Normal slice; each further lesion adds a soft-tissue mass inside a lung. The anatomy uses
    `rng` itself; lesions and the final window/noise use two child generators drawn from it afterwards, so the same
    rng state rendered with and without lesions gives images that differ only where a lesion lies.
    """
    height, width = (int(side) for side in size)
    if min(height, width) < MIN_RENDER_SIDE:
        raise ValueError(f"phantom size {size} is too small: each side must be at least {MIN_RENDER_SIDE} px")
    if lesions < 0:
        raise ValueError(f"lesions must be >= 0, got {lesions}")
    sl = _render_anatomy(rng, height, width)
    lesion_rng, finish_rng = (np.random.default_rng(seed) for seed in rng.integers(0, 2**63, size=2))
    _add_lesions(lesion_rng, sl, lesions)
    return _finish(finish_rng, sl.image)


# --- dataset planning -------------------------------------------------------------------------------------


@dataclass
class _Planned:
    """One file of the dataset: either a fresh phantom or a byte-identical copy of a train file."""

    split: str
    subtype: str
    key: tuple[int, int, int]  # (split, subtype, position) indices: this image's own seed stream
    size: tuple[int, int] = (0, 0)
    lesions: int = 0
    storage: str = RGBA_PNG
    jpeg_quality: int = 90
    name: str = ""
    source: _Planned | None = None

    @property
    def relpath(self) -> str:
        return f"{self.split}/{FOLDER_NAMES_BY_SPLIT[self.split][self.subtype]}/{self.name}"


def _folder_counts(params: SyntheticParams) -> dict[tuple[str, str], int]:
    """Images per (split, subtype): cancer images go round-robin over the three cancer subtypes."""
    counts = {}
    for split in SPLITS:
        counts[(split, "normal")] = getattr(params.normal, split)
        cancer = getattr(params.cancer, split)
        for i, subtype in enumerate(CANCER_SUBTYPES):
            counts[(split, subtype)] = cancer // len(CANCER_SUBTYPES) + (i < cancer % len(CANCER_SUBTYPES))
    return counts


def _copies_per_folder(counts: dict[tuple[str, str], int], duplicates: int) -> dict[tuple[str, str], int]:
    """How many of each folder's images are copies of train images: test/normal first, like the real leak."""
    order = [("test", "normal"), ("valid", "normal")]
    order += [(split, subtype) for split in ("test", "valid") for subtype in CANCER_SUBTYPES]
    copies, left = {}, duplicates
    for split, subtype in order:
        # A folder takes at most one copy of each train image of its class, so names never clash.
        take = min(left, counts[(split, subtype)], counts[("train", subtype)])
        copies[(split, subtype)] = take
        left -= take
    if left:
        raise ValueError(
            f"data.synthetic.duplicates = {duplicates} is more than the valid/test images that can be copies of "
            f"train images of their class ({duplicates - left}); lower it or raise the per-split counts"
        )
    return copies


def _draw_size(rng: np.random.Generator, min_size: int, max_size: int) -> tuple[int, int]:
    """(height, width): log-normal widths around the range's geometric middle (the real median of 419 px for the
    default 160-1200 range, with a few large scans), landscape aspect."""
    middle = 0.5 * (math.log(min_size) + math.log(max_size))
    width = min(max(round(math.exp(rng.normal(middle, WIDTH_LOG_SPREAD))), min_size), max_size)
    height = min(max(round(width * rng.uniform(*ASPECT_RANGE)), min_size), max_size)
    return height, width


def _assign_storage(rng: np.random.Generator, fresh: list[_Planned]) -> None:
    """Mostly RGBA PNG; a split big enough gets every format at least once, placed at random (never by class)."""
    formats = list(STORAGE_SHARES)
    shares = np.array(list(STORAGE_SHARES.values()))
    for image, pick in zip(fresh, rng.choice(len(formats), size=len(fresh), p=shares / shares.sum()), strict=True):
        image.storage = formats[pick]
        image.jpeg_quality = int(rng.integers(85, 96))
    if len(fresh) < MIN_IMAGES_FOR_EVERY_FORMAT:
        return
    forced = rng.choice(len(fresh), size=len(formats), replace=False)
    for index, storage in zip(forced, formats, strict=True):
        fresh[index].storage = storage
    if fresh[0].split == "train":  # the real train/normal/n7*.png files are JPEG data behind a .png name
        normals = [i for i, image in enumerate(fresh) if image.subtype == "normal" and i not in forced]
        if normals:
            fresh[normals[int(rng.integers(len(normals)))]].storage = JPEG_NAMED_PNG


def _normal_stems(rng: np.random.Generator) -> Iterator[str]:
    """Names like the real normals: '10', '10 - Copy', '10 (2)', '10 (2) - Copy', '10 - Copy (3)', ..."""
    variants = ["", " - Copy", " (2)", " (2) - Copy", " - Copy (2)", " - Copy (3)", " - Copy - Copy",
                " - Copy (2) - Copy"]
    number = int(rng.integers(1, 20))
    while True:
        for variant in variants[: int(rng.integers(2, len(variants) + 1))]:
            yield f"{number}{variant}"
        number += 1


def _cancer_stems(rng: np.random.Generator) -> Iterator[str]:
    """Names like the real cancer scans: '000123', '000123 (4)' (a patient number and a slice number)."""
    number = int(rng.integers(0, 50))
    while True:
        slices = rng.choice(np.arange(1, 11), size=int(rng.integers(1, 5)), replace=False)
        for k in sorted(slices):
            yield f"{number:06d}" if k == 1 else f"{number:06d} ({k})"
        number += int(rng.integers(1, 4))


def _file_name(stem: str, image: _Planned) -> str:
    if image.storage in (JPEG, JPEG_NAMED_PNG):
        prefix = "n" if image.subtype == "normal" else ""  # the real normal JPEGs are n6.jpg, n7.png, ...
        return f"{prefix}{stem}{'.jpg' if image.storage == JPEG else '.png'}"
    return f"{stem}.png"


def _plan(params: SyntheticParams) -> list[_Planned]:
    """Every file of the dataset, decided up front from one generator so the result never depends on order."""
    rng = np.random.default_rng(_entropy(params.seed))
    counts = _folder_counts(params)
    copies = _copies_per_folder(counts, params.duplicates)
    names = {"normal": _normal_stems(rng), "cancer": _cancer_stems(rng)}
    planned: list[_Planned] = []
    for s, split in enumerate(SPLITS):
        fresh = []
        for t, subtype in enumerate(SUBTYPES):
            for position in range(counts[(split, subtype)] - copies.get((split, subtype), 0)):
                image = _Planned(split, subtype, (s, t, position))
                image.size = _draw_size(rng, params.min_size, params.max_size)
                image.lesions = 0 if subtype == "normal" else int(rng.integers(1, MAX_LESIONS_PER_IMAGE + 1))
                fresh.append(image)
        _assign_storage(rng, fresh)
        for image in fresh:
            image.name = _file_name(next(names["normal" if image.subtype == "normal" else "cancer"]), image)
        planned += fresh
    for (split, subtype), count in copies.items():
        sources = [image for image in planned if image.split == "train" and image.subtype == subtype]
        for pick in rng.choice(len(sources), size=count, replace=False):
            source = sources[pick]
            planned.append(_Planned(split, subtype, source.key, source.size, source.lesions, source.storage,
                                    source.jpeg_quality, source.name, source))
    return planned


# --- writing ----------------------------------------------------------------------------------------------


def _encode(gray: np.ndarray, storage: str, jpeg_quality: int) -> bytes:
    """The bytes of one file; PIL writes no timestamp or other varying metadata, so encoding is reproducible."""
    if storage == GRAY_PNG:
        pixels = gray
    elif storage == RGBA_PNG:
        pixels = np.dstack([gray, gray, gray, np.full_like(gray, 255)])
    else:
        pixels = np.dstack([gray, gray, gray])
    buffer = io.BytesIO()
    if storage in (JPEG, JPEG_NAMED_PNG):
        Image.fromarray(pixels).save(buffer, format="JPEG", quality=jpeg_quality)
    else:
        Image.fromarray(pixels).save(buffer, format="PNG", compress_level=PNG_COMPRESS_LEVEL)
    return buffer.getvalue()


def _entropy(seed: int) -> int:
    return seed % 2**64  # numpy seeds must be non-negative; any int in params.yaml maps to one


def _image_rng(params: SyntheticParams, image: _Planned) -> np.random.Generator:
    """Each image's own stream, keyed by its folder position, so rendering order never matters."""
    return np.random.default_rng(np.random.SeedSequence(_entropy(params.seed), spawn_key=image.key))


def _summary(root: Path, params: SyntheticParams, planned: list[_Planned]) -> dict:
    counts = {split: {} for split in SPLITS}
    quirks: dict[str, list[str]] = {RGB_PNG: [], GRAY_PNG: [], JPEG: [], JPEG_NAMED_PNG: [], COPY_NAMED: [],
                                    DUPLICATE: []}
    for image in planned:
        folder = FOLDER_NAMES_BY_SPLIT[image.split][image.subtype]
        counts[image.split][folder] = counts[image.split].get(folder, 0) + 1
        path = f"Data/{image.relpath}"
        if image.storage in quirks:
            quirks[image.storage].append(path)
        if " - Copy" in image.name:
            quirks[COPY_NAMED].append(path)
        if image.source is not None:
            quirks[DUPLICATE].append(path)
    return {
        "root": str(root / "Data"),
        "counts": counts,
        "total": len(planned),
        "duplicates": params.duplicates,
        "duplicate_sources": {f"Data/{i.relpath}": f"Data/{i.source.relpath}" for i in planned if i.source},
        "quirk_files": quirks,
    }


def generate_phantom_dataset(root: Path, params: SyntheticParams, progress: bool = True) -> dict:
    """Write root/Data/{train,valid,test}/<class folder>/<file> like the Kaggle archive, all or nothing.

    Returns a summary: counts per split and class folder, the number of duplicates, and the quirk files written
    (paths relative to root, by quirk). Raises FileExistsError if root/Data exists (clear it first).
    """
    root = Path(root)
    target = root / "Data"
    if target.exists():
        raise FileExistsError(f"{target} already exists: remove it before generating phantoms there")
    planned = _plan(params)
    root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".Data.partial-", dir=root))
    try:
        staging.chmod(0o755)  # mkdtemp makes it private; the finished Data/ should look like any folder
        for image in tqdm(planned, desc="generating phantoms", unit="img", disable=not progress):
            path = staging / image.relpath
            path.parent.mkdir(parents=True, exist_ok=True)
            if image.source is not None:  # sources are train images, written before any copy
                shutil.copyfile(staging / image.source.relpath, path)
                continue
            pixels = render_phantom(_image_rng(params, image), image.size, image.lesions)
            path.write_bytes(_encode(pixels, image.storage, image.jpeg_quality))
        for split in SPLITS:  # an empty class folder still belongs to the layout
            for folder in FOLDER_NAMES_BY_SPLIT[split].values():
                (staging / split / folder).mkdir(parents=True, exist_ok=True)
        os.rename(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return _summary(root, params, planned)
