"""evaluate stage: threshold on validation, metrics with CIs on test/valid/leak-free test, shortcut audit, plots."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from chestct.atomic_io import write_json
from chestct.decision import DECISION_RULE
from chestct.evaluation import plots
from chestct.evaluation.gradcam import gradcam, overlay
from chestct.evaluation.scoring import gradcam_selection, leak_free_mask, predict_scores, roc_band_for, split_metrics
from chestct.evaluation.shortcuts import shortcut_audit
from chestct.evaluation.thresholds import choose_threshold
from chestct.imaging.processed import load_split
from chestct.params import load_params
from chestct.training.model import load_trained_model
from stages.errors import run_stage

PROCESSED = Path("data/processed")
RAW_DATA = Path("data/raw/Data")
MANIFEST = Path("data/split/manifest.csv")
MODEL = Path("models/phase2.keras")
THRESHOLD = Path("models/threshold.json")
METRICS = Path("metrics/eval.json")
PLOTS = Path("plots/eval")


def main() -> None:
    params = load_params()
    settings, seed = params.evaluate, params.seed
    model = load_trained_model(MODEL)
    train, valid, test = (load_split(PROCESSED / f"{split}.npz") for split in ("train", "valid", "test"))
    manifest = pd.read_csv(MANIFEST, keep_default_na=False)
    batch = params.train.validation_batch_size

    valid_scores = predict_scores(model, valid.images, batch)
    choice = choose_threshold(valid.labels, valid_scores, settings.threshold)  # validation only
    threshold = choice["threshold"]
    # The settings travel with the threshold into the export's metadata: external validation reuses them.
    evaluated_with = {"confidence_level": settings.confidence_level, "seed": seed,
                      "bootstrap_resamples": settings.bootstrap_resamples,
                      "gradcam_images": settings.gradcam_images, "histogram_bins": settings.histogram_bins}
    write_json(THRESHOLD, {**choice, "chosen_on": "valid", "decision": DECISION_RULE, "settings": evaluated_with})

    test_scores = predict_scores(model, test.images, batch)
    leak_free = leak_free_mask(test, manifest)
    metrics = {
        "threshold": choice,
        "test": split_metrics(test, test_scores, threshold, settings, seed),
        "valid": split_metrics(valid, valid_scores, threshold, settings, seed),
        "test_leak_free": split_metrics(test, test_scores, threshold, settings, seed, members=leak_free),
        "shortcut": shortcut_audit(model, train, test, test_scores, manifest, RAW_DATA, settings, batch),
    }
    write_json(METRICS, metrics)

    curves = {"test": (test.labels, test_scores), "valid": (valid.labels, valid_scores)}
    plots.write_plot_data(PLOTS, curves, threshold)
    plots.roc_png(PLOTS / "roc.png", roc_band_for(test.labels, test_scores, settings, seed), curves, metrics,
                       threshold)
    plots.score_histogram_png(PLOTS / "scores.png", test.labels, test_scores, threshold)
    plots.confusion_png(PLOTS / "confusion.png", metrics["test"])
    plots.calibration_png(PLOTS / "calibration.png", curves)
    picks = gradcam_selection(test.labels, test_scores, threshold, settings.gradcam_images)
    if picks:
        indices = [index for index, _ in picks]
        heatmaps = gradcam(model, test.images[indices])
        tiles = [(overlay(test.images[index], heatmap), f"{kind} p={test_scores[index]:.2f}")
                 for (index, kind), heatmap in zip(picks, heatmaps, strict=True)]
        plots.gradcam_grid_png(PLOTS / "gradcam.png", tiles)

    t, lf, sc = metrics["test"], metrics["test_leak_free"], metrics["shortcut"]
    print(f"evaluate: threshold {threshold:.4f} ({choice['method']}, chosen on validation)")
    print(f"  test      n={t['n']} ({t['n_normal']} normal): AUC {t['auc']:.3f} {t['auc_ci']}, "
          f"sensitivity {t['sensitivity']:.3f}, specificity {t['specificity']:.3f}")
    print(f"  leak-free n={lf['n']} ({lf['n_normal']} normal): sensitivity {lf['sensitivity']:.3f}, "
          f"specificity {lf['specificity']}")
    print(f"  shortcuts: intensity {sc['intensity_std_auc']}, histogram {sc['histogram_auc']}, "
          f"geometry {sc['geometry_auc']}; model on histogram-matched test {sc['hist_matched_model_auc']}")


if __name__ == "__main__":
    run_stage("evaluate", main)
