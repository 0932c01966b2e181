"""Body and lung masks (chestct.imaging.anatomy) on phantoms with known anatomy, on edge cases, and mask shares."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from chestct.data import phantoms
from chestct.evaluation.robustness import gamma
from chestct.imaging.anatomy import body_mask, crop_box, grow, lung_mask, mask_share


def phantom_with_truth(seed: int, size=(112, 128)) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A finished phantom slice and its true body and lung masks (from the renderer's own drawing)."""
    rng = np.random.default_rng(seed)
    drawn = phantoms._render_anatomy(rng, *size)
    tissue = (drawn.image > 0.2).astype(np.uint8)  # skin and fat are drawn at 0.30-0.37, the air around at 0
    outline, _ = cv2.findContours(tissue, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    largest = max(outline, key=cv2.contourArea)  # the body, not the couch drawn beneath it
    truth_body = cv2.drawContours(np.zeros_like(tissue), [largest], -1, 1, cv2.FILLED).astype(bool)
    truth_lungs = drawn.lung.astype(bool)
    image = phantoms._finish(np.random.default_rng(seed + 1000), drawn.image.copy())
    return image, truth_body, truth_lungs


def iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / max(1, (a | b).sum()))


@pytest.mark.parametrize("seed", range(6))
def test_masks_find_the_phantoms_body_and_lungs(seed):
    image, truth_body, truth_lungs = phantom_with_truth(seed)
    body = body_mask(image)
    lungs = lung_mask(image, body)
    assert iou(body, truth_body) > 0.9
    assert (lungs & truth_lungs).sum() / truth_lungs.sum() > 0.85  # the lungs are found...
    assert (lungs & truth_lungs).sum() / lungs.sum() > 0.75  # ...and little else is called lung
    assert not (lungs & ~body).any()


def test_masks_do_not_depend_on_the_window():
    image, _, _ = phantom_with_truth(3)
    masks = [lung_mask(gamma(value)(image, None)) for value in (0.6, 1.0, 1.6)]
    assert min(iou(masks[1], other) for other in masks) > 0.85


def test_lung_masks_keep_a_mass_on_the_lung_wall():
    rng = np.random.default_rng(11)
    with_mass = phantoms.render_phantom(rng, (112, 128), 2)
    body = body_mask(with_mass)
    lungs = lung_mask(with_mass, body)
    bright_in_body = (with_mass > np.median(with_mass[lungs]) + 40) & body & ~cv2.erode(
        body.astype(np.uint8), np.ones((15, 15), np.uint8)).astype(bool)
    assert lungs.any() and bright_in_body.any()


def test_all_black_gives_empty_masks_and_all_white_a_full_body_without_lungs():
    black = np.zeros((64, 64), np.uint8)
    assert not body_mask(black).any() and not lung_mask(black).any()
    white = np.full((64, 64), 255, np.uint8)
    assert body_mask(white).all() and not lung_mask(white).any()


def test_a_body_touching_the_border_is_still_found():
    image, truth_body, _ = phantom_with_truth(2)
    cut = np.ascontiguousarray(image[25:])  # the top of the chest lies outside the image
    body = body_mask(cut)
    assert body[0].any(), "the body reaches the top row"
    assert iou(body, truth_body[25:]) > 0.85
    assert lung_mask(cut, body).any()


def test_of_two_blobs_the_largest_is_the_body():
    image = np.zeros((96, 96), np.uint8)
    cv2.circle(image, (40, 48), 30, 160, -1)
    cv2.circle(image, (85, 10), 6, 200, -1)  # a marker or a cable
    body = body_mask(image)
    assert body[48, 40] and not body[10, 85]
    assert abs(int(body.sum()) - int((image == 160).sum())) < 0.1 * (image == 160).sum()


def test_masks_accept_the_models_input_shape_and_refuse_other_types():
    image, _, _ = phantom_with_truth(0)
    np.testing.assert_array_equal(body_mask(image[..., None]), body_mask(image))
    with pytest.raises(ValueError, match="2-D uint8"):
        body_mask(image.astype(np.float32))


def test_mask_share_by_hand():
    mask = np.zeros((4, 4), bool)
    mask[:2] = True
    inside = np.zeros((4, 4))
    inside[0, 0] = 1.0
    assert mask_share(inside, mask) == 1.0
    assert mask_share(inside[::-1], mask) == 0.0
    half = np.ones((4, 4))
    assert mask_share(half, mask) == 0.5
    weighted = np.zeros((4, 4))
    weighted[0, 0], weighted[3, 3] = 3.0, 1.0
    assert mask_share(weighted, mask) == 0.75
    assert mask_share(np.zeros((4, 4)), mask) is None
    with pytest.raises(ValueError, match="differ in shape"):
        mask_share(np.ones((3, 3)), mask)


def test_the_kept_lung_fields_grow_by_the_margin_and_stay_inside_the_body():
    image, _, _ = phantom_with_truth(2)
    body = body_mask(image)
    lungs = lung_mask(image, body)
    _, kept_body, found = crop_box(image, "lungs", 0.05)
    _, tight, _ = crop_box(image, "lungs", 0.05, keep="lungs", keep_margin=0.0)
    _, grown, _ = crop_box(image, "lungs", 0.05, keep="lungs", keep_margin=0.03)
    assert found == "lungs"
    np.testing.assert_array_equal(kept_body, body)
    np.testing.assert_array_equal(tight, lungs)
    assert (grown & tight).sum() == tight.sum() and grown.sum() > tight.sum() * 1.1  # grown, not moved
    assert not (grown & ~body).any() and grown.sum() < body.sum()


def test_keeping_the_lungs_falls_back_to_the_body_and_needs_the_lung_crop():
    disc = np.zeros((80, 80), np.uint8)
    disc[10:70, 10:70] = 150  # a body without any dark lung
    _, kept, found = crop_box(disc, "lungs", 0.05, keep="lungs", keep_margin=0.02)
    assert found == "body"
    np.testing.assert_array_equal(kept, body_mask(disc))
    with pytest.raises(ValueError, match="crop to the lungs"):
        crop_box(disc, "body", 0.05, keep="lungs")


def test_grow_by_zero_is_the_mask_itself():
    mask = np.zeros((40, 40), bool)
    mask[10:20, 10:20] = True
    np.testing.assert_array_equal(grow(mask, 0.0), mask)
    grown = grow(mask, 0.05)  # 2 px on a 40 px side
    assert grown[8, 15] and not grown[6, 15] and grown.sum() > mask.sum()
