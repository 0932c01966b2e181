"""End to end: `dvc repro preprocess` on tiny phantoms in a temporary copy of the project."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from tests.pipeline_repo import make_pipeline_repo, run, update_params
from tests.split_files import split_arrays

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    repo = make_pipeline_repo(tmp_path_factory.mktemp("e2e") / "project")
    run(["dvc", "repro", "preprocess"], repo)
    return repo


def test_layout_manifest_and_metrics(repo):
    data = repo / "data" / "raw" / "Data"
    assert {p.name for p in (data / "test").iterdir()} == {
        "normal", "adenocarcinoma", "large.cell.carcinoma", "squamous.cell.carcinoma"}
    manifest = pd.read_csv(repo / "data/split/manifest.csv", keep_default_na=False)
    metrics = json.loads((repo / "metrics/data.json").read_text())
    assert metrics["splits"]["train"] == {"total": 32, "normal": 16, "cancer": 16,
                                          "subtypes": metrics["splits"]["train"]["subtypes"]}
    assert metrics["splits"]["valid"]["total"] == 12 and metrics["splits"]["test"]["total"] == 16
    assert metrics["unique_sha256"] == len(manifest) - 2  # the two planted byte-identical copies
    assert metrics["duplicates"]["exact_groups"] >= 1
    assert metrics["leaks"]["valid"]["normal"] + metrics["leaks"]["test"]["normal"] >= 1
    assert metrics["extension_mismatches"] >= 1  # the JPEG behind a .png name
    assert set(manifest.columns) >= {"id", "split", "label", "subtype", "sha256", "phash", "width", "height",
                                     "mode", "format", "exact_group", "near_group", "dup_in_train", "dup_in_valid"}
    for picture in ("samples.png", "sizes.png"):
        assert (repo / "plots/data" / picture).stat().st_size > 5_000


def test_processed_arrays_match_the_manifest(repo):
    manifest = pd.read_csv(repo / "data/split/manifest.csv", keep_default_na=False)
    for split in ("train", "valid", "test"):
        with split_arrays(repo / f"data/processed/{split}") as arrays:
            images, labels, ids = arrays["images"], arrays["labels"], arrays["ids"]
            expected = manifest[manifest["split"] == split]
            assert images.shape == (len(expected), 32, 32, 1) and images.dtype == np.uint8
            assert list(ids) == expected["id"].tolist()
            assert list(labels) == expected["label"].tolist()
            assert images.std() > 10  # real content, not blank


def test_server_path_equals_cached_array(repo, default_params):
    """The one preprocessing: calling chestct.imaging.preprocess on a raw file gives the cached array."""
    from chestct.imaging.preprocess import preprocess_image

    params = default_params.preprocess.model_copy(update={"image_size": 32})
    with split_arrays(repo / "data/processed/test") as arrays:
        for index in (0, len(arrays["ids"]) - 1):
            raw = (repo / "data/raw/Data" / str(arrays["ids"][index])).read_bytes()
            np.testing.assert_array_equal(preprocess_image(raw, params), arrays["images"][index])


def test_nothing_changed_nothing_reruns_and_image_size_reruns_only_preprocess(repo):
    again = run(["dvc", "repro", "preprocess"], repo)
    assert "Running stage" not in again.stdout, again.stdout
    update_params(repo, {"preprocess": {"image_size": 40}})
    changed = run(["dvc", "repro", "preprocess"], repo)
    assert "Running stage 'preprocess'" in changed.stdout
    assert "Running stage 'download'" not in changed.stdout and "Running stage 'split'" not in changed.stdout
    with split_arrays(repo / "data/processed/train") as arrays:
        assert arrays["images"].shape[1:] == (40, 40, 1)


def test_the_anatomy_crop_and_standardisation_keep_server_and_cache_equal(repo, default_params):
    """Every new preprocessing option at once: the predictor's path still gives the cached arrays exactly, the
    unstandardised images are cached for training, the perturbed validation copy is built, and the crop report
    counts every image."""
    from chestct.imaging.preprocess import preprocess_image
    from chestct.imaging.standardise import equalise_in_mask

    changes = {"image_size": 48, "crop": "lungs", "mask": "lungs", "mask_margin": 0.02, "intensity": "equalise_in_mask",
               "denoise": {"method": "nlmeans", "strength": 1.0, "renoise": 6.0}, "clahe": {"enabled": False}}
    update_params(repo, {"preprocess": changes})
    try:
        run(["dvc", "repro", "robust_valid"], repo)
        params = default_params.preprocess.model_copy(update={
            **changes, "denoise": default_params.preprocess.denoise.model_copy(update=changes["denoise"]),
            "clahe": default_params.preprocess.clahe.model_copy(update={"enabled": False})})
        report = json.loads((repo / "metrics/preprocess.json").read_text())["crop"]
        assert report["mode"] == "lungs"
        with split_arrays(repo / "data/processed/test") as arrays:
            assert sum(report["test"].values()) == len(arrays["ids"]) and report["test"]["lungs"] >= 1
            for index, image_id in enumerate(arrays["ids"]):
                raw = (repo / "data/raw/Data" / str(image_id)).read_bytes()
                np.testing.assert_array_equal(preprocess_image(raw, params), arrays["images"][index])
                np.testing.assert_array_equal(equalise_in_mask(arrays["unstandardised"][index]),
                                              arrays["images"][index][..., 0])
        with split_arrays(repo / "data/robust_valid/valid") as perturbed, \
                split_arrays(repo / "data/processed/valid") as clean:
            assert list(perturbed["ids"]) == list(clean["ids"])
            assert perturbed["images"].shape == clean["images"].shape
            assert not np.array_equal(perturbed["images"], clean["images"])
    finally:
        update_params(repo, {"preprocess": {"image_size": 32, "crop": "none", "mask": "body", "intensity": "none",
                                            "denoise": {"method": "none", "strength": 1.0, "renoise": 0.0},
                                            "clahe": {"enabled": True}}})
