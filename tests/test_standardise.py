"""Intensity and noise standardisation inside the body, the anatomy crop, and their TensorFlow twins.

The standardisation must make the stored window useless as a cue (two windows of one phantom give nearly the
same array), the training-time TensorFlow version must give the preprocessing's array (one preprocessing, two
implementations, proven equal), and the original preprocessing must stay bit for bit what it was.
"""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

from chestct.data.phantoms import render_phantom
from chestct.evaluation.robustness import contrast, gamma, gaussian_noise, window_shift, window_width
from chestct.imaging.anatomy import body_mask
from chestct.imaging.preprocess import prepare_gray, preprocess_gray
from chestct.imaging.standardise import denoise, equalise_in_mask, masked, noise_level, percentile_in_mask
from chestct.imaging.transforms import apply_clahe, resize_square
from chestct.training.photometric import equalise_in_mask_tf, percentile_in_mask_tf, standardise_tf


@pytest.fixture(scope="module")
def phantom() -> np.ndarray:
    return render_phantom(np.random.default_rng(7), (120, 150), 1)


def new_params(default_params, **changes):
    base = {"image_size": 64, "crop": "lungs", "mask": "body", "intensity": "equalise_in_mask", "workers": 1,
            "clahe": default_params.preprocess.clahe.model_copy(update={"enabled": False})}
    return default_params.preprocess.model_copy(update={**base, **changes})


def random_masked(seed: int, count: int = 4, size: int = 24) -> np.ndarray:
    rng = np.random.default_rng(seed)
    images = rng.integers(1, 256, (count, size, size), dtype=np.uint8)
    images[:, :3] = 0  # outside the body
    images[0] = 0  # an empty mask
    images[1, 5:] = 77  # a flat body
    return images


def test_equalisation_ignores_the_stored_window(phantom):
    mask = body_mask(phantom)
    reference = equalise_in_mask(masked(phantom, mask))
    # A change that keeps every grey level apart gives (up to rounding) the same array...
    kept = equalise_in_mask(masked(gamma(0.6)(phantom, None), mask))
    assert np.abs(kept.astype(int) - reference.astype(int)).mean() < 0.5
    # ...and one that crushes part of the range into black or white (a narrow window clips the lungs) loses only
    # what it crushed.
    for transform in (gamma(1.6), window_shift(0.1), window_width(0.7), contrast(1.5)):
        other = equalise_in_mask(masked(transform(phantom, None), mask))
        assert np.abs(other.astype(int) - reference.astype(int)).mean() < 5.0


def test_the_whole_preprocessing_maps_two_windows_of_one_phantom_to_nearly_the_same_array(default_params,
                                                                                         original_params, phantom):
    params = new_params(default_params)
    first = preprocess_gray(phantom, params).astype(int)
    for transform in (gamma(0.6), window_width(1.4)):
        second = preprocess_gray(transform(phantom, None), params).astype(int)
        assert np.abs(first - second).mean() < 4.0
    old = original_params.preprocess.model_copy(update={"image_size": 64})
    old_difference = np.abs(preprocess_gray(phantom, old).astype(int)
                            - preprocess_gray(gamma(0.6)(phantom, None), old).astype(int)).mean()
    assert old_difference > 10.0, "without standardisation a new window changes the input a lot"


def test_equalisation_and_percentiles_keep_the_mask_and_use_the_full_range(phantom):
    image = masked(phantom, body_mask(phantom))
    for out in (equalise_in_mask(image), percentile_in_mask(image, 1, 99)):
        assert np.array_equal(out > 0, image > 0)
        assert out[image > 0].min() <= 5 and out[image > 0].max() >= 250
    flat = np.where(image > 0, 50, 0).astype(np.uint8)
    assert np.array_equal(percentile_in_mask(flat, 1, 99) > 0, flat > 0)
    assert not equalise_in_mask(np.zeros((8, 8), np.uint8)).any()


@pytest.mark.parametrize("seed", [0, 1])
def test_tensorflow_equalisation_equals_numpy(seed):
    images = random_masked(seed)
    expected = np.stack([equalise_in_mask(image) for image in images])
    got = equalise_in_mask_tf(tf.constant(images[..., None], tf.float32)).numpy()[..., 0]
    np.testing.assert_array_equal(got, expected)


def test_tensorflow_percentiles_equal_numpy():
    images = random_masked(3)
    expected = np.stack([percentile_in_mask(image, 2, 98) for image in images])
    got = percentile_in_mask_tf(tf.constant(images[..., None], tf.float32), 2, 98).numpy()[..., 0]
    np.testing.assert_array_equal(got, expected)


def test_standardise_tf_follows_the_params(default_params):
    params = new_params(default_params)
    assert standardise_tf(params) is equalise_in_mask_tf
    clahe_on = params.clahe.model_copy(update={"enabled": True})
    assert standardise_tf(params.model_copy(update={"clahe": clahe_on})) is None
    images = tf.constant(random_masked(0)[..., None], tf.float32)
    np.testing.assert_array_equal(standardise_tf(new_params(default_params, intensity="none"))(images), images)


def test_denoising_lowers_the_noise_and_keeps_the_mask(phantom):
    image = masked(gaussian_noise(0.05)(phantom, np.random.default_rng(0)), body_mask(phantom))
    for method in ("nlmeans", "bilateral"):
        smoothed = denoise(image, method, 1.0)
        assert noise_level(smoothed) < 0.6 * noise_level(image)
        assert np.array_equal(smoothed > 0, image > 0)
    assert denoise(image, "none", 1.0) is image
    with pytest.raises(ValueError, match="preprocess.denoise.method"):
        denoise(image, "median", 1.0)


