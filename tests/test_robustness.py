"""The acquisition-robustness suite, the trivial rules on the model's input, and the attention shares.

The acceptance case: on a phantom set whose only class cue is brightness (Cancer slices stored with a brighter
window, no lesion), a model that reads brightness scores a high clean AUC but a low `worst_auc`, and a trivial
intensity rule on its input separates the classes. On phantoms whose only cue is the lesion (every slice drawn
with a random window), a model that looks for masses inside the lung fields keeps its AUC under every
perturbation, and the intensity rule is near chance.
"""

from __future__ import annotations

import cv2
import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from chestct.data.phantoms import render_phantom
from chestct.evaluation import robustness
from chestct.evaluation.attention import attention_report, outline
from chestct.evaluation.input_cues import (
    border_features,
    geometry_features,
    input_shortcut_audit,
    noise_features,
    sharpness_features,
)
from chestct.imaging.anatomy import body_mask, lung_mask
from chestct.imaging.preprocess import preprocess_gray

SIZE = 96


@pytest.fixture(scope="module")
def preprocess(original_params):
    """The original preprocessing (CLAHE, no crop, no standardisation): it lets the brightness cue through, which
    is what the audit must detect."""
    return original_params.preprocess.model_copy(update={"image_size": SIZE, "workers": 1})


def phantom_set(seed: int, count: int, cue: str) -> tuple[list[np.ndarray], np.ndarray]:
    """Raw phantom slices, half Normal half Cancer; `cue` "brightness": Cancer = a brighter window, no lesion;
    "lesion": Cancer = two masses in the lungs, every slice with the renderer's random window."""
    rng = np.random.default_rng(seed)
    grays, labels = [], np.arange(count) % 2
    for label in labels:
        if cue == "brightness":
            gray = render_phantom(rng, (112, 128), 0)
            grays.append(robustness.window_shift(0.2)(gray, rng) if label else gray)
        else:
            grays.append(render_phantom(rng, (112, 128), 2 * int(label)))
    return grays, labels


def brightness_model(images: np.ndarray) -> np.ndarray:
    """Reads only the global brightness of its input."""
    return images.reshape(len(images), -1).mean(axis=1) / 255.0


def lesion_model(images: np.ndarray) -> np.ndarray:
    """Looks for tissue-bright blobs inside the lung fields, relative to the slice's own lung and tissue levels."""
    scores = []
    for image in images:
        plane = image[..., 0]
        body = body_mask(plane)
        lungs = lung_mask(plane, body)
        if not lungs.any() or not (body & ~lungs).any():
            scores.append(0.0)
            continue
        lung_level, tissue_level = np.median(plane[lungs]), np.median(plane[body & ~lungs])
        inner = cv2.erode(lungs.astype(np.uint8), np.ones((3, 3), np.uint8)).astype(bool)
        bright = ((plane > lung_level + 0.3 * (tissue_level - lung_level)) & inner).astype(np.uint8)
        blobs = cv2.morphologyEx(bright, cv2.MORPH_OPEN, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (3, 3)))
        scores.append(min(1.0, 5.0 * blobs.sum() / max(1, inner.sum())))
    return np.asarray(scores)


def audit(cue: str, model, preprocess, default_params) -> tuple[float, dict, dict]:
    train_grays, train_labels = phantom_set(1, 40, cue)
    test_grays, test_labels = phantom_set(2, 40, cue)
    train_inputs = np.stack([preprocess_gray(gray, preprocess) for gray in train_grays])
    test_inputs = np.stack([preprocess_gray(gray, preprocess) for gray in test_grays])
    clean = roc_auc_score(test_labels, model(test_inputs))
    suite = robustness.build_perturbations(default_params.evaluate.robustness,
                                           robustness.raw_reference(train_grays))
    report = robustness.robustness_report(model, test_grays, test_labels, 0.5, clean, suite, preprocess, 0.95, 200, 0)
    cues = input_shortcut_audit(train_inputs, train_labels, test_inputs, test_labels, 32)
    return clean, report, cues


