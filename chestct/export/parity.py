"""Every exported format must give the Keras model's answers: each is run in a fresh process and compared.

    python -m chestct.export.parity FORMAT ARTIFACT IMAGES.npy OUT.npz --latency-runs N

A fresh process proves the artifact stands alone: nothing of the exporting process (custom objects already
registered, a model still in memory) can leak into the result. Float formats must match the Keras probabilities
(and, for a model with a lesion map, the Keras lesion map) within `export.float_tolerance` and agree on every
decision; a quantized one (the registry's `quantized` flag)
within `export.quantized_tolerance` and on at least `export.min_decision_agreement` of the decisions (the
decision rule is chestct.decision.decide). An export with a feature-distance domain check (chestct.feature_domain)
gives the pooled features too: a float format's distances must match the Keras model's within DISTANCE_TOLERANCE
of the cut, and its in/out-of-domain verdicts agree wherever the distance is farther than that from the cut; a
quantized one's verdicts must agree on at least `export.min_decision_agreement` of the images.

The check measures every format and returns one report each; `formats_to_leave_out` then decides. A float format
out of tolerance is a conversion bug and fails the export. A quantized one is an optional variant: it is left out
of the export, with its figures and the reason, unless `export.require_all` is true.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from chestct.decision import decide
from chestct.errors import ChestctError
from chestct.export.formats import FORMATS, open_exported
from chestct.feature_domain import FeatureDomain
from chestct.params import ExportParams

# Largest |distance - distance_keras| of a float format, as a share of the domain cut: rounding in the features,
# amplified along their least varying directions (chestct.evaluation.domain.FEATURE_RESOLUTION bounds that). An
# untrained test model, whose features are rounding-sized differences of large activations, reaches 0.03. A
# quantized format differs by far more and is judged on its verdicts instead (the decision agreement it must reach).
DISTANCE_TOLERANCE = 0.05


class ExportParityError(ChestctError, RuntimeError):
    """A float format disagrees with the Keras model, a quantized one does under export.require_all, or no format
    passed at all: nothing is exported."""


def run_in_fresh_process(format_name: str, artifact: Path, images_file: Path, latency_runs: int) -> dict:
    """Predictions and single-image latencies of one artifact, computed by `python -m chestct.export.parity`."""
    with tempfile.TemporaryDirectory() as scratch:
        out = Path(scratch) / "result.npz"
        command = [sys.executable, "-m", "chestct.export.parity", format_name, str(artifact), str(images_file),
                   str(out), "--latency-runs", str(latency_runs)]
        result = subprocess.run(command, capture_output=True, text=True,
                                env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})
        if result.returncode != 0:
            tail = result.stderr.strip().splitlines()[-5:]
            raise ExportParityError(f"{format_name}: {artifact.name} failed to load or run in a fresh process:\n  "
                                    + "\n  ".join(tail))
        with np.load(out) as loaded:
            return {"scores": loaded["scores"], "latency_ms": loaded["latency_ms"],
                    "maps": loaded["maps"] if "maps" in loaded.files else None,
                    "features": loaded["features"] if "features" in loaded.files else None}


def _limits(format_name: str, params: ExportParams) -> dict:
    """The tolerance and the required decision agreement of one format, and the params that set them."""
    if FORMATS[format_name].quantized:
        return {"quantized": True, "tolerance": params.quantized_tolerance,
                "tolerance_param": "export.quantized_tolerance",
                "required_agreement": params.min_decision_agreement,
                "agreement_param": "export.min_decision_agreement"}
    return {"quantized": False, "tolerance": params.float_tolerance, "tolerance_param": "export.float_tolerance",
            "required_agreement": 1.0, "agreement_param": "float formats agree on every decision"}


def _map_difference(reference_maps: np.ndarray | None, maps: np.ndarray | None) -> float | None:
    """max |map - map_keras|: None when the model has no lesion map, inf when only one side has one."""
    if reference_maps is None and maps is None:
        return None
    if reference_maps is None or maps is None or reference_maps.shape != maps.shape:
        return float("inf")
    return float(np.max(np.abs(maps - reference_maps))) if maps.size else 0.0


def _domain_figures(domain: FeatureDomain | None, reference_features: np.ndarray | None,
                    features: np.ndarray | None, limits: dict) -> tuple[dict, list[str]]:
    """The feature-distance figures of one format against the Keras model's, and its problems."""
    if domain is None:
        return {}, []
    if reference_features is None or features is None or reference_features.shape != features.shape:
        return {"max_abs_distance_diff": float("inf"), "domain_agreement": 0.0}, [
            "the pooled-feature output is missing or of another shape than the Keras model's"]
    reference, distances = domain.distances(reference_features), domain.distances(features)
    difference = float(np.max(np.abs(distances - reference))) if len(reference) else 0.0
    same = (distances <= domain.cut) == (reference <= domain.cut)
    if not limits["quantized"]:  # a distance within rounding of the cut may fall on either side of it
        same |= np.abs(reference - domain.cut) <= DISTANCE_TOLERANCE * domain.cut
    agreement = float(np.mean(same)) if len(reference) else 1.0
    problems = []
    if not limits["quantized"] and not difference <= DISTANCE_TOLERANCE * domain.cut:
        problems.append(f"max |distance - distance_keras| {difference:.4g} > {DISTANCE_TOLERANCE:g} of the domain "
                        f"cut {domain.cut:.4g}")
    if agreement < limits["required_agreement"]:
        problems.append(f"domain-check agreement {agreement:.4f} < {limits['required_agreement']:.4f} "
                        f"({limits['agreement_param']})")
    return {"max_abs_distance_diff": difference, "domain_agreement": agreement}, problems


