"""evaluate stage: threshold on validation; metrics with CIs; shortcut, attention and robustness audits; plots."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from chestct.atomic_io import write_json
from chestct.evaluation import plots
from chestct.evaluation.ablation import ablation_report
from chestct.evaluation.attention import anatomy_masks, attention_report, outline
from chestct.evaluation.calibration import calibration_report
from chestct.evaluation.domain import fit_feature_domain, selective_figures, split_domain_figures
from chestct.evaluation.features import predict_features
from chestct.evaluation.gradcam import gradcam, overlay
from chestct.evaluation.input_cues import input_shortcut_audit
from chestct.evaluation.out_of_fold import choose_out_of_fold_threshold, read_scores
from chestct.evaluation.robustness import build_perturbations, raw_reference, robustness_report
from chestct.evaluation.sampling import audit_rows
from chestct.evaluation.scoring import (
    FEW_DISTINCT_NORMALS,
    auc_interval_by_slice,
    distinct_slices,
    gradcam_selection,
    leak_free_mask,
    near_groups,
    predict_scores,
    roc_band_for,
    split_metrics,
)
from chestct.evaluation.shortcuts import raw_grayscale, shortcut_audit
from chestct.evaluation.thresholds import choose_threshold, threshold_record
from chestct.feature_domain import save_disabled
from chestct.imaging.decode import decode_with_colour
from chestct.imaging.domain import check_chest_ct
from chestct.imaging.processed import load_split
from chestct.params import load_params
from chestct.training.lesion_check import build_lesion_check, lesion_check_auc
from chestct.training.model import load_trained_model
from stages.errors import run_stage

PROCESSED = Path("data/processed")
RAW_DATA = Path("data/raw/Data")
MANIFEST = Path("data/split/manifest.csv")
OUT_OF_FOLD = Path("data/out_of_fold/scores.csv")
MODEL = Path("models/phase2.keras")
THRESHOLD = Path("models/threshold.json")
DOMAIN = Path("models/domain.npz")
METRICS = Path("metrics/eval.json")
PLOTS = Path("plots/eval")


def _robustness(predict, train_gray, test_gray, test, clean_auc, threshold, params) -> dict:
    """The acquisition-robustness suite on the raw test images (evaluate.robustness)."""
    settings = params.evaluate
    reference = raw_reference(train_gray) if settings.robustness.histogram_match else None
    suite = build_perturbations(settings.robustness, reference)
    report = robustness_report(predict, test_gray, test.labels, threshold, clean_auc, suite, params.preprocess,
                               settings.confidence_level, settings.bootstrap_resamples, params.seed)
    plots.robustness_csv(PLOTS / "robustness.csv", report)
    plots.robustness_png(PLOTS / "robustness.png", report, settings.confidence_level)
    return {**report["perturbations"], "clean_auc": report["clean_auc"], "worst_auc": report["worst_auc"],
            "worst": report["worst"], "worst_drop": report["worst_drop"]}


def _lesion_check(predict, params) -> dict:
    """The inserted-lesion check on the validation and the test Normals (chestct.training.lesion_check)."""
    report = {}
    for split in ("valid", "test"):
        check = build_lesion_check(load_split(PROCESSED / split), params.augment.lesion_insertion,
                                   params.preprocess, params.seed)
        report[f"{split}_auc"] = None if check is None else lesion_check_auc(check, predict)
        report[f"{split}_n"] = 0 if check is None else len(check)
    return report


def _gradcam_grid(model, test, test_scores, threshold, settings, attention_maps, kept) -> None:
    """The TP/FP/TN/FN grid; `attention_maps` (heatmaps, bodies, lungs of every test image) when the attention
    audit already computed them, else None and only the picked images are computed; `kept` is preprocess.mask."""
    picks = gradcam_selection(test.labels, test_scores, threshold, settings.gradcam_images)
    if not picks:
        return
    indices = [index for index, _ in picks]
    if attention_maps is None:
        heatmaps, (bodies, lungs) = gradcam(model, test.images[indices]), anatomy_masks(test.images[indices], kept)
    else:
        heatmaps, bodies, lungs = (maps[indices] for maps in attention_maps)
    tiles = [(outline(overlay(test.images[index], heatmap), body, lung), f"{kind} p={test_scores[index]:.2f}")
             for (index, kind), heatmap, body, lung in zip(picks, heatmaps, bodies, lungs, strict=True)]
    plots.gradcam_grid_png(PLOTS / "gradcam.png", tiles)


def _choose_threshold(valid_labels, valid_scores, manifest: pd.DataFrame, settings) -> tuple[dict, tuple]:
    """On the validation scores, or on the out_of_fold stage's scores over train + valid; also returns those
    scores (labels, scores), which the calibration is fitted on."""
    if settings.threshold.chosen_on == "valid":
        return choose_threshold(valid_labels, valid_scores, settings.threshold), (valid_labels, valid_scores)
    pooled = set(manifest.loc[manifest["split"].isin(["train", "valid"]), "id"].astype(str))
    table = read_scores(OUT_OF_FOLD, pooled)
    choice = choose_out_of_fold_threshold(table, manifest.set_index("id")["near_group"], settings.threshold)
    return choice, (table["label"].to_numpy(), table["score"].to_numpy())


def _calibration(fitting: tuple, test, test_scores, threshold: float, manifest: pd.DataFrame, params) -> tuple:
    """The calibration map fitted on the threshold's scores, and its report on test (chestct.evaluation.calibration),
    its ECE interval also over the test split's distinct slices (near-duplicate groups)."""
    settings = params.evaluate
    return calibration_report(*fitting, settings.threshold.chosen_on, test.labels, test_scores, threshold,
                              settings.calibration.method, settings.calibration.bins, settings.confidence_level,
                              settings.bootstrap_resamples, params.seed, test_groups=near_groups(test, manifest))