def test_a_brightness_model_is_exposed_by_the_suite_and_the_input_rules(preprocess, default_params):
    clean, report, cues = audit("brightness", brightness_model, preprocess, default_params)
    assert clean > 0.95
    assert report["worst_auc"] < 0.6 and report["worst"] == "histogram_match"
    assert report["worst_drop"] > 0.35
    assert cues["input_intensity_std_auc"] > 0.9


def test_the_lesion_preprocessing_takes_the_brightness_cue_out_of_the_models_input(lesion_params, default_params):
    """Equalisation inside the body: the brightness-only phantom set's cue no longer reaches the model's input."""
    standardised = lesion_params.preprocess.model_copy(update={"image_size": SIZE, "workers": 1})
    clean, report, cues = audit("brightness", brightness_model, standardised, default_params)
    assert cues["input_intensity_std_auc"] < 0.75 and clean < 0.75


def test_a_lesion_model_keeps_its_skill_and_the_input_rules_are_near_chance(preprocess, default_params):
    clean, report, cues = audit("lesion", lesion_model, preprocess, default_params)
    assert clean > 0.8
    assert report["worst_auc"] > 0.7
    assert cues["input_intensity_std_auc"] < 0.75
    for entry in report["perturbations"].values():
        assert entry["auc_ci"][0] <= entry["auc"] <= entry["auc_ci"][1]
        assert 0.0 <= entry["sensitivity"] <= 1.0 and 0.0 <= entry["specificity"] <= 1.0


def test_the_default_suite_has_every_perturbation_and_names_without_dots(default_params):
    suite = robustness.build_perturbations(default_params.evaluate.robustness, np.linspace(0, 255, 256))
    names = [perturbation.name for perturbation in suite]
    assert names == ["gamma_0p6", "gamma_1p6", "window_shift_minus_0p1", "window_shift_0p1", "window_width_0p7",
                     "window_width_1p4", "contrast_0p6", "contrast_1p5", "jpeg_q40", "rescale_0p5", "noise_0p03",
                     "blur_1", "field_of_view_0p85", "field_of_view_1p25", "histogram_match"]
    with pytest.raises(ValueError, match="reference"):
        robustness.build_perturbations(default_params.evaluate.robustness, None)


def test_perturbations_change_the_storage_not_the_image_size_except_the_field_of_view():
    gray = render_phantom(np.random.default_rng(0), (80, 100), 1)
    rng = np.random.default_rng(0)
    np.testing.assert_array_equal(robustness.gamma(1.0)(gray, rng), gray)
    np.testing.assert_array_equal(robustness.window_width(1.0)(gray, rng), gray)
    for transform in (robustness.gamma(0.6), robustness.contrast(1.5), robustness.jpeg(40), robustness.rescale(0.5),
                      robustness.gaussian_noise(0.03), robustness.blur(1.0), robustness.window_shift(0.1)):
        out = transform(gray, np.random.default_rng(1))
        assert out.dtype == np.uint8 and out.shape == gray.shape and not np.array_equal(out, gray)
    assert robustness.field_of_view(0.85)(gray, rng).shape == (68, 85)
    padded = robustness.field_of_view(1.25)(gray, rng)
    assert padded.shape == (100, 125) and padded[:5].max() == 0
    assert (robustness.window_shift(0.1)(gray, rng).astype(int) - gray).max() == 26  # + 0.1 of 255, rounded
    noisy = robustness.gaussian_noise(0.03)
    first, again = (noisy(gray, np.random.default_rng([5, 1])) for _ in range(2))
    np.testing.assert_array_equal(first, again)


def test_histogram_matching_gives_every_image_the_reference_distribution():
    reference = np.linspace(20, 220, 256)
    dark = (render_phantom(np.random.default_rng(3), (64, 64), 0) * 0.3).astype(np.uint8)
    matched = robustness.histogram_match(reference)(dark, None)
    assert abs(float(matched.mean()) - float(reference.mean())) < 5