def parity_report(reference: np.ndarray, scores: np.ndarray, threshold: float, format_name: str,
                  params: ExportParams, reference_maps: np.ndarray | None = None,
                  maps: np.ndarray | None = None, domain: FeatureDomain | None = None,
                  reference_features: np.ndarray | None = None, features: np.ndarray | None = None) -> dict:
    """One format's figures against the Keras probabilities (and lesion maps, and domain distances when the export
    has a feature domain), its limits, `passed`, and when it failed the `reason`: each figure out of its limit,
    with the param that sets the limit."""
    limits = _limits(format_name, params)
    max_diff = float(np.max(np.abs(scores - reference))) if len(reference) else 0.0
    agreement = float(np.mean(decide(scores, threshold) == decide(reference, threshold))) if len(reference) else 1.0
    map_diff = _map_difference(reference_maps, maps)
    problems = []
    if not max_diff <= limits["tolerance"]:  # `not <=` also catches NaN probabilities
        problems.append(f"max |p - p_keras| {max_diff:.4g} > {limits['tolerance']:g} ({limits['tolerance_param']})")
    if map_diff is not None and not map_diff <= limits["tolerance"]:
        problems.append(f"max |lesion map - lesion map_keras| {map_diff:.4g} > {limits['tolerance']:g} "
                        f"({limits['tolerance_param']})")
    if agreement < limits["required_agreement"]:
        problems.append(f"decision agreement {agreement:.4f} < {limits['required_agreement']:.4f} "
                        f"({limits['agreement_param']})")
    domain_figures, domain_problems = _domain_figures(domain, reference_features, features, limits)
    problems += domain_problems
    report = {"quantized": limits["quantized"], "max_abs_diff": max_diff, "tolerance": limits["tolerance"],
              "decision_agreement": agreement, "required_agreement": limits["required_agreement"],
              "passed": not problems} | domain_figures
    if map_diff is not None:
        report["max_abs_map_diff"] = map_diff
    if problems:
        report["reason"] = "; ".join(problems)
    return report


