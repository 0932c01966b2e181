"""Lung ablation (chestct.evaluation.ablation): the lungs alone and the lungs emptied, and what the AUCs tell apart."""

from __future__ import annotations

import numpy as np
import pytest

from chestct.evaluation.ablation import ablation_report, lungs_emptied, lungs_only

SIZE = 32


def _lung_masks(count: int, last_found: bool = False) -> np.ndarray:
    """A left and a right lung field in every image; the last image has none unless `last_found`."""
    lungs = np.zeros((count, SIZE, SIZE), bool)
    lungs[:, 8:24, 4:14] = True
    lungs[:, 8:24, 18:28] = True
    if not last_found:
        lungs[-1] = False
    return lungs


def _images(labels: np.ndarray, lungs: np.ndarray, cue: str) -> np.ndarray:
    """Body grey 120, lungs grey 40. cue="lesion": a Cancer image has a bright nodule inside a lung; cue="outside":
    a Cancer image is brighter in the mediastinum (the middle column, outside the lungs), its lungs identical."""
    images = np.full((len(labels), SIZE, SIZE, 1), 120, np.uint8)
    images[lungs] = 40
    for image, label, lung in zip(images, labels, lungs, strict=True):
        if label and cue == "lesion" and lung.any():
            image[12:15, 8:11] = 230
        if label and cue == "outside":
            image[8:24, 15:17] = 200
    return images


def test_lungs_only_blanks_everything_outside_the_lungs():
    lungs = _lung_masks(3)
    images = _images(np.array([1, 0, 1]), lungs, "lesion")
    kept = lungs_only(images, lungs)
    assert kept.dtype == np.uint8 and kept.shape == images.shape
    assert (kept[..., 0][~lungs] == 0).all() and (kept[..., 0][lungs] == images[..., 0][lungs]).all()
    assert not kept[-1].any()  # no lung found: nothing left


def test_lungs_emptied_fills_each_lung_with_its_median_and_keeps_the_rest():
    lungs = _lung_masks(3)
    images = _images(np.array([1, 0, 1]), lungs, "lesion")
    emptied = lungs_emptied(images, lungs)
    assert emptied.dtype == np.uint8
    assert (emptied[0, ..., 0][lungs[0]] == 40).all()  # the nodule is gone, the lung's own grey remains
    assert (emptied[..., 0][~lungs] == images[..., 0][~lungs]).all()
    assert (emptied[-1] == images[-1]).all()  # no lung found: unchanged
    assert images[0, 13, 9, 0] == 230  # the input itself is untouched


def _brightest_in_the_lungs(lungs: np.ndarray):
    return lambda images: np.array([image[..., 0][lung].max() / 255 for image, lung in zip(images, lungs, strict=True)])


def _middle_column(images: np.ndarray) -> np.ndarray:
    return images[:, 8:24, 15:17, 0].mean(axis=(1, 2)) / 255


@pytest.mark.parametrize(("cue", "model", "expected"), [
    ("lesion", "lesion", {"lungs_only": 1.0, "lungs_emptied": 0.5}),
    ("outside", "shortcut", {"lungs_only": 0.5, "lungs_emptied": 1.0}),
])
def test_ablation_tells_a_lesion_detector_from_a_model_that_reads_outside_the_lungs(cue, model, expected):
    labels = np.array([0, 1] * 10)
    lungs = _lung_masks(len(labels), last_found=True)
    images = _images(labels, lungs, cue)
    predict = _brightest_in_the_lungs(lungs) if model == "lesion" else _middle_column
    report = ablation_report(predict, images, labels, lungs, level=0.95, resamples=200, seed=0)
    assert {name: entry["auc"] for name, entry in report.items()} == pytest.approx(expected, abs=0.03)
    for entry in report.values():
        low, high = entry["auc_ci"]
        assert low <= entry["auc"] <= high


def test_one_class_gives_no_auc_and_mismatched_masks_are_refused():
    lungs = _lung_masks(4)
    images = _images(np.ones(4, int), lungs, "lesion")
    report = ablation_report(_middle_column, images, np.ones(4, int), lungs, 0.95, 50, 0)
    assert report == {"lungs_only": {"auc": None, "auc_ci": None}, "lungs_emptied": {"auc": None, "auc_ci": None}}
    with pytest.raises(ValueError, match="lung masks"):
        ablation_report(_middle_column, images, np.ones(4, int), lungs[:, :16], 0.95, 50, 0)
