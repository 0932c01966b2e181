"""export stage: every format from models/phase2.keras, parity-checked in fresh processes, metadata, model card,
and metrics/summary.json (the run's headline figures, chestct.export.summary).

With the evaluate stage's feature-distance domain fit (models/domain.npz, evaluate.domain.enabled), every format
gives the model's pooled features as its last output and the fit is copied into the export (chestct.feature_domain).

A float format out of tolerance fails the stage; a quantized one is left out (its file removed, its figures and
the reason in metrics/export.json, metadata.json and the model card) unless export.require_all is true.
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np

from chestct.atomic_io import atomic_path, write_json
from chestct.evaluation.features import with_features
from chestct.export.formats import artifact_bytes, planned_formats, remove_artifact, write_artifacts
from chestct.export.parity import formats_to_leave_out, left_out_warning, measure_format, run_in_fresh_process
from chestct.export.provenance import export_source
from chestct.export.summary import build_summary
from chestct.export.writer import write_metadata_files
from chestct.feature_domain import DOMAIN_FILE, load_feature_domain
from chestct.imaging.processed import load_split
from chestct.params import load_params
from chestct.training.backbones import backbone_spec
from chestct.training.model import compute_dtypes, float32_copy, load_trained_model, prediction_of
from stages.errors import run_stage

MODEL = Path("models/phase2.keras")
THRESHOLD = Path("models/threshold.json")
DOMAIN = Path("models/domain.npz")
TEST = Path("data/processed/test")
EVAL_METRICS = Path("metrics/eval.json")
DATA_METRICS = Path("metrics/data.json")
PHASE_METRICS = {phase: Path(f"metrics/train_{phase}.json") for phase in ("phase1", "phase2")}
EXPORT = Path("models/export")
METRICS = Path("metrics/export.json")
SUMMARY = Path("metrics/summary.json")
# Wall-clock latencies differ from run to run: kept out of metrics/, whose files reruns must reproduce exactly.
LATENCY = Path("reports/export_latency.json")


def _read_json(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.exists() else None


def precision_report(trained, exported, images: np.ndarray) -> dict:
    """Which arithmetic training used and the export uses, and how far apart their probabilities are."""
    report = {"trained": sorted(compute_dtypes(trained)), "exported": sorted(compute_dtypes(exported))}
    if exported is not trained:
        difference = np.abs(prediction_of(trained.predict(images, verbose=0))
                            - prediction_of(exported.predict(images, verbose=0)))
        report["max_abs_diff_vs_trained"] = float(difference.max()) if difference.size else 0.0
        print(f"export: trained in {'/'.join(report['trained'])}, exported in float32; "
              f"max |p_float32 - p_trained| = {report['max_abs_diff_vs_trained']:.2e}", flush=True)
    return report


def _measured_line(name: str, report: dict, latency: dict | None) -> str:
    """One progress line per format: size, parity figures, latency (n/a where the artifact did not run)."""
    def figure(value, spec: str) -> str:
        return "n/a" if value is None else format(value, spec)

    median = figure(latency["median_ms"] if latency else None, ".1f")
    lesion_map = (f"  max|d map| {figure(report['max_abs_map_diff'], '.2e')}"
                  if report.get("max_abs_map_diff") is not None else "")
    return (f"export: {name:<15} {report['bytes'] / 1e6:7.1f} MB  max|dp| {figure(report['max_abs_diff'], '.2e')}"
            f"{lesion_map}  agreement {figure(report['decision_agreement'], '.4f')}  latency {median} ms"
            + ("" if report["passed"] else "  FAILED parity"))


def main() -> None:
    params = load_params()
    threshold = json.loads(THRESHOLD.read_text())
    test = load_split(TEST, unstandardised=False).in_memory()  # the parity checks need the model's input only
    trained = load_trained_model(MODEL, keep_lesion_map=True)  # a lesion map is exported with the probability
    model = float32_copy(trained)  # after mixed-precision training: the same weights, float32 arithmetic
    domain = load_feature_domain(DOMAIN)
    backbone = backbone_spec(params.model.backbone)
    formats, skipped = planned_formats(params.export.formats, backbone.legacy_h5, backbone.name)
    precision = precision_report(trained, model, test.images)

    exported = model if domain is None else with_features(model)  # the pooled features as the last output

    with atomic_path(EXPORT) as folder, tempfile.TemporaryDirectory() as scratch:
        paths = write_artifacts(exported, folder, formats)
        images_file = Path(scratch) / "test_images.npy"
        np.save(images_file, test.images)
        reference_model = MODEL
        if exported is not trained:
            reference_model = Path(scratch) / "reference.keras"
            exported.save(reference_model)
        reference = run_in_fresh_process("keras", reference_model, images_file, 1)
        reports, latency = {}, {}
        for name, path in paths.items():
            reports[name], timings = measure_format(name, path, images_file, reference, threshold["threshold"],
                                                    params.export, domain)
            reports[name]["bytes"] = artifact_bytes(path)
            if timings.size:
                latency[name] = {"median_ms": float(np.median(timings)), "p95_ms": float(np.percentile(timings, 95))}
            print(_measured_line(name, reports[name], latency.get(name)), flush=True)
        # Raises (a float format failed, or export.require_all) before the folder is moved into place.
        left_out = formats_to_leave_out(reports, params.export.require_all)
        for name, report in left_out.items():
            remove_artifact(paths.pop(name))  # the export folder holds only what passed
            latency.pop(name, None)
            print(left_out_warning(name, report), file=sys.stderr, flush=True)
        domain_file = None
        if domain is not None:
            domain_file = (shutil.copyfile(DOMAIN, folder / DOMAIN_FILE), domain)
        write_metadata_files(folder, params, threshold, paths, skipped, test.image_size, _read_json(EVAL_METRICS),
                             _read_json(DATA_METRICS), left_out, source=export_source(), domain=domain_file)
    report = {"test_images": len(test), "formats": {name: reports[name] for name in paths},
              "left_out": left_out, "skipped": skipped, "precision": precision}
    write_json(METRICS, report)
    write_json(SUMMARY, build_summary(_read_json(EVAL_METRICS), *map(_read_json, PHASE_METRICS.values()), report))
    write_json(LATENCY, {"single_image_runs": params.export.latency_runs, "formats": latency})
    print(f"export: {len(paths)} formats -> {EXPORT} ({', '.join(paths)}); parity checked on {len(test)} test "
          f"images" + (f"; left out: {', '.join(left_out)}" if left_out else ""))


if __name__ == "__main__":
    run_stage("export", main)
