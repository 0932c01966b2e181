"""Several seeds, one table: the headline figures of the pipeline as mean and standard deviation over seeds.

    python -m benchmarks.seeds --seeds 3 [--real ../shared/data/chest-ctscan-images] [-S key=value ...]
                               [--panel ../shared/data/cross-source] [--first-seed 42] [--out reports/seeds.json]
                               [--keep DIR] [--results NAME [--table ID]]

One run is not a result: the same commit has given test AUC 0.934 on one machine and 1.000 on another. This
builds one temporary copy of the project (with the real data through `data.source: local` when --real is given,
else the tiny phantoms of the tests), applies the -S overrides (dotted keys, YAML values: `-S model.weights=null`),
and for each seed sets `seed`, runs `dvc repro evaluate` (export is not needed for the figures) and reads
metrics/*.json. DVC reruns only what the seed changes (split, training, evaluation), so the data is copied and
preprocessed once. When external sets are declared (-S external.sets=... or --panel, which declares the project's
cross-source panel, lung_pet_ct_dx and luna16_normal, from that folder), it runs `dvc repro external` instead, and
every figure of metrics/external.json joins the table as "external: <set>.<figure>". It prints each headline
figure's mean, standard deviation and per-seed values, and writes them as JSON (--out). With --results NAME the
same table (figure, mean ± sd, per seed) also goes to docs/results/NAME.json as table ID (default "seeds"), with
the command, commit and CPU, for a documentation page to render (benchmarks.results).
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml

from benchmarks.results import write_result
from tests.pipeline_repo import make_pipeline_repo, run, update_params

# (label, metrics file, dotted key) of every headline figure, in the order the table prints them.
FIGURES = [
    ("test AUC", "eval", "test.auc"),
    ("test sensitivity", "eval", "test.sensitivity"),
    ("test specificity", "eval", "test.specificity"),
    ("test AUC: CI lower end, images resampled", "eval", "test.auc_ci.0"),
    ("test AUC: CI lower end, distinct slices resampled", "eval", "test.auc_ci_by_slice.0"),
    ("leak-free test AUC", "eval", "test_leak_free.auc"),
    ("distinct Normal slices, validation", "eval", "valid.normal_slices"),
    ("distinct Normal slices, test", "eval", "test.normal_slices"),
    ("validation AUC (phase 2 best)", "train_phase2", "best_val_auc"),
    ("hist-matched test AUC", "eval", "shortcut.hist_matched_model_auc"),
    ("robustness worst AUC", "eval", "robustness.worst_auc"),
    ("inserted-lesion check, test Normals", "eval", "lesion_check.test_auc"),
    ("intensity rule, stored files", "eval", "shortcut.intensity_std_auc"),
    ("intensity rule, model input", "eval", "shortcut.input_intensity_std_auc"),
    ("histogram rule, model input", "eval", "shortcut.input_histogram_auc"),
    ("border rule, model input", "eval", "shortcut.input_border_auc"),
    ("geometry rule, model input", "eval", "shortcut.input_geometry_auc"),
    ("noise rule, model input", "eval", "shortcut.input_noise_auc"),
    ("sharpness rule, model input", "eval", "shortcut.input_sharpness_auc"),
    ("Grad-CAM share in the body", "eval", "attention.in_body_share"),
    ("Grad-CAM share in the lungs", "eval", "attention.in_lung_share"),
    ("lungs' share of the input (uniform map)", "eval", "attention.lung_area_share"),
    ("test AUC, lungs alone", "eval", "attention.ablation.lungs_only.auc"),
    ("test AUC, lungs emptied", "eval", "attention.ablation.lungs_emptied.auc"),
    ("test ECE, calibrated (evaluate.calibration.method)", "eval", "calibration.test_ece"),
    ("test ECE an increasing map reaches (fitted on test: for reading only)", "eval",
     "calibration.test_ece_reachable"),
    ("test ECE, calibrated: CI upper end, images resampled", "eval", "calibration.test_ece_ci.1"),
    ("test ECE, calibrated: CI upper end, distinct slices resampled", "eval", "calibration.test_ece_ci_by_slice.1"),
    ("test ECE, uncalibrated", "eval", "calibration.test_ece_uncalibrated"),
    ("test Brier, calibrated", "eval", "calibration.test_brier"),
    ("test Brier, uncalibrated", "eval", "calibration.test_brier_uncalibrated"),
    ("test ECE, temperature", "eval", "calibration.methods.temperature.ece"),
    ("test ECE, platt", "eval", "calibration.methods.platt.ece"),
    ("test ECE, isotonic", "eval", "calibration.methods.isotonic.ece"),
    ("domain: feature-distance cut", "eval", "domain.cut"),
    ("domain: test flagged out of domain", "eval", "domain.test_out_of_domain_share"),
    ("domain: test flagged, not a chest CT slice", "eval", "domain.test_not_chest_share"),
    ("domain: test flagged, unlike training", "eval", "domain.test_unlike_training_share"),
    ("domain: validation flagged out of domain", "eval", "domain.valid_out_of_domain_share"),
    ("domain: test coverage", "eval", "domain.selective.test.coverage"),
    ("domain: test AUC in domain", "eval", "domain.selective.test.auc"),
    ("domain: test sensitivity in domain", "eval", "domain.selective.test.sensitivity"),
    ("domain: test specificity in domain", "eval", "domain.selective.test.specificity"),
]


# The cross-source panel under ../shared/data/cross-source (its PROVENANCE.txt): docs/external-validation.md.
# Paths are made absolute: the pipeline runs in a temporary copy of the project.
PANEL_SETS = (("lung_pet_ct_dx", "lung-pet-ct-dx", "annotated_series"), ("luna16_normal", "luna16-normal",
                                                                        "normal_only"))


def panel_sets(folder: Path) -> list[dict]:
    return [{"name": name, "path": str((folder / sub).resolve()), "kind": kind} for name, sub, kind in PANEL_SETS]


def external_figures(metrics: dict) -> dict:
    """{"external: <set>.<figure>": value} for every number in metrics/external.json (per-series values too)."""
    figures = {}

    def walk(prefix: str, value) -> None:
        if isinstance(value, dict):
            for key, inner in value.items():
                walk(f"{prefix}.{key}", inner)
        elif value is None or (isinstance(value, (int, float)) and not isinstance(value, bool)):
            figures[f"external: {prefix}"] = value

    for name, section in metrics.items():
        for key, value in section.items():
            walk(f"{name}.{key}", value)
    return figures


def parse_override(text: str) -> dict:
    """'model.head.units=[64]' -> {"model": {"head": {"units": [64]}}} (the value read as YAML)."""
    if "=" not in text:
        raise SystemExit(f"-S {text!r}: expected key=value")
    key, value = text.split("=", 1)
    nested: dict = yaml.safe_load(value) if value.strip() else None
    for part in reversed(key.strip().split(".")):
        nested = {part: nested}
    return nested


def _merge(base: dict, extra: dict) -> dict:
    merged = dict(base)
    for key, value in extra.items():
        merged[key] = _merge(base.get(key, {}), value) if isinstance(value, dict) else value
    return merged


def project_overrides(real: Path | None, settings: list[str]) -> dict:
    """The params the project copy gets: the real data (with `real`) and every `-S key=value`, in order."""
    overrides: dict = {}
    if real is not None:
        # The copy starts from the tests' tiny settings: give the real data the project's own image size back.
        project = yaml.safe_load(Path("params.yaml").read_text())
        overrides = {"data": {"source": "local", "local_path": str(real.resolve())},
                     "preprocess": {"image_size": project["preprocess"]["image_size"]}}
    for text in settings:
        overrides = _merge(overrides, parse_override(text))
    return overrides


def _lookup(metrics: dict, dotted: str):
    """The value at a dotted path; a number in the path indexes a list (`calibration.test_ece_ci.1`)."""
    value = metrics
    for part in dotted.split("."):
        if isinstance(value, list) and part.isdigit() and int(part) < len(value):
            value = value[int(part)]
        elif isinstance(value, dict) and part in value:
            value = value[part]
        else:
            return None
    return value


def summarise(per_seed: list[dict]) -> dict:
    """{label: {"mean", "sd", "values"}} over the seeds; sd is the sample standard deviation (ddof=1). Labels in
    the order FIGURES gives them, then the external figures as first seen."""
    labels = list(dict.fromkeys(label for run_ in per_seed for label in run_))
    summary = {}
    for label in labels:
        values = [run_.get(label) for run_ in per_seed]
        present = [value for value in values if value is not None]
        summary[label] = {"mean": float(np.mean(present)) if present else None,
                          "sd": float(np.std(present, ddof=1)) if len(present) > 1 else None,
                          "values": values}
    return summary


def figure_text(value) -> str:
    """A figure as the tables print it: three decimals, or n/a where it was not measured."""
    return "n/a" if value is None else f"{value:.3f}"


def mean_sd_text(entry: dict) -> str:
    """'mean ± sd' of one summarise() entry (the mean alone for one seed; n/a where no seed measured it)."""
    if entry["mean"] is None:
        return "n/a"
    return figure_text(entry["mean"]) + (f" ± {figure_text(entry['sd'])}" if entry["sd"] is not None else "")


def seeds_table(summary: dict, seeds: list[int], title: str) -> dict:
    """The documentation's table of `summary`: figure, mean ± sd, per-seed values."""
    return {"title": title, "columns": ["figure", f"mean ± sd over {len(seeds)} seeds",
                                        f"per seed ({', '.join(map(str, seeds))})"],
            "rows": [[label, mean_sd_text(entry), ", ".join(figure_text(value) for value in entry["values"])]
                     for label, entry in summary.items()]}


