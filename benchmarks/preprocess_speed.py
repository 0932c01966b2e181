"""How fast the data half of the pipeline runs: `dvc repro preprocess` from the local copy of the real data.

    python -m benchmarks.preprocess_speed [--data ../shared/data/chest-ctscan-images] [--image-size 256]

Copies the project into a temporary git repo, points data.source at the local dataset, runs
`dvc repro preprocess` once, and prints the wall time of each stage and the images/s of split and preprocess.
"""

from __future__ import annotations

import argparse
import os
import re
import tempfile
import time
from pathlib import Path

import pandas as pd

from tests.pipeline_repo import make_pipeline_repo, run

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "chest-ctscan-images"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=Path(os.environ.get("CHESTCT_REAL_DATA", DEFAULT_DATA)))
    parser.add_argument("--image-size", type=int, default=256)
    args = parser.parse_args()
    if not args.data.exists():
        raise SystemExit(f"{args.data}: dataset not found; pass --data or set CHESTCT_REAL_DATA")

    with tempfile.TemporaryDirectory() as temp:
        overrides = {"data": {"source": "local", "local_path": str(args.data.resolve())},
                     "preprocess": {"image_size": args.image_size}}
        repo = make_pipeline_repo(Path(temp) / "project", overrides)
        started = time.perf_counter()
        stage_times = {}
        for stage in ("download", "split", "preprocess"):
            stage_start = time.perf_counter()
            result = run(["dvc", "repro", "--single-item", stage], repo)
            stage_times[stage] = time.perf_counter() - stage_start
            assert f"Running stage '{stage}'" in result.stdout, result.stdout
        total = time.perf_counter() - started
        images = len(pd.read_csv(repo / "data/split/manifest.csv"))
        rate = re.search(r"\((\d+) img/s\)", result.stdout)

    print(f"dataset: {args.data} ({images} images), image size {args.image_size}, {os.cpu_count()} cores")
    print(f"{'stage':<12}{'wall s':>8}{'img/s':>8}")
    for stage, seconds in stage_times.items():
        print(f"{stage:<12}{seconds:>8.1f}{images / seconds:>8.0f}")
    print(f"{'total':<12}{total:>8.1f}{images / total:>8.0f}")
    if rate:
        print(f"preprocess work alone (inside the stage): {rate.group(1)} img/s")
    print("wall times include dvc's own start-up and caching of the outputs")


if __name__ == "__main__":
    main()