def test_worst_names_the_lowest_auc(original_params):
    grays = [np.full((40, 40), value, np.uint8) for value in (10, 20, 200, 210)]
    labels = np.array([0, 0, 1, 1])
    suite = [robustness.Perturbation("same", lambda g, rng: g),
             robustness.Perturbation("inverted", lambda g, rng: 255 - g)]

    def mean_model(images):
        return images.reshape(len(images), -1).mean(axis=1) / 255.0

    preprocess = original_params.preprocess.model_copy(update={
        "image_size": 32, "resize_mode": "stretch", "workers": 1,
        "clahe": original_params.preprocess.clahe.model_copy(update={"enabled": False})})
    report = robustness.robustness_report(mean_model, grays, labels, 0.5, 1.0, suite, preprocess, 0.95, 100, 0)
    assert report["perturbations"]["same"]["auc"] == 1.0 and report["perturbations"]["inverted"]["auc"] == 0.0
    assert report["worst"] == "inverted" and report["worst_auc"] == 0.0 and report["worst_drop"] == 1.0
    assert report["perturbations"]["inverted"]["sensitivity"] == 0.0
    assert report["perturbations"]["inverted"]["specificity"] == 0.0


# --- trivial rules on the model's input ---------------------------------------------------------------------


def test_input_features_by_hand():
    framed = np.zeros((1, 20, 20, 1), np.uint8)
    framed[0, :2, :, 0] = 100  # the top 10% rows are the only bright part of the frame
    mean, std = border_features(framed)[0]
    assert mean == pytest.approx(100 * 40 / (400 - 256)) and std > 0
    padded = np.zeros((1, 20, 20, 1), np.uint8)
    padded[0, 5:15, :, 0] = 90  # a 20 x 10 content box: half the array is padding
    share, aspect = geometry_features(padded)[0]
    assert share == pytest.approx(0.5) and aspect == pytest.approx(2.0)
    smooth = np.stack([render_phantom(np.random.default_rng(4), (96, 96), 0)])[..., None]
    noisy = robustness.gaussian_noise(0.05)(smooth[0, ..., 0], np.random.default_rng(0))[None, ..., None]
    blurred = cv2.GaussianBlur(smooth[0, ..., 0], (0, 0), 2.0)[None, ..., None]
    assert noise_features(noisy)[0, 0] > noise_features(smooth)[0, 0]
    assert sharpness_features(blurred)[0, 0] < sharpness_features(smooth)[0, 0]


# --- where the model looks ---------------------------------------------------------------------------------


def test_attention_report_by_hand():
    body = np.zeros((4, 4), bool)
    body[:, :2] = True
    lungs = np.zeros((4, 4), bool)
    lungs[:2, :2] = True
    in_lung = np.zeros((4, 4))
    in_lung[0, 0] = 1.0
    on_border = np.zeros((4, 4))
    on_border[3, 3] = 1.0
    heatmaps = np.stack([in_lung, on_border, np.zeros((4, 4))])
    report = attention_report(heatmaps, np.array([1, 0, 1]), np.stack([body] * 3), np.stack([lungs] * 3))
    assert report["in_body_share"] == 0.5 and report["in_lung_share"] == 0.5
    assert report["by_class"]["cancer"] == {"images": 1, "in_body_share": 1.0, "in_lung_share": 1.0}
    assert report["by_class"]["normal"] == {"images": 1, "in_body_share": 0.0, "in_lung_share": 0.0}
    assert report["zero_maps"] == 1 and report["images"] == 3 and report["lungs_not_found"] == 0
    # What a uniform heatmap would score: the masks' share of the image, over the two non-zero maps.
    assert report["body_area_share"] == 0.5 and report["lung_area_share"] == 0.25


def test_outline_draws_the_masks_on_the_overlay():
    rgb = np.zeros((32, 32, 3), np.uint8)
    body = np.zeros((32, 32), bool)
    body[4:28, 4:28] = True
    lungs = np.zeros((32, 32), bool)
    lungs[10:20, 10:20] = True
    drawn = outline(rgb, body, lungs)
    assert tuple(drawn[4, 16]) == (255, 255, 255) and tuple(drawn[10, 15]) == (0, 255, 255)
    assert not rgb.any(), "the input overlay is left as it was"