def test_the_original_preprocessing_is_unchanged(original_params, phantom):
    params = original_params.preprocess.model_copy(update={"image_size": 64})
    clahe = params.clahe
    expected = resize_square(apply_clahe(phantom, clahe.clip_limit, clahe.tile_grid), 64, "pad")[..., None]
    prepared = prepare_gray(phantom, params)
    np.testing.assert_array_equal(prepared.image, expected)
    assert prepared.unstandardised is None and prepared.crop == "none"


@pytest.mark.parametrize("crop", ["body", "lungs"])
def test_the_crop_zeroes_outside_the_body_and_keeps_the_unstandardised_image(default_params, phantom, crop):
    padded = np.zeros((200, 260), np.uint8)
    padded[40:160, 55:205] = phantom  # a wide black field of view around the body
    prepared = prepare_gray(padded, new_params(default_params, crop=crop))
    assert prepared.crop == crop
    assert prepared.image.shape == (64, 64, 1) and prepared.unstandardised.shape == (64, 64)
    assert np.array_equal(prepared.image[..., 0] > 0, prepared.unstandardised > 0)
    body_share = (prepared.unstandardised > 0).mean()
    assert body_share > 0.5, "the crop removed most of the empty field of view"
    np.testing.assert_array_equal(prepared.image[..., 0], equalise_in_mask(prepared.unstandardised))


def test_the_lung_crop_falls_back_to_the_body_and_then_to_the_image(default_params):
    disc = np.zeros((80, 80), np.uint8)
    disc[10:70, 10:70] = 150  # a body without any dark lung
    assert prepare_gray(disc, new_params(default_params)).crop == "body"
    assert prepare_gray(np.zeros((40, 40), np.uint8), new_params(default_params)).crop == "image"


def test_the_lung_mask_keeps_only_the_grown_lung_fields(default_params, phantom):
    """preprocess.mask lungs: the model's input is zero outside the lung fields (grown by mask_margin), so the
    body build, the mediastinum and the chest wall stop being features; the equalisation runs on the lungs'
    pixels, and training's TensorFlow twin still gives the same array from the cached unstandardised image."""
    from chestct.evaluation.attention import anatomy_masks
    from chestct.imaging.anatomy import crop_box, grow, lung_mask

    body_kept = prepare_gray(phantom, new_params(default_params))
    lungs_kept = prepare_gray(phantom, new_params(default_params, mask="lungs", mask_margin=0.02))
    assert lungs_kept.crop == "lungs"
    inside, body_inside = lungs_kept.image[..., 0] > 0, body_kept.image[..., 0] > 0
    assert inside.sum() < 0.8 * body_inside.sum() and not (inside & ~body_inside).any()
    np.testing.assert_array_equal(lungs_kept.image[..., 0], equalise_in_mask(lungs_kept.unstandardised))
    redo = standardise_tf(new_params(default_params, mask="lungs"))
    redone = redo(tf.constant(lungs_kept.unstandardised[None, ..., None], tf.float32)).numpy()[0]
    np.testing.assert_array_equal(redone.astype(np.uint8), lungs_kept.image)
    # The kept region is the lung fields of the raw slice grown by the margin, cropped to the lungs' box.
    (x0, y0, x1, y1), kept, _ = crop_box(phantom, "lungs", 0.05, keep="lungs", keep_margin=0.02)
    assert grow(lung_mask(phantom), 0.02)[y0:y1, x0:x1].sum() >= kept[y0:y1, x0:x1].sum() > 0
    # The audits take that region from the input itself: it is both the body and the lungs there.
    bodies, lungs = anatomy_masks(lungs_kept.image[None], "lungs")
    np.testing.assert_array_equal(bodies[0], inside)
    np.testing.assert_array_equal(lungs[0], inside)


def test_the_noise_floor_brings_a_clean_and_a_noisy_slice_to_one_noise_level(phantom):
    """preprocess.denoise.renoise: denoising leaves each slice at its own residual noise; the floor on top puts
    both copies of one phantom at (nearly) the same level, deterministically, and keeps the mask."""
    body = body_mask(phantom)
    clean = masked(phantom, body)
    noisy = masked(gaussian_noise(0.04)(phantom, np.random.default_rng(1)), body)
    levels = {}
    for renoise in (0.0, 12.0):
        outputs = [denoise(image, "nlmeans", 0.5, renoise) for image in (clean, noisy)]  # light: residue differs
        levels[renoise] = [noise_level(output) for output in outputs]
        for source, output in zip((clean, noisy), outputs, strict=True):
            assert ((output > 0) == (source > 0)).all()  # the mask is kept, nothing inside becomes 0
        np.testing.assert_array_equal(outputs[1], denoise(noisy, "nlmeans", 0.5, renoise))  # deterministic
    gap_without, gap_with = (abs(a - b) / max(a, b) for a, b in (levels[0.0], levels[12.0]))
    assert levels[12.0][0] > 5 * levels[0.0][0]  # the clean slice is lifted to the floor
    assert gap_with < gap_without / 2, levels  # 1.6 vs 9.8 grey levels without the floor, 11.4 vs 14.7 with it


def test_the_noise_floor_is_off_by_default_and_an_old_export_without_it_loads(default_params):
    from chestct.params import PreprocessParams

    assert default_params.preprocess.denoise.renoise == 0.0
    old = default_params.preprocess.model_dump()
    del old["denoise"]["renoise"]  # metadata written before the param existed
    assert PreprocessParams.model_validate(old).denoise.renoise == 0.0
