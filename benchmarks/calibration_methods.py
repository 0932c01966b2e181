"""Every calibration method on trained models: fitted on validation, measured on test (ECE, Brier).

    python -m benchmarks.calibration_methods MODEL.keras PROCESSED_DIR [MODEL.keras PROCESSED_DIR ...]
                                             [--labels "seed 42" ...] [--results calibration_methods]

PROCESSED_DIR holds the `valid/` and `test/` splits of data/processed that the model was evaluated on (a pipeline
project's data/processed, or a copy kept beside the model). This reruns no training: it scores the two splits,
fits each method of chestct.evaluation.calibration on the validation scores and prints the test figures per
model, then the mean over models, so `evaluate.calibration.method` can be chosen by measurement. The evaluate
stage reports the same figures for its own model under calibration.methods in metrics/eval.json. With --results
the table (test ECE / Brier per model and method, and their mean) goes to docs/results/<name>.json for the
documentation, each model named by its --labels entry (default: its path).

Two more columns say why a method misses on a model: `reachable`, the lowest test ECE any increasing map of the
scores could reach (chestct.evaluation.calibration.reachable_ece: fitted on test itself, for reading only), and
`unseen`, how many test Cancers score below every validation Cancer (a map fitted on validation has never seen
a Cancer there, and calls them Normal with confidence). A method far above `reachable` was fitted on scores
unlike test's; a high `reachable` is the model's ranking, which no map repairs.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from sklearn.metrics import brier_score_loss

from benchmarks.results import write_result
from chestct.evaluation.calibration import METHODS, expected_calibration_error, fit_calibration, reachable_ece
from chestct.evaluation.scoring import predict_scores
from chestct.imaging.processed import load_split
from chestct.training.model import load_trained_model


def measure(model_path: Path, processed: Path, bins: int) -> dict:
    model = load_trained_model(model_path)
    splits = {name: load_split(processed / name, unstandardised=False).in_memory() for name in ("valid", "test")}
    scores = {name: predict_scores(model, split.images, 64) for name, split in splits.items()}
    valid_labels, test_labels = splits["valid"].labels, splits["test"].labels
    figures = {"none": scores["test"]}
    for method in METHODS:
        figures[method] = fit_calibration(valid_labels, scores["valid"], method, "valid").apply(scores["test"])
    measured = {method: {"ece": expected_calibration_error(test_labels, probabilities, bins),
                         "brier": float(brier_score_loss(test_labels, probabilities))}
                for method, probabilities in figures.items()}
    lowest_valid_cancer = scores["valid"][valid_labels == 1].min()
    return measured | {"reachable": {"ece": reachable_ece(test_labels, scores["test"], bins)},
                       "unseen": {"cancers": int(np.sum((test_labels == 1) & (scores["test"] < lowest_valid_cancer))),
                                  "of": int(np.sum(test_labels == 1))}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("pairs", nargs="+", help="MODEL.keras PROCESSED_DIR, repeated")
    parser.add_argument("--bins", type=int, default=10, help="equal-mass bins of the ECE (default 10)")
    parser.add_argument("--out", type=Path, default=None, help="also write the figures as JSON")
    parser.add_argument("--labels", nargs="+", default=None, help="a name for each model, in the table")
    parser.add_argument("--results", default=None, metavar="NAME",
                        help="write the table to docs/results/NAME.json (calibration_methods: the documentation's)")
    args = parser.parse_args()
    if len(args.pairs) % 2:
        parser.error("give MODEL.keras PROCESSED_DIR pairs")
    if args.labels is not None and len(args.labels) != len(args.pairs) // 2:
        parser.error("give one --labels entry per model")
    runs = {}
    for model, processed in zip(args.pairs[::2], args.pairs[1::2], strict=True):
        runs[model] = measure(Path(model), Path(processed), args.bins)
        figures = runs[model]
        print(model + ": " + ", ".join(f"{method} ECE {figures[method]['ece']:.3f} Brier {figures[method]['brier']:.3f}"
                                       for method in ("none", *METHODS))
              + f"; an increasing map reaches ECE {figures['reachable']['ece']:.3f}; "
              f"{figures['unseen']['cancers']} of {figures['unseen']['of']} test Cancers score below every "
              "validation Cancer", flush=True)
    print(f"\nmean over {len(runs)} models (test ECE, {args.bins} equal-mass bins / Brier):")
    for method in ("none", *METHODS):
        ece = [run[method]["ece"] for run in runs.values()]
        brier = [run[method]["brier"] for run in runs.values()]
        print(f"  {method:<12} ECE {np.mean(ece):.3f} (sd {np.std(ece, ddof=1) if len(ece) > 1 else 0:.3f})   "
              f"Brier {np.mean(brier):.3f}")
    if args.out:
        args.out.write_text(json.dumps(runs, indent=1))
    if args.results:
        labels = dict(zip(runs, args.labels or list(runs), strict=True))
        table = methods_table({labels[model]: figures for model, figures in runs.items()}, args.bins)
        print(f"written: {write_result(args.results, {'tables': {'ece_brier': table}, 'runs': runs})}")


def methods_table(runs: dict, bins: int) -> dict:
    """The documentation's table: test ECE / Brier of each model under each method, then the mean over models."""
    methods = ("none", *METHODS)

    def cell(figures: dict) -> str:
        return f"{figures['ece']:.3f} / {figures['brier']:.3f}"

    def why(figures: dict) -> list[str]:
        return [f"{figures['reachable']['ece']:.3f}", f"{figures['unseen']['cancers']} of {figures['unseen']['of']}"]

    rows = [[label, *(cell(figures[method]) for method in methods), *why(figures)] for label, figures in runs.items()]
    mean_reachable = np.mean([run["reachable"]["ece"] for run in runs.values()])
    rows.append([f"mean of the {len(runs)}", *(cell({key: float(np.mean([run[method][key] for run in runs.values()]))
                                                     for key in ("ece", "brier")}) for method in methods),
                 f"{mean_reachable:.3f}", ""])
    return {"title": f"Test ECE ({bins} equal-mass bins) / Brier per calibration method, the ECE an increasing map "
                     "could reach, and the test Cancers scored below every validation Cancer",
            "columns": ["model", "uncalibrated", *METHODS, "reachable (fitted on test)",
                        "test Cancers below every validation Cancer"], "rows": rows}


if __name__ == "__main__":
    main()
