"""Out-of-fold thresholds: does an operating point chosen on k-fold out-of-fold scores transfer better than one
chosen on validation?

    python -m benchmarks.oof_threshold --seeds 3 --folds 3 --real ../shared/data/chest-ctscan-images
                                       [-S key=value ...] [--out reports/oof_threshold.json] [--no-results]

Why: with `split.dedup: regroup` validation holds 2-3 distinct Normal slices, so the threshold chosen on it rests
on two or three images and test specificity swings from 0.04 to 1.00 between seeds. Out-of-fold scores over
train + valid rest on every distinct Normal slice outside test (about 23 of the real data's 33 with regroup).

For each seed this builds the project copy of benchmarks.seeds and runs `dvc repro evaluate` (the pipeline's model
and its validation threshold). Then it does what the out_of_fold stage does (chestct/training/folds.py): pools
train + valid, cuts them into k folds keeping whole near-duplicate groups together, trains the two-phase recipe on
the other folds with epochs selected on the held-out fold and a perturbed copy of it, and scores the held-out
fold. The threshold is chosen on the pooled out-of-fold scores with `evaluate.threshold`, then applied unchanged
to (a) the pipeline's model, which is what `evaluate.threshold.chosen_on: out_of_fold` does, and (b) the mean of
the k fold models, which the pipeline does not build. Test labels are read only to report. k + 1 trainings a seed.
The documentation's table (What the model learned, "Operating point") goes to docs/results/oof_threshold.json.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.metrics import roc_auc_score

from benchmarks.results import write_result
from benchmarks.seeds import project_overrides
from tests.pipeline_repo import make_pipeline_repo, run, update_params


def _rates(labels: np.ndarray, scores: np.ndarray, threshold: float) -> dict:
    from chestct.decision import decide
    predicted = decide(scores, threshold)
    return {"sensitivity": float(predicted[labels == 1].mean()),
            "specificity": float(1 - predicted[labels == 0].mean())}


def _distinct_normals(ids: np.ndarray, labels: np.ndarray, manifest: pd.DataFrame) -> int:
    groups = manifest.set_index("id").loc[ids.astype(str), "near_group"].to_numpy()
    return int(np.unique(groups[labels == 0]).size)


def one_seed(repo: Path, folds: int) -> dict:
    """Everything above for the project at `repo`, whose `dvc repro evaluate` has run."""
    from chestct.evaluation.robustness import perturbed_split
    from chestct.evaluation.scoring import predict_scores
    from chestct.evaluation.thresholds import choose_threshold
    from chestct.imaging.processed import load_split
    from chestct.params import load_params
    from chestct.training.folds import fold_rows, pool, train_fold
    from chestct.training.loop import configure_determinism, configure_precision
    from chestct.training.model import load_trained_model

    params = load_params(repo / "params.yaml")
    configure_determinism(params.seed, params.train.deterministic)
    configure_precision(params.train.precision)
    manifest = pd.read_csv(repo / "data/split/manifest.csv", keep_default_na=False)
    processed = repo / "data/processed"
    valid = load_split(processed / "valid")
    images = pool(load_split(processed / "train"), valid)
    test = load_split(processed / "test", unstandardised=False).in_memory()
    train_ids = manifest.loc[manifest["split"] == "train", "id"].to_numpy()
    perturbed, _ = perturbed_split(images, repo / "data/raw/Data", train_ids, params)
    robust = params.train.selection == "val_auc_robust"

    groups = manifest.set_index("id").loc[images.ids.astype(str), "near_group"].to_numpy()
    batch = params.train.validation_batch_size
    oof = np.full(len(images), np.nan)
    fold_test_scores = []
    for fold, (train_rows, held_rows) in enumerate(fold_rows(images.labels, groups, folds, params.seed)):
        started = time.perf_counter()
        model = train_fold(params, images.take(train_rows), images.take(held_rows),
                           perturbed.take(held_rows) if robust else None, fold)
        oof[held_rows] = predict_scores(model, np.asarray(images.images[held_rows]), batch)
        fold_test_scores.append(predict_scores(model, test.images, batch))
        print(f"  fold {fold + 1}/{folds}: {len(train_rows)} train, {len(held_rows)} held out, out-of-fold AUC "
              f"{roc_auc_score(images.labels[held_rows], oof[held_rows]):.3f}, "
              f"{time.perf_counter() - started:.0f} s", flush=True)

    oof_choice = choose_threshold(images.labels, oof, params.evaluate.threshold)
    valid_choice = json.loads((repo / "models/threshold.json").read_text())
    pipeline_scores = predict_scores(load_trained_model(repo / "models/phase2.keras"), test.images, batch)
    ensemble_scores = np.mean(fold_test_scores, axis=0)
    return {
        "distinct_normals_valid": _distinct_normals(valid.ids, valid.labels, manifest),
        "distinct_normals_oof": _distinct_normals(images.ids, images.labels, manifest),
        "oof_auc": float(roc_auc_score(images.labels, oof)),
        "threshold_valid": valid_choice["threshold"],
        "threshold_oof": oof_choice["threshold"],
        "pipeline_auc": float(roc_auc_score(test.labels, pipeline_scores)),
        "ensemble_auc": float(roc_auc_score(test.labels, ensemble_scores)),
        "pipeline_at_valid": _rates(test.labels, pipeline_scores, valid_choice["threshold"]),
        "pipeline_at_oof": _rates(test.labels, pipeline_scores, oof_choice["threshold"]),
        "ensemble_at_oof": _rates(test.labels, ensemble_scores, oof_choice["threshold"]),
    }


ROWS = [("distinct Normal slices: validation", "distinct_normals_valid"),
        ("distinct Normal slices: out-of-fold pool", "distinct_normals_oof"),
        ("out-of-fold AUC", "oof_auc"),
        ("threshold: validation", "threshold_valid"),
        ("threshold: out-of-fold", "threshold_oof"),
        ("test AUC: pipeline model", "pipeline_auc"),
        ("test AUC: fold ensemble", "ensemble_auc"),
        ("pipeline model, validation threshold: sens", "pipeline_at_valid.sensitivity"),
        ("pipeline model, validation threshold: spec", "pipeline_at_valid.specificity"),
        ("pipeline model, out-of-fold threshold: sens", "pipeline_at_oof.sensitivity"),
        ("pipeline model, out-of-fold threshold: spec", "pipeline_at_oof.specificity"),
        ("fold ensemble, out-of-fold threshold: sens", "ensemble_at_oof.sensitivity"),
        ("fold ensemble, out-of-fold threshold: spec", "ensemble_at_oof.specificity")]


def _get(result: dict, dotted: str) -> float:
    for part in dotted.split("."):
        result = result[part]
    return result


def print_table(results: list[dict], seeds: list[int]) -> None:
    print(f"\n{'figure':<46}{'mean':>7}{'sd':>7}  per seed ({', '.join(map(str, seeds))})")
    for label, key in ROWS:
        values = [_get(result, key) for result in results]
        sd = f"{np.std(values, ddof=1):.3f}" if len(values) > 1 else "n/a"
        print(f"{label:<46}{np.mean(values):>7.3f}{sd:>7}  {', '.join(f'{value:.3f}' for value in values)}")


def _seeds(values: list[float], digits: int = 3, sd: bool = True, value_digits: int | None = None) -> str:
    """'0.261 ± 0.188 (0.341, 0.396, 0.047)': the mean, the sd when asked, the per-seed values."""
    mean = f"{np.mean(values):.{digits}f}"
    if sd and len(values) > 1:
        mean += f" ± {np.std(values, ddof=1):.{digits}f}"
    each = digits if value_digits is None else value_digits
    return f"{mean} ({', '.join(f'{value:.{each}f}' for value in values)})"


def oof_table(results: list[dict], seeds: list[int]) -> dict:
    """The documentation's table: the threshold chosen on validation against the one chosen out of fold."""
    def column(key: str) -> list[float]:
        return [_get(result, key) for result in results]

    def youden(prefix: str) -> str:
        return f"{np.mean([r[prefix]['sensitivity'] + r[prefix]['specificity'] - 1 for r in results]):.3f}"

    rows = [["distinct Normal slices it rests on", _seeds(column("distinct_normals_valid"), 1, False, 0),
             _seeds(column("distinct_normals_oof"), 1, False, 0)],
            ["threshold", _seeds(column("threshold_valid")), _seeds(column("threshold_oof"))],
            ["test sensitivity", _seeds(column("pipeline_at_valid.sensitivity")),
             _seeds(column("pipeline_at_oof.sensitivity"))],
            ["test specificity", _seeds(column("pipeline_at_valid.specificity")),
             _seeds(column("pipeline_at_oof.specificity"))],
            ["sensitivity + specificity - 1", youden("pipeline_at_valid"), youden("pipeline_at_oof")],
            ["pooled out-of-fold AUC", "", _seeds(column("oof_auc"))],
            ["fold ensemble at the out-of-fold threshold (not built): test AUC / sensitivity / specificity", "",
             f"{np.mean(column('ensemble_auc')):.3f} / {np.mean(column('ensemble_at_oof.sensitivity')):.3f} / "
             f"{np.mean(column('ensemble_at_oof.specificity')):.3f}"]]
    return {"title": "The operating point chosen on validation and on out-of-fold scores",
            "columns": [f"figure (mean ± sd, per seed {', '.join(map(str, seeds))})", "threshold chosen on validation",
                        "on out-of-fold scores"], "rows": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=2, help="how many seeds (default 2)")
    parser.add_argument("--first-seed", type=int, default=42)
    parser.add_argument("--folds", type=int, default=3, help="k of the out-of-fold split (default 3)")
    parser.add_argument("--real", type=Path, default=None, help="the chest-ctscan-images folder (data.source local)")
    parser.add_argument("-S", "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--out", type=Path, default=Path("reports/oof_threshold.json"))
    parser.add_argument("--no-results", action="store_true",
                        help="do not write docs/results/oof_threshold.json (the documentation's table)")
    args = parser.parse_args()
    if args.folds < 2:
        raise SystemExit("--folds must be at least 2")

    overrides = project_overrides(args.real, args.overrides)
    scratch = Path(tempfile.mkdtemp(prefix="chestct-oof-"))
    repo = make_pipeline_repo(scratch / "project", overrides)
    seeds = [args.first_seed + index for index in range(args.seeds)]
    results = []
    try:
        for seed in seeds:
            update_params(repo, {"seed": seed})
            started = time.perf_counter()
            run(["dvc", "repro", "evaluate"], repo)
            print(f"seed {seed}: pipeline trained and evaluated, {time.perf_counter() - started:.0f} s", flush=True)
            results.append(one_seed(repo, args.folds))
            print(f"seed {seed}: {json.dumps(results[-1])}", flush=True)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)

    print_table(results, seeds)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"seeds": seeds, "folds": args.folds, "overrides": overrides,
                                    "per_seed": results}, indent=2) + "\n")
    print(f"written: {args.out}")
    if not args.no_results:
        figures = {"tables": {"oof": oof_table(results, seeds)}, "seeds": seeds, "folds": args.folds,
                   "overrides": overrides, "per_seed": results}
        print(f"written: {write_result('oof_threshold', figures)}")


if __name__ == "__main__":
    main()