def print_table(summary: dict, seeds: list[int]) -> None:
    width = max(40, *(len(label) + 2 for label in summary))
    print(f"\n{'figure':<{width}}{'mean':>7}{'sd':>7}  per seed ({', '.join(map(str, seeds))})")
    for label, entry in summary.items():
        print(f"{label:<{width}}{figure_text(entry['mean']):>7}{figure_text(entry['sd']):>7}  "
              f"{', '.join(figure_text(value) for value in entry['values'])}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=3, help="how many seeds (default 3)")
    parser.add_argument("--first-seed", type=int, default=42, help="seeds are first-seed, first-seed + 1, ...")
    parser.add_argument("--real", type=Path, default=None, help="the chest-ctscan-images folder (data.source local)")
    parser.add_argument("-S", "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="a params override, as for `dvc exp run -S` (repeatable)")
    parser.add_argument("--panel", type=Path, default=None, metavar="DIR",
                        help="declare the cross-source panel from this folder (../shared/data/cross-source) and "
                             "run through the external stage")
    parser.add_argument("--out", type=Path, default=Path("reports/seeds.json"), help="where to write the JSON")
    parser.add_argument("--keep", type=Path, default=None,
                        help="build the project copy here and keep it; an existing copy is reused as it is (its "
                             "code, data and cached stages: a run stopped part-way goes on where it stopped)")
    parser.add_argument("--results", default=None, metavar="NAME",
                        help="also write the table to docs/results/NAME.json for the documentation")
    parser.add_argument("--table", default="seeds", metavar="ID", help="the table's id in that file (default seeds)")
    parser.add_argument("--timeout-min", type=float, default=240.0,
                        help="longest `dvc repro` of one seed, in minutes (default 240: a real-data seed with the "
                             "panel takes 10-25 minutes on 2 cores)")
    args = parser.parse_args()

    overrides = project_overrides(args.real, args.overrides)
    if args.panel is not None:
        overrides = _merge(overrides, {"external": {"sets": panel_sets(args.panel)}})
    target = "external" if (overrides.get("external") or {}).get("sets") else "evaluate"
    scratch = Path(tempfile.mkdtemp(prefix="chestct-seeds-"))
    if args.keep is not None and (args.keep / "dvc.yaml").is_file():
        repo = args.keep
        update_params(repo, overrides)
        print(f"reusing the project copy in {repo} (its code and cached stages)", flush=True)
    else:
        repo = make_pipeline_repo(args.keep or scratch / "project", overrides)
    seeds = [args.first_seed + index for index in range(args.seeds)]
    per_seed, worst_names = [], []
    try:
        for seed in seeds:
            update_params(repo, {"seed": seed})
            started = time.perf_counter()
            run(["dvc", "repro", target], repo, timeout=args.timeout_min * 60)
            metrics = {name: json.loads((repo / f"metrics/{name}.json").read_text())
                       for name in ("eval", "train_phase2")}
            per_seed.append({label: _lookup(metrics[file], key) for label, file, key in FIGURES})
            if target == "external":
                per_seed[-1].update(external_figures(json.loads((repo / "metrics/external.json").read_text())))
            worst_names.append(_lookup(metrics["eval"], "robustness.worst"))
            print(f"seed {seed}: test AUC {figure_text(per_seed[-1]['test AUC'])}, worst robustness AUC "
                  f"{figure_text(per_seed[-1]['robustness worst AUC'])} ({worst_names[-1]}), "
                  f"{time.perf_counter() - started:.0f} s", flush=True)
    finally:
        if args.keep is None:
            shutil.rmtree(scratch, ignore_errors=True)

    summary = summarise(per_seed)
    print_table(summary, seeds)
    print(f"worst perturbation per seed: {', '.join(str(name) for name in worst_names)}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"seeds": seeds, "overrides": overrides, "summary": summary,
                                    "worst_perturbation": worst_names}, indent=2) + "\n")
    print(f"written: {args.out}")
    if args.results:
        title = f"{len(seeds)} seeds, " + (" ".join(f"-S {text}" for text in args.overrides) or "the defaults")
        figures = {"tables": {args.table: seeds_table(summary, seeds, title)}, "seeds": seeds,
                   "overrides": overrides, "summary": summary, "worst_perturbation": worst_names}
        print(f"written: {write_result(args.results, figures)}")


if __name__ == "__main__":
    main()
