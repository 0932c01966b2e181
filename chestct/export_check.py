"""Run one exported artifact in a fresh process: predictions on an image array, and single-image latency.

    python -m chestct.export_check FORMAT ARTIFACT IMAGES.npy OUT.npz --latency-runs N

A fresh process proves the artifact stands alone: nothing of the exporting process (custom objects already
registered, a model still in memory) can leak into the result.
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def main() -> None:
    from chestct.exported_model import load_exported

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
