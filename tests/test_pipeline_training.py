"""End to end: `dvc repro train_phase2` on phantoms at 64 px with MobileNetV3Small from random weights, as a
lesion-map model (model.lesion_map) with procedural lesions inserted into a quarter of the Normal half, so this
one run also carries the map through training, evaluation, every export format, serving and the panel (the
plain model's path runs end to end in test_experiments and test_dvc_contract).

Learnability: the only difference between the phantom classes is the lesion (no brightness shortcut), so a
validation AUC of at least 0.9 means the model, the input pipeline and both phases really learn. With random
weights phase 1 only warms up the head (frozen random features are near zero); phase 2 trains the whole
backbone. Op determinism makes the run repeatable: on this machine it reaches about 0.97.
"""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import yaml

from tests.pipeline_repo import make_pipeline_repo, run, update_params
from tests.series_factory import SeriesSpec, write_annotated_series
from tests.split_files import split_arrays

pytestmark = pytest.mark.e2e

_OFF = {"probability": 0.0}
LEARNABILITY = {
    "data": {"synthetic": {"normal": {"train": 400, "valid": 60, "test": 10},
                           "cancer": {"train": 400, "valid": 60, "test": 10},
                           "min_size": 96, "max_size": 256, "duplicates": 2}},
    "preprocess": {"image_size": 64},
    "model": {"backbone": "mobilenetv3small", "weights": None, "unfreeze": {"mobilenetv3small": 1000},
              "head": {"units": [64], "dropout": 0.3, "l2": 0.0001, "batchnorm_momentum": 0.9,
                       "input_noise_stddev": 0.0},
              "lesion_map": {"enabled": True}},
    # Light geometry only: 800 phantoms are plenty, and heavier augmentation slows learning at 64 px.
    "augment": {"rotation": {"probability": 0.5, "degrees": 10}, "shift": {"probability": 0.5, "fraction": 0.08},
                "zoom": _OFF, "shear": _OFF, "brightness": _OFF, "contrast": _OFF, "sharpness": _OFF,
                "hu_window": _OFF, "mixup": _OFF, "lesion_insertion": {"variants": 2}},
    "train": {"steps_per_epoch": 30, "loss": {"name": "bce"}, "lesion_supervision": {"procedural_rate": 0.25},
              "reduce_lr": {"factor": 0.3, "patience": 6, "min_lr": 1e-6}, "early_stopping_patience": 15,
              "phase1": {"epochs": 1, "learning_rate": 1e-3}, "phase2": {"epochs": 45, "learning_rate": 1.5e-3}},
}


@pytest.fixture(scope="module")
def trained_repo(tmp_path_factory):
    repo = make_pipeline_repo(tmp_path_factory.mktemp("train") / "project", LEARNABILITY)
    result = run(["dvc", "repro", "train_phase2"], repo)
    return repo, result.stdout


def test_both_phases_write_models_metrics_and_curves(trained_repo):
    repo, stdout = trained_repo
    assert "phase1 epoch 1/1" in stdout and "phase2 epoch 1/45" in stdout and "ETA" in stdout
    for phase in ("phase1", "phase2"):
        assert (repo / f"models/{phase}.keras").stat().st_size > 100_000
        metrics = json.loads((repo / f"metrics/train_{phase}.json").read_text())
        assert 0.0 <= metrics["best_val_auc"] <= 1.0 and metrics["epochs_run"] >= 1
        curves = repo / f"live/{phase}/plots/metrics"
        logged = {p.relative_to(curves).as_posix() for p in curves.rglob("*.tsv")}
        # dvclive files val_* metrics under eval/ and the others under train/
        assert logged >= {"train/loss.tsv", "train/learning_rate.tsv", "eval/auc.tsv", "eval/loss.tsv"}
    phase2 = json.loads((repo / "metrics/train_phase2.json").read_text())
    assert phase2["unfrozen_backbone_layers"] == 156
    # The batch composition is logged, and the inserted lesions' sizes in input pixels are recorded.
    assert "8 real Cancer (pooled image-level loss only)" in stdout and "25% procedural inserted lesions" in stdout
    inserted = phase2["lesion_insertion"]["procedural"]
    assert inserted["rate"] == 0.25 and 3 <= inserted["diameter_px_median"] <= 20
    assert 0.0 <= phase2["best_val_lesion_check"] <= 1.0


