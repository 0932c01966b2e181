"""Is this an axial chest CT slice at all? Cheap checks on the decoded grayscale, from the anatomy preprocessing
already finds (chestct.imaging.anatomy): the first layer of the domain check on every prediction.

A photograph, a chest X-ray, a document, a blank or random image, an abdominal slice or a slice turned on its side
gets an answer from the model all the same; these checks say it is not what the model was made for, with the
reason. They are deliberately loose: they only have to pass every axial chest CT the project has seen (the Kaggle
set, the cross-source scanners, the phantoms; docs/calibration-domain.md has the figures) and catch
what is plainly something else. Passing them does not make an image in-domain for the model: the second layer
(the distance in the model's feature space) judges that.

The figures (each a plain float, reported with the verdict):
- contrast: the grey-level standard deviation. A flat image has none.
- body_share: the body's share of the image. Noise or a speck has no body.
- spans_height: 1 when the body runs from the top row of the image to the bottom one (a radiograph reaches from
  the neck to the abdomen; an axial slice is an island of tissue, cropped at most on some sides).
- lung_fields, lung_share: the dark fields inside the body and their share of it. A chest slice has one or two
  of plausible size; an abdominal slice has none, and a body that is nearly all dark is not tissue.
- stacked: with two lung fields of comparable size, how far apart they are down the image over across it (a slice
  turned on its side has its lungs above one another); 0 with one field or a small second one.
- lung_darkness: where the lungs' median grey lies between the body's soft tissue (0) and the air outside (1).
  In CT lungs hold air, so they are nearly as dark as the air around the patient at any window; in a radiograph
  they are mid-grey. -1 when the slice leaves too little air outside the body to measure it.
- colour: the mean spread between the colour channels of the stored image (0 for grey). CT is stored grey.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from chestct.imaging.anatomy import body_mask, lung_mask

MIN_CONTRAST = 4.0  # grey levels of standard deviation
MIN_BODY_SHARE = 0.15  # the real slices surveyed: 0.31 or more
MAX_LUNG_SHARE = 0.75  # of the body; the real slices surveyed: at most 0.62
MAX_STACKED = 2.0  # down over across between two comparable lung fields; the real slices surveyed: 4 of 1,372 above it
COMPARABLE_FIELD = 0.3  # a second field counts for `stacked` when it holds at least this share of the lung area
MIN_LUNG_DARKNESS = 0.3  # lungs hold air; the real chest slices surveyed: all but 2 of 1,325 at 0.53 or more
RADIOGRAPH_DARKNESS = 0.5  # with spans_height: lungs lighter than this are a radiograph's (real slices: >= 0.58)
MIN_OUTSIDE_SHARE = 0.02  # lung_darkness needs this share of the image outside the body to know the air's grey
MAX_COLOUR = 12.0  # grey levels of spread between the colour channels; JPEG chroma noise of a grey scan stays below
ANALYSIS_SIDE = 256  # the checks run on the slice resized to this side: fast and independent of the stored size


@dataclass(frozen=True)
class ChestCheck:
    """The verdict of the first layer: `reason` is None when the image passes."""

    reason: str | None
    figures: dict[str, float]

    @property
    def passed(self) -> bool:
        return self.reason is None


def _spans_height(body: np.ndarray) -> float:
    return float(body[0, :].any() and body[-1, :].any())


def _fields(lungs: np.ndarray) -> list[np.ndarray]:
    count, labels = cv2.connectedComponents(lungs.astype(np.uint8), connectivity=8)
    return sorted((labels == index for index in range(1, count)), key=np.sum)


def _stacked(fields: list[np.ndarray]) -> float:
    if len(fields) < 2:
        return 0.0
    second, first = fields[-2:]
    if second.sum() < COMPARABLE_FIELD * (first.sum() + second.sum()):
        return 0.0
    (y0, x0), (y1, x1) = (np.argwhere(field).mean(axis=0) for field in (first, second))
    return float(abs(y1 - y0) / max(abs(x1 - x0), 1.0))


def _darkness(gray: np.ndarray, body: np.ndarray, lungs: np.ndarray) -> float:
    """-1 when it cannot be measured: no lungs, or too little air outside the body (a slice cropped inside it)."""
    outside, tissue = gray[~body], gray[body & ~lungs]
    if outside.size < MIN_OUTSIDE_SHARE * gray.size or tissue.size == 0 or not lungs.any():
        return -1.0
    air, soft = float(np.median(outside)), float(np.median(tissue))
    if soft - air <= 0:
        return 0.0  # the "body" is darker than what surrounds it: not tissue in air
    return float((soft - np.median(gray[lungs])) / (soft - air))


def measure(gray: np.ndarray, colour: float = 0.0) -> dict[str, float]:
    """The figures of one decoded grayscale slice (rows, cols) uint8; `colour` is colour_spread of the stored
    image when it had colour channels."""
    gray = np.asarray(gray)
    scale = ANALYSIS_SIDE / max(gray.shape[:2])
    small = cv2.resize(gray, (max(1, round(gray.shape[1] * scale)), max(1, round(gray.shape[0] * scale))),
                       interpolation=cv2.INTER_AREA) if scale < 1 else gray
    body = body_mask(small)
    lungs = lung_mask(small, body) if body.any() else np.zeros(small.shape, bool)
    fields = _fields(lungs)
    return {"contrast": round(float(small.std()), 2), "body_share": round(float(body.mean()), 4),
            "spans_height": _spans_height(body), "lung_fields": float(len(fields)),
            "lung_share": round(float(lungs.sum() / max(int(body.sum()), 1)), 4),
            "stacked": round(_stacked(fields), 3), "lung_darkness": round(_darkness(small, body, lungs), 4),
            "colour": round(float(colour), 2)}


def colour_spread(rgb: np.ndarray) -> float:
    """The mean spread (max - min) between the colour channels of an (rows, cols, 3) image: 0 for grey."""
    rgb = np.asarray(rgb, np.int16)
    return float(np.mean(rgb.max(axis=2) - rgb.min(axis=2))) if rgb.ndim == 3 else 0.0


def judge(figures: dict[str, float]) -> str | None:
    """The first failed check, as the answer's domain_reason; None when every check passes."""
    if figures["colour"] > MAX_COLOUR:
        return (f"a colour image (the colour channels differ by {figures['colour']:.0f} grey levels on average): "
                f"CT slices are grey; this looks like a photograph")
    if figures["contrast"] < MIN_CONTRAST:
        return f"a flat image (grey-level spread {figures['contrast']:g} < {MIN_CONTRAST:g}): nothing to read"
    if figures["body_share"] < MIN_BODY_SHARE:
        return (f"no body found (the largest bright region covers {figures['body_share']:.0%} of the image, at least "
                f"{MIN_BODY_SHARE:.0%} expected): not a CT slice")
    if figures["lung_fields"] == 0:
        return "no lung fields found inside the body: not a chest slice (or a slice above or below the lungs)"
    if figures["lung_share"] > MAX_LUNG_SHARE:
        return (f"the dark fields cover {figures['lung_share']:.0%} of the body (at most {MAX_LUNG_SHARE:.0%} in a "
                f"chest slice): not a chest CT slice")
    if 0 <= figures["lung_darkness"] < MIN_LUNG_DARKNESS:
        return (f"the dark fields inside the body are not air-filled ({figures['lung_darkness']:.2f} of the way from "
                f"soft tissue to the air outside, at least {MIN_LUNG_DARKNESS:g} for lungs): not a chest slice")
    if figures["stacked"] > MAX_STACKED:
        return "the two lung fields lie above one another, not side by side: the slice is turned or not axial"
    if figures["spans_height"] and 0 <= figures["lung_darkness"] < RADIOGRAPH_DARKNESS:
        return (f"the body runs the whole height of the image and the lung fields are mid-grey "
                f"({figures['lung_darkness']:.2f} of the way from soft tissue to the air outside): this looks like a "
                f"radiograph, not an axial CT slice, whose lungs are nearly as dark as air")
    return None


def check_chest_ct(gray: np.ndarray, colour: float = 0.0) -> ChestCheck:
    """Measure and judge one decoded grayscale slice."""
    figures = measure(gray, colour)
    return ChestCheck(judge(figures), figures)