def _not_chest(ids) -> np.ndarray:
    """The domain check's first layer on the stored files of a split (True: refused, not a chest CT slice)."""
    return np.array([not check_chest_ct(*decode_with_colour(RAW_DATA / str(image_id))).passed for image_id in ids],
                    bool)


def _domain(model, train, splits: dict, threshold: float, params) -> dict:
    """The domain check on validation and test: the feature-distance fit (written to models/domain.npz for the
    export), the share of each split either layer flags, and the selective figures on the part left in domain.
    `splits` maps a split's name to (its arrays, its scores)."""
    settings, batch = params.evaluate, params.train.validation_batch_size
    features = {name: predict_features(model, arrays.images, batch) for name, (arrays, _) in splits.items()}
    report: dict = {"enabled": settings.domain.enabled, "quantile": settings.domain.quantile}
    domain = None
    if settings.domain.enabled:
        domain = fit_feature_domain(predict_features(model, train.images, batch), train.labels, features["valid"],
                                    settings.domain.quantile, settings.domain.cut_on, settings.domain.folds,
                                    params.seed)
        domain.save(DOMAIN)
        report |= {"cut": round(domain.cut, 4), "feature_dim": domain.feature_dim,
                   "fitted_images": domain.fitted_images, "validation_images": domain.validation_images,
                   "cut_on": settings.domain.cut_on, "cut_basis": domain.cut_basis}
    else:
        save_disabled(DOMAIN, "evaluate.domain.enabled is false")
    report["selective"] = {}
    for name, (arrays, scores) in splits.items():
        distances = None if domain is None else domain.distances(features[name])
        figures, in_domain = split_domain_figures(_not_chest(arrays.ids), distances,
                                                  None if domain is None else domain.cut)
        report |= {f"{name}_{key}": value for key, value in figures.items()}
        report["selective"][name] = selective_figures(arrays.labels, scores, threshold, in_domain,
                                                      settings.confidence_level, settings.bootstrap_resamples,
                                                      params.seed)
    return report