def test_learnability_on_phantoms(trained_repo):
    repo, _ = trained_repo
    phase2 = json.loads((repo / "metrics/train_phase2.json").read_text())
    assert phase2["best_val_auc"] >= 0.9, phase2


def test_phase2_model_reloads_and_takes_the_cached_array(trained_repo):
    repo, _ = trained_repo
    import keras

    from chestct.training.model import load_trained_model

    model = load_trained_model(repo / "models/phase2.keras")
    with split_arrays(repo / "data/processed/valid") as arrays:
        images = arrays["images"]
    assert model.input.dtype == "uint8" and tuple(model.input.shape[1:]) == images.shape[1:]
    first = keras.ops.convert_to_numpy(model(images, training=False))
    again = keras.ops.convert_to_numpy(model(images, training=False))
    assert first.shape == (len(images), 1) and np.isfinite(first).all()
    np.testing.assert_array_equal(first, again)
    assert model.get_layer("channel_attention").trainable_weights
    full = load_trained_model(repo / "models/phase2.keras", keep_lesion_map=True)
    probability, lesion_map = (keras.ops.convert_to_numpy(x) for x in full(images, training=False))
    np.testing.assert_array_equal(probability, first)
    assert lesion_map.shape == (len(images), 8, 8, 1)


def test_nothing_changed_nothing_retrains(trained_repo):
    repo, _ = trained_repo
    again = run(["dvc", "repro", "train_phase2"], repo)
    assert "Running stage" not in again.stdout


@pytest.fixture(scope="module")
def evaluated_repo(trained_repo):
    repo, _ = trained_repo
    result = run(["dvc", "repro", "evaluate"], repo)
    assert "Running stage 'train_phase" not in result.stdout
    return repo, result.stdout


def test_evaluate_writes_metrics_threshold_and_plots(evaluated_repo):
    repo, stdout = evaluated_repo
    metrics = json.loads((repo / "metrics/eval.json").read_text())
    with split_arrays(repo / "data/processed/test") as arrays:
        test_count = len(arrays["ids"])
    assert metrics["test"]["n"] == test_count  # every test image scored, none dropped
    for section in ("test", "valid", "test_leak_free"):
        for key in ("auc", "auc_ci", "sensitivity", "specificity", "ppv", "npv", "f1", "dor", "threshold", "n",
                    "n_normal"):
            assert key in metrics[section], (section, key)
    assert metrics["test_leak_free"]["n"] < metrics["test"]["n"]  # the planted copies are left out
    for section in ("test", "valid"):  # the AUC's interval with copies of one slice resampled together
        low, high = metrics[section]["auc_ci_by_slice"]
        assert 0.0 <= low <= high <= 1.0
        # Every image's score and decision, one row each, agreeing with the counts.
        scores = pd.read_csv(repo / f"plots/eval/scores_{section}.csv")
        assert list(scores.columns) == ["id", "label", "near_group", "score", "probability_calibrated", "decision"]
        assert len(scores) == metrics[section]["n"] and scores["id"].is_unique
        called = scores["decision"] == "Cancer"
        assert (called & (scores["label"] == "Cancer")).sum() == metrics[section]["tp"]
        assert (called & (scores["label"] == "Normal")).sum() == metrics[section]["fp"]
        assert scores["score"].between(0, 1).all() and scores["probability_calibrated"].between(0, 1).all()
    assert set(metrics["shortcut"]) >= {"intensity_std_auc", "histogram_auc", "geometry_auc",
                                        "hist_matched_model_auc", "input_intensity_std_auc", "input_histogram_auc",
                                        "input_border_auc", "input_geometry_auc", "input_noise_auc",
                                        "input_sharpness_auc"}
    assert metrics["shortcut"]["train_images"] == metrics["shortcut"]["train_images_total"]  # no cap reached
    attention = metrics["attention"]
    assert 0.0 <= attention["in_lung_share"] <= attention["in_body_share"] <= 1.0
    assert 0.0 <= attention["lung_area_share"] <= attention["body_area_share"] <= 1.0
    assert attention["images"] == test_count and set(attention["by_class"]) == {"normal", "cancer"}
    assert attention["ablation"]["kept"] == "lungs"  # the default preprocess.mask
    for ablation in ("lungs_only", "lungs_emptied"):
        low, high = attention["ablation"][ablation]["auc_ci"]
        assert low <= attention["ablation"][ablation]["auc"] <= high, ablation
    robust = metrics["robustness"]
    assert robust["worst"] in robust and robust["worst_auc"] == min(
        entry["auc"] for name, entry in robust.items() if isinstance(entry, dict))
    assert robust["clean_auc"] == metrics["test"]["auc"] and "histogram_match" in robust
    threshold = json.loads((repo / "models/threshold.json").read_text())
    assert threshold["chosen_on"] == "valid" and threshold["threshold"] == metrics["test"]["threshold"]
    check = metrics["lesion_check"]
    assert check["test_n"] > 0 and check["valid_n"] > 0 and 0.0 <= check["test_auc"] <= 1.0
    calibration = metrics["calibration"]  # fitted on validation (or left uncalibrated, saying why)
    assert set(calibration) >= {"method", "test_ece", "test_ece_ci", "test_ece_uncalibrated", "test_brier",
                                "test_brier_uncalibrated", "threshold_calibrated", "methods"}
    assert calibration["fitted_on"] == "valid" and threshold["calibration"]["method"] == calibration["method"]
    assert calibration["method"] == "isotonic" or "not_fitted" in calibration
    for name in ("roc.png", "scores.png", "confusion.png", "calibration.png", "gradcam.png", "robustness.png"):
        assert (repo / "plots/eval" / name).stat().st_size > 5_000, name
    shown = json.loads(run(["dvc", "plots", "show", "--json"], repo).stdout)
    charts = shown["data"]
    for title in ("ROC (test and validation)", "Precision-recall", "Confusion matrix (test)", "Calibration",
                  "Calibration on test, before and after (equal-mass bins, evaluate.calibration)",
                  "Robustness (test AUC per perturbation of the raw image)"):
        assert charts[title][0]["content"]["data"]["values"], title  # rendered with data, not just declared
    assert not shown.get("errors")


