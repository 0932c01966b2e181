"""The first layer of the domain check: is this an axial chest CT slice at all? Phantoms pass; every kind of
non-CT probe is refused with its reason."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from chestct.data.phantoms import render_phantom
from chestct.imaging.anatomy import body_mask, lung_mask
from chestct.imaging.domain import check_chest_ct, colour_spread

SIZE = 256


def _phantom(seed: int) -> np.ndarray:
    return render_phantom(np.random.default_rng(seed), (SIZE, SIZE), seed % 3)


def _document(rng) -> np.ndarray:
    page = np.full((SIZE, SIZE), 245, np.uint8)
    for row in range(20, SIZE - 20, 14):
        for col in range(16, SIZE - 16, 9):
            if rng.random() < 0.8:
                cv2.putText(page, chr(int(rng.integers(97, 123))), (col, row), cv2.FONT_HERSHEY_SIMPLEX, 0.3, 20, 1)
    return page


def _photograph(rng) -> np.ndarray:
    """A colour scene: a sky gradient over a lawn, with round objects; its grey version has two dark blobs side by
    side inside a bright region, which the anatomy alone would take for lungs."""
    y, x = np.mgrid[0:SIZE, 0:SIZE] / SIZE
    photo = np.zeros((SIZE, SIZE, 3), np.float32)
    photo[..., 0], photo[..., 1], photo[..., 2] = 200 - 80 * y, 160 - 30 * y, 90 + 120 * (1 - y)  # RGB
    for _ in range(6):
        cx, cy, r = rng.uniform(0.1, 0.9), rng.uniform(0.3, 0.9), rng.uniform(0.05, 0.2)
        photo[(x - cx) ** 2 + (y - cy) ** 2 < r ** 2] = rng.uniform(10, 250, 3)
    return np.clip(photo + rng.normal(0, 4, photo.shape), 0, 255).astype(np.uint8)


def _radiograph() -> np.ndarray:
    """A chest radiograph drawn schematically: the torso from the neck to the belly, the mediastinum and spine
    bright in the middle, two tall lung fields that are mid-grey (air-filled lung still lies in front of and behind
    tissue in a projection), black air beside the torso."""
    image = np.zeros((SIZE, SIZE), np.uint8)
    cv2.rectangle(image, (40, 0), (SIZE - 40, SIZE), 190, -1)
    for side in (-1, 1):
        centre = (SIZE // 2 + side * 52, SIZE // 2 - 10)
        cv2.ellipse(image, centre, (34, 90), 0, 0, 360, 120, -1)
    cv2.rectangle(image, (SIZE // 2 - 14, 0), (SIZE // 2 + 14, SIZE), 225, -1)
    return cv2.GaussianBlur(image, (7, 7), 0)


def _abdomen(seed: int) -> np.ndarray:
    """A phantom slice with every air-filled region inside the body filled with soft tissue: a body without
    lungs, as below the diaphragm."""
    image = _phantom(seed)
    body = cv2.erode(body_mask(image).astype(np.uint8), np.ones((15, 15), np.uint8)).astype(bool)
    lungs = cv2.dilate(lung_mask(image).astype(np.uint8), np.ones((9, 9), np.uint8)).astype(bool)
    tissue = int(np.median(image[body & ~lungs]))
    image[body & (lungs | (image < tissue * 0.6))] = tissue
    return image


@pytest.mark.parametrize("seed", range(12))
def test_phantom_chest_slices_pass(seed):
    check = check_chest_ct(_phantom(seed))
    assert check.passed, check.reason


PROBES = {
    "flat": (lambda rng: np.full((SIZE, SIZE), 120, np.uint8), "a flat image"),
    "noise": (lambda rng: rng.integers(0, 256, (SIZE, SIZE)).astype(np.uint8), "no body found"),
    "document": (_document, "no lung fields found"),
    "radiograph": (lambda rng: _radiograph(), "looks like a radiograph"),
    "abdomen": (lambda rng: _abdomen(4), "not a chest"),
    "turned on its side": (lambda rng: np.ascontiguousarray(np.rot90(_phantom(5))), "lie above one another"),
}


@pytest.mark.parametrize("name", list(PROBES))
def test_what_is_not_an_axial_chest_ct_is_refused_with_its_reason(name):
    make, reason = PROBES[name]
    check = check_chest_ct(make(np.random.default_rng(0)))
    assert not check.passed and reason in check.reason, (check.reason, check.figures)


def test_a_colour_photograph_is_refused_and_its_grey_version_is_left_to_the_second_layer():
    photo = _photograph(np.random.default_rng(1))
    grey = cv2.cvtColor(photo, cv2.COLOR_RGB2GRAY)
    check = check_chest_ct(grey, colour_spread(photo))
    assert not check.passed and "a colour image" in check.reason
    # Stored grey, nothing in its anatomy says "photograph" for sure: the feature distance is the next guard.
    assert colour_spread(np.stack([grey] * 3, axis=-1)) == 0.0


def test_a_small_or_large_stored_size_gives_the_same_verdict():
    image = _phantom(7)
    for side in (128, 512, 1024):
        assert check_chest_ct(cv2.resize(image, (side, side))).passed
