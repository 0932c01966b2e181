"""Every exported format must give the Keras model's answers: each is run in a fresh process and compared.

    python -m chestct.export.parity FORMAT ARTIFACT IMAGES.npy OUT.npz --latency-runs N

A fresh process proves the artifact stands alone: nothing of the exporting process (custom objects already
registered, a model still in memory) can leak into the result. Float formats must match the Keras probabilities
within `export.float_tolerance`; a quantized one within `export.quantized_tolerance` and with at least
`export.min_decision_agreement` of the decisions (the decision rule is chestct.decision.decide).
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
from chestct.export.formats import FORMATS, load_exported
from chestct.params import ExportParams


class ExportParityError(ChestctError, RuntimeError):
    """An exported format disagrees with the Keras model beyond its tolerance."""


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
            return {"scores": loaded["scores"], "latency_ms": loaded["latency_ms"]}


def parity_report(reference: np.ndarray, scores: np.ndarray, threshold: float, format_name: str,
                  params: ExportParams) -> dict:
    quantized = FORMATS[format_name].quantized
    tolerance = params.quantized_tolerance if quantized else params.float_tolerance
    max_diff = float(np.max(np.abs(scores - reference))) if len(reference) else 0.0
    agreement = float(np.mean(decide(scores, threshold) == decide(reference, threshold))) if len(reference) else 1.0
    required_agreement = params.min_decision_agreement if quantized else 1.0
    return {"max_abs_diff": max_diff, "tolerance": tolerance, "decision_agreement": agreement,
            "required_agreement": required_agreement,
            "passed": bool(max_diff <= tolerance and agreement >= required_agreement)}


def check_parity(reports: dict[str, dict]) -> None:
    """Fail, naming every format out of tolerance."""
    failures = [f"{name}: max |p - p_keras| = {r['max_abs_diff']:.3g} (tolerance {r['tolerance']:.3g}), "
                f"decision agreement {r['decision_agreement']:.4f} (required {r['required_agreement']:.4f})"
                for name, r in reports.items() if not r["passed"]]
    if failures:
        raise ExportParityError("exported formats disagree with the Keras model:\n  " + "\n  ".join(failures)
                                + "\nNothing was exported. Loosen export.*_tolerance only if the difference is "
                                  "understood.")


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
    predict = load_exported(args.format, args.artifact)
    scores = predict(images)
    single = images[:1]
    predict(single)  # warm-up: graph tracing and allocation are not latency
    timings = []
    for _ in range(args.latency_runs):
        started = time.perf_counter()
        predict(single)
        timings.append((time.perf_counter() - started) * 1000.0)
    np.savez(args.out, scores=scores, latency_ms=np.array(timings))


if __name__ == "__main__":
    main()