def test_branches_compare_with_metrics_and_params_diff(evaluated_repo):
    """Changing an evaluate-only param reruns only evaluate; dvc shows what changed between the commits."""
    repo, _ = evaluated_repo
    run(["git", "add", "-A"], repo)
    run(["git", "commit", "-q", "-m", "youden threshold"], repo)
    run(["git", "checkout", "-q", "-b", "fixed-threshold"], repo)
    # The branch also caps the audits' train side, so the sampled audit runs end to end.
    update_params(repo, {"evaluate": {"threshold": {"method": "fixed", "fixed": 0.05}, "audit_max_train_images": 100}})
    rerun = run(["dvc", "repro", "evaluate"], repo)  # the export would follow; nothing here reads it
    assert "Running stage 'evaluate'" in rerun.stdout
    shortcut = json.loads((repo / "metrics/eval.json").read_text())["shortcut"]
    assert shortcut["train_images"] == 100 < shortcut["train_images_total"]
    assert f"a sample of 100 of {shortcut['train_images_total']} train images" in rerun.stdout
    assert "Running stage 'train_phase" not in rerun.stdout and "Running stage 'preprocess'" not in rerun.stdout
    run(["git", "add", "-A"], repo)
    run(["git", "commit", "-q", "-m", "fixed threshold"], repo)
    params_diff = run(["dvc", "params", "diff", "main", "fixed-threshold"], repo).stdout
    assert "evaluate.threshold.method" in params_diff and "fixed" in params_diff
    metrics_diff = run(["dvc", "metrics", "diff", "main", "fixed-threshold"], repo).stdout
    assert "test.threshold" in metrics_diff
    run(["git", "checkout", "-q", "main"], repo)
    run(["dvc", "checkout", "-q", "evaluate"], repo)


@pytest.fixture(scope="module")
def exported_repo(evaluated_repo):
    repo, _ = evaluated_repo
    result = run(["dvc", "repro", "export"], repo)
    return repo, result.stdout