def main() -> None:
    params = load_params()
    settings, seed = params.evaluate, params.seed
    model = load_trained_model(MODEL)
    # Only the model's input: nothing here reads the unstandardised images photometric training starts from.
    valid, test = (load_split(PROCESSED / split, unstandardised=False).in_memory() for split in ("valid", "test"))
    # The audits' train side: every train image, or a seeded sample of evaluate.audit_max_train_images.
    whole_train = load_split(PROCESSED / "train", unstandardised=False)
    train = whole_train.take(audit_rows(whole_train.labels, settings.audit_max_train_images, seed))
    manifest = pd.read_csv(MANIFEST, keep_default_na=False)
    batch = params.train.validation_batch_size

    def predict(images):
        return predict_scores(model, images, batch)

    valid_scores = predict(valid.images)
    choice, fitting = _choose_threshold(valid.labels, valid_scores, manifest, settings)  # never on test
    threshold = choice["threshold"]
    test_scores = predict(test.images)
    calibration, calibration_metrics = _calibration(fitting, test, test_scores, threshold, manifest, params)
    write_json(THRESHOLD, threshold_record(choice, params, calibration.model_dump(mode="json", exclude_none=True)))

    splits = {"test": (test, test_scores), "valid": (valid, valid_scores)}
    leak_free = leak_free_mask(test, manifest)
    train_gray, test_gray = raw_grayscale(train.ids, RAW_DATA), raw_grayscale(test.ids, RAW_DATA)
    metrics = {
        "threshold": choice,
        "calibration": calibration_metrics,
        "test": split_metrics(test, test_scores, threshold, settings, seed) | distinct_slices(test, manifest)
        | auc_interval_by_slice(test, test_scores, manifest, settings, seed),
        "valid": split_metrics(valid, valid_scores, threshold, settings, seed) | distinct_slices(valid, manifest)
        | auc_interval_by_slice(valid, valid_scores, manifest, settings, seed),
        "test_leak_free": split_metrics(test, test_scores, threshold, settings, seed, members=leak_free),
        "domain": _domain(model, train, splits, threshold, params),
        "shortcut": shortcut_audit(model, train, test, test_scores, manifest, train_gray, test_gray, settings, batch)
        | input_shortcut_audit(train.images, train.labels, test.images, test.labels, settings.histogram_bins)
        | {"train_images": len(train), "train_images_total": len(whole_train)},
    }
    attention_maps = None
    if settings.attention:
        attention_maps = (gradcam(model, test.images), *anatomy_masks(test.images, params.preprocess.mask))
        metrics["attention"] = attention_report(attention_maps[0], test.labels, *attention_maps[1:]) | {
            "ablation": ablation_report(predict, test.images, test.labels, attention_maps[2],
                                        settings.confidence_level, settings.bootstrap_resamples, seed)
            | {"kept": params.preprocess.mask}}
    metrics["lesion_check"] = _lesion_check(predict, params)
    if settings.robustness.enabled:
        metrics["robustness"] = _robustness(predict, train_gray, test_gray, test, metrics["test"]["auc"], threshold,
                                            params)
    write_json(METRICS, metrics)

    curves = {name: (arrays.labels, scores) for name, (arrays, scores) in splits.items()}
    plots.write_plot_data(PLOTS, curves, threshold)
    for name, (arrays, scores) in splits.items():
        plots.write_image_scores(PLOTS / f"scores_{name}.csv", arrays.ids, arrays.labels, scores,
                                 near_groups(arrays, manifest), threshold, calibration)
    plots.roc_png(PLOTS / "roc.png", roc_band_for(test.labels, test_scores, settings, seed), curves, metrics,
                  threshold)
    plots.score_histogram_png(PLOTS / "scores.png", test.labels, test_scores, threshold)
    plots.confusion_png(PLOTS / "confusion.png", metrics["test"])
    plots.calibration_png(PLOTS / "calibration.png", test.labels, test_scores, calibration, settings.calibration.bins)
    plots.write_calibrated_reliability(PLOTS, test.labels, test_scores, calibration, settings.calibration.bins)
    _gradcam_grid(model, test, test_scores, threshold, settings, attention_maps, params.preprocess.mask)
    _print_summary(metrics, choice)