def failed_run_report(format_name: str, params: ExportParams, error: str) -> dict:
    """The report of an artifact that could not be loaded or run in a fresh process: no figures, the error."""
    limits = _limits(format_name, params)
    one_line = " | ".join(line.strip() for line in error.splitlines() if line.strip())  # for the warning line
    return {"quantized": limits["quantized"], "max_abs_diff": None, "tolerance": limits["tolerance"],
            "decision_agreement": None, "required_agreement": limits["required_agreement"], "passed": False,
            "reason": one_line}


def measure_format(format_name: str, artifact: Path, images_file: Path, reference: dict, threshold: float,
                   params: ExportParams, domain: FeatureDomain | None = None) -> tuple[dict, np.ndarray]:
    """(parity report, single-image latencies in ms) of one artifact run in a fresh process. An artifact that
    fails to load or run gives a failed report (no latencies) rather than an exception, so every format is
    measured before `formats_to_leave_out` decides."""
    try:
        run = run_in_fresh_process(format_name, artifact, images_file, params.latency_runs)
    except ExportParityError as exc:
        return failed_run_report(format_name, params, str(exc)), np.zeros(0)
    return (parity_report(reference["scores"], run["scores"], threshold, format_name, params, reference["maps"],
                          run["maps"], domain, reference["features"], run["features"]),
            run["latency_ms"])


def _failure_lines(reports: dict[str, dict]) -> str:
    return "\n  ".join(f"{name}: {report['reason']}" for name, report in reports.items())


def formats_to_leave_out(reports: dict[str, dict], require_all: bool) -> dict[str, dict]:
    """The quantized formats that failed parity, {name: report}: the export goes on without them.

    Raises ExportParityError, naming the formats and their figures, when a float format failed (a conversion bug,
    never rounding), when a quantized one failed and `export.require_all` is true, or when no format passed.
    """
    failed = {name: report for name, report in reports.items() if not report["passed"]}
    float_failures = {name: report for name, report in failed.items() if not report["quantized"]}
    if float_failures:
        raise ExportParityError(
            "float formats must give the Keras model's probabilities; these do not:\n  "
            + _failure_lines(float_failures)
            + "\nNothing was exported. A float format out of tolerance is a conversion bug, not rounding: loosen "
              "export.float_tolerance only if the difference is understood.")
    if failed and require_all:
        raise ExportParityError(
            "quantized formats outside their tolerances, and export.require_all is true:\n  " + _failure_lines(failed)
            + "\nNothing was exported. Set export.require_all: false to export the other formats without them, or "
              "loosen export.quantized_tolerance / export.min_decision_agreement only if the difference is "
              "understood.")
    if len(failed) == len(reports):
        raise ExportParityError(
            "no format passed the parity check:\n  " + _failure_lines(failed)
            + "\nNothing was exported. Add a float format (keras, savedmodel, tflite_float32) to export.formats.")
    return failed


def left_out_warning(format_name: str, report: dict) -> str:
    """The one line the export stage prints for a format it left out."""
    return (f"export: warning: {format_name} left out: {report['reason']}; set export.require_all: true to fail "
            f"instead")


def main() -> None:
    """The fresh-process side: load one artifact, predict the images, time single-image predictions."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("format")
    parser.add_argument("artifact")
    parser.add_argument("images")
    parser.add_argument("out")
    parser.add_argument("--latency-runs", type=int, default=30)
    args = parser.parse_args()

    images = np.load(args.images)
    loaded = open_exported(args.format, args.artifact)
    predict = loaded.predict
    scores, maps, features = loaded.predict_outputs(images)
    single = images[:1]
    predict(single)  # warm-up: graph tracing and allocation are not latency
    timings = []
    for _ in range(args.latency_runs):
        started = time.perf_counter()
        predict(single)
        timings.append((time.perf_counter() - started) * 1000.0)
    optional = {name: array for name, array in (("maps", maps), ("features", features)) if array is not None}
    np.savez(args.out, scores=scores, latency_ms=np.array(timings), **optional)


if __name__ == "__main__":
    main()