def test_export_writes_every_format_with_verified_parity(exported_repo):
    from chestct.export.formats import FORMATS

    repo, stdout = exported_repo
    export = repo / "models/export"
    metrics = json.loads((repo / "metrics/export.json").read_text())
    # mobilenetv3small cannot live in legacy .h5: skipped with its reason, everything else written and checked.
    # The float formats must pass; the quantized variant is exported or, outside its tolerances, left out.
    assert {"keras", "savedmodel", "tflite_float32"} <= set(metrics["formats"])
    assert set(metrics["formats"]) | set(metrics["left_out"]) == {"keras", "savedmodel", "tflite_float32",
                                                                  "tflite_dynamic"}
    assert "h5" in metrics["skipped"]
    latency = json.loads((repo / "reports/export_latency.json").read_text())["formats"]
    assert set(latency) == set(metrics["formats"])
    for name, report in metrics["formats"].items():
        assert report["passed"] and report["bytes"] > 10_000 and latency[name]["median_ms"] > 0, name
    metadata = json.loads((export / "metadata.json").read_text())
    for name, report in metrics["left_out"].items():  # removed from the folder, the reason kept in metadata
        assert report["reason"] == metadata["left_out_formats"][name]["reason"], name
        assert not (export / FORMATS[name].file_name).exists(), name
    assert metrics["formats"]["tflite_float32"]["max_abs_diff"] <= 1e-5
    threshold = json.loads((repo / "models/threshold.json").read_text())
    assert metadata["threshold"] == threshold["threshold"]
    assert metadata["calibration"]["method"] == threshold["calibration"]["method"]  # the map travels with it
    assert metadata["input"] == {**metadata["input"], "shape": [64, 64, 1], "dtype": "uint8"}
    assert metadata["lesion_map"]["output"]["shape"] == [8, 8, 1] and metadata["lesion_map"]["stride"] == 8
    for name, report in metrics["formats"].items():  # the map is checked as the probability is
        assert report["max_abs_map_diff"] <= (1e-5 if not report["quantized"] else 0.02), name
    # The metadata carries the run's preprocessing exactly as params.yaml set it, so the predictor redoes it.
    params = yaml.safe_load((repo / "params.yaml").read_text())
    assert metadata["preprocess"]["image_size"] == 64
    assert {key: metadata["preprocess"][key] for key in ("crop", "intensity", "clahe", "denoise")} == {
        key: params["preprocess"][key] for key in ("crop", "intensity", "clahe", "denoise")}
    for name, artifact in metadata["artifacts"].items():
        assert (export / artifact["file"]).exists() and len(artifact["sha256"]) == 64, name
    card = (export / "MODEL_CARD.md").read_text()
    assert "Not for clinical use" in card and "Shortcut audit" in card


def test_serving_sees_the_cached_arrays_and_every_format_decides_alike(exported_repo):
    """The server's path from a raw file equals the pipeline's cached array; all formats give the same decisions."""
    from fastapi.testclient import TestClient

    from chestct.imaging.processed import load_split
    from chestct.serving.app import create_app
    from chestct.serving.predictor import Predictor

    repo, _ = exported_repo
    export, test = repo / "models/export", load_split(repo / "data/processed/test").in_memory()
    files = [repo / "data/raw/Data" / image_id for image_id in test.ids]
    reference = Predictor(export)
    assert reference.format == "keras"
    served_inputs = np.stack([reference.prepare(path) for path in files])
    np.testing.assert_array_equal(served_inputs, test.images)

    sources = [(str(path), path) for path in files]
    expected = reference.predict(sources)
    metadata = json.loads((export / "metadata.json").read_text())
    for format_name in metadata["artifacts"]:
        predictions = Predictor(export, formats=(format_name,)).predict(sources)
        assert [p.diagnosis for p in predictions] == [p.diagnosis for p in expected], format_name
    with TestClient(create_app(export)) as client:
        response = client.post("/predict", files=[("files", (files[0].name, files[0].read_bytes()))])
    (served,) = response.json()["results"]
    assert served["lesion_map_png"].startswith("data:image/png")
    assert served["cancer_probability"] == pytest.approx(expected[0].cancer_probability, abs=1e-6)
    assert served["diagnosis"] == expected[0].diagnosis


def _panel_sets(root) -> list[dict]:
    """Three generated sets, one of each kind, outside the repo."""
    from tests.conftest import save_image
    from tests.serving_support import phantom_images

    series = write_annotated_series(root / "series", SeriesSpec(slices=10, tumour_slices=(4, 5, 6)))
    for index, (label, gray) in enumerate(phantom_images(count=8, seed=11)):
        save_image(root / "clinic" / ("Tumour" if label else "Benign") / f"{index}.png", gray)
        if not label:
            save_image(root / "normals" / f"{index}.png", gray)
    return [{"name": "series_set", "path": str(series.root), "kind": "annotated_series"},
            {"name": "normal_set", "path": str(root / "normals"), "kind": "normal_only"},
            {"name": "clinic", "path": str(root / "clinic"), "kind": "labelled",
             "label_map": ["Benign=0", "Tumour=1"]}]