def _print_summary(metrics: dict, choice: dict) -> None:
    t, lf, sc = metrics["test"], metrics["test_leak_free"], metrics["shortcut"]
    pool = choice.get("out_of_fold")
    if pool is None:
        print(f"evaluate: threshold {choice['threshold']:.4f} ({choice['method']}, chosen on validation)")
        where, normals, slices = "validation", metrics["valid"]["n_normal"], metrics["valid"]["normal_slices"]
    else:
        print(f"evaluate: threshold {choice['threshold']:.4f} ({choice['method']}, chosen on the out-of-fold scores "
              f"of {pool['images']} train + valid images, {pool['folds']} folds, pooled AUC {pool['auc']:.3f})")
        where, normals, slices = "the out-of-fold pool", pool["normal_images"], pool["normal_slices"]
    if slices < FEW_DISTINCT_NORMALS:
        advice = ("; `-S evaluate.threshold.chosen_on=out_of_fold` chooses it on every distinct slice of train + "
                  "valid instead (docs/evaluation.md)") if pool is None else ""
        print(f"  warning: {where} holds {normals} Normal images but only {slices} distinct Normal slices "
              "(near-duplicate groups): the threshold rests on too few to transfer, so read test specificity with "
              f"that in mind{advice}")
    print(f"  test      n={t['n']} ({t['n_normal']} normal, {t['normal_slices']} distinct): "
          f"AUC {t['auc']:.3f} {t['auc_ci']} (distinct slices resampled: {t['auc_ci_by_slice']}), "
          f"sensitivity {t['sensitivity']:.3f}, specificity {t['specificity']:.3f}")
    print(f"  leak-free n={lf['n']} ({lf['n_normal']} normal): sensitivity {lf['sensitivity']:.3f}, "
          f"specificity {lf['specificity']}")
    if sc["train_images"] < sc["train_images_total"]:
        print(f"  shortcut audit on a sample of {sc['train_images']} of {sc['train_images_total']} train images "
              "(evaluate.audit_max_train_images)")
    print(f"  shortcuts on the stored files: intensity {sc['intensity_std_auc']}, histogram {sc['histogram_auc']}, "
          f"geometry {sc['geometry_auc']}; model on histogram-matched test {sc['hist_matched_model_auc']}")
    inputs = ", ".join(f"{key[6:-4]} {value:.3f}" for key, value in sc.items()
                       if key.startswith("input_") and value is not None)
    print(f"  shortcuts on the model's input: {inputs}")
    if "attention" in metrics:
        a = metrics["attention"]
        print(f"  Grad-CAM mass in the body {a['in_body_share']}, in the lungs {a['in_lung_share']} "
              f"(a uniform map: {a['body_area_share']}, {a['lung_area_share']}; {a['zero_maps']} all-zero maps, "
              f"lungs not found in {a['lungs_not_found']})")
        ablation = a["ablation"]
        if ablation["kept"] == "lungs":  # the input is the lungs alone: emptying them leaves their outline
            print(f"  test AUC on the lungs' outline alone (the lungs emptied): {ablation['lungs_emptied']['auc']}")
        else:
            print(f"  test AUC on the lungs alone {ablation['lungs_only']['auc']}, with the lungs emptied "
                  f"{ablation['lungs_emptied']['auc']} (a lesion detector keeps the first and loses the second)")
    cal = metrics["calibration"]
    print(f"  calibration {cal['method']} (fitted on {cal['fitted_images']} {cal['fitted_on']} scores): test ECE "
          f"{cal['test_ece']} {cal['test_ece_ci']} ({cal['test_ece_ci_by_slice']} over its "
          f"{cal['test_distinct_slices']} distinct slices; uncalibrated {cal['test_ece_uncalibrated']}; an increasing "
          f"map reaches {cal['test_ece_reachable']}), Brier "
          f"{cal['test_brier']} (uncalibrated {cal['test_brier_uncalibrated']}); the threshold is "
          f"{cal['threshold_calibrated']} on the calibrated scale")
    if "not_fitted" in cal:
        print(f"  warning: calibration {cal['requested_method']} could not be fitted, the export stays uncalibrated: "
              f"{cal['not_fitted']}")
    d = metrics["domain"]
    cut = f"feature-distance cut {d['cut']} (the {d['quantile']:g} quantile of {d['cut_basis']})" if d["enabled"] else (
        "feature distance off (evaluate.domain.enabled)")
    print(f"  domain check: {cut}; out of domain: test {d['test_out_of_domain_share']}, validation "
          f"{d['valid_out_of_domain_share']} (not a chest CT slice: test {d['test_not_chest_share']}); test on the "
          f"rest: coverage {d['selective']['test']['coverage']}, AUC {d['selective']['test']['auc']}")
    check = metrics["lesion_check"]
    print(f"  inserted-lesion check (the same Normal with and without a lesion put in): test AUC {check['test_auc']} "
          f"(n={check['test_n']}), validation {check['valid_auc']} (n={check['valid_n']})")
    if "robustness" in metrics:
        r = metrics["robustness"]
        print(f"  robustness: worst AUC {r['worst_auc']} under {r['worst']} (clean {r['clean_auc']})")


if __name__ == "__main__":
    run_stage("evaluate", main)