def test_external_stage_scores_declared_sets_and_diffs_between_commits(exported_repo, tmp_path):
    """Declaring sets reruns only the external stage; `dvc metrics diff` shows its keys between two commits, with
    no metric that fails to load (the export's latency file is a cached output, not a metric)."""
    repo, _ = exported_repo
    empty = run(["dvc", "repro", "external"], repo)
    assert "no set declared" in empty.stdout
    assert json.loads((repo / "metrics/external.json").read_text()) == {}
    run(["git", "add", "-A"], repo)
    run(["git", "commit", "-q", "-m", "no external set"], repo)

    update_params(repo, {"external": {"sets": _panel_sets(tmp_path)}})
    declared = run(["dvc", "repro", "external"], repo)
    assert "Running stage 'external'" in declared.stdout and "Running stage 'export'" not in declared.stdout
    metrics = json.loads((repo / "metrics/external.json").read_text())
    series = metrics["series_set"]
    assert (series["n"], series["series"], series["boxed_slices"], series["kernel_pairs"]) == (20, 2, 6, 1)
    for key in ("within_series_auc", "lesion_sensitivity", "other_slices_positive_rate", "kernel_mean_abs_diff",
                "kernel_agreement", "in_box_gradcam_share", "in_box_lesion_map_share", "in_box_area_share"):
        assert series[key] is not None, key
    assert 0.0 <= series["in_box_gradcam_share"] <= 1.0 and 0.0 < series["in_box_area_share"] < 0.5
    assert 0.0 <= series["in_box_lesion_map_share"] <= 1.0
    assert metrics["normal_set"]["n"] == 4 and metrics["normal_set"]["specificity"] is not None
    assert metrics["clinic"]["n"] == 8 and metrics["clinic"]["auc"] is not None
    plots = repo / "plots/external"
    assert {"z_profile.png", "gradcam_boxed.png", "lesion_map_boxed.png", "slices.csv", "report.json"} <= {
        path.name for path in (plots / "series_set").iterdir()}
    assert (plots / "clinic" / "metrics.json").exists() and (plots / "normal_set" / "scores.png").exists()
    run(["git", "add", "-A"], repo)
    run(["git", "commit", "-q", "-m", "three external sets"], repo)
    assert run(["dvc", "status"], repo).stdout.strip().endswith("up to date.")

    diff = run(["dvc", "metrics", "diff", "HEAD~1", "HEAD"], repo)
    for key in ("series_set.within_series_auc", "series_set.kernel_agreement", "normal_set.specificity",
                "clinic.auc"):
        assert key in diff.stdout, key
    assert "failed to load" not in diff.stdout + diff.stderr
    shown = run(["dvc", "metrics", "show"], repo)
    assert "failed to load" not in shown.stdout + shown.stderr and "series_set.within_series_auc" in shown.stdout

    update_params(repo, {"external": {"sets": []}})  # back to the default for the tests after this one
    run(["dvc", "repro", "external"], repo)


def test_export_out_of_tolerance_fails_naming_the_format(exported_repo):
    repo, _ = exported_repo
    # Only the float TFLite model (cheap to convert), with an impossible tolerance.
    update_params(repo, {"export": {"formats": ["tflite_float32"], "float_tolerance": 1e-12}})
    failed = run(["dvc", "repro", "export"], repo, check=False)
    update_params(repo, {"export": {"formats": ["keras", "h5", "savedmodel", "tflite_float32", "tflite_dynamic"],
                                    "float_tolerance": 1e-5}})
    assert failed.returncode != 0
    assert "tflite_float32: max |p - p_keras|" in failed.stderr and "Traceback" not in failed.stderr
    assert "Nothing was exported" in failed.stderr
    # dvc removes the old output before the run; the failed run must not leave a partial one or temp folders.
    assert not (repo / "models/export").exists()
    assert not [p.name for p in (repo / "models").iterdir() if p.name.startswith(".export")]
