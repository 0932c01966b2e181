"""What does a change cost? `dvc repro` timings on tiny synthetic data: full run, no-op, evaluate-only change.

    python -m benchmarks.incremental [--keep DIR]

In a temporary copy of the project (tiny synthetic data at 32 px, MobileNetV3Small with random weights, the
settings of tests/test_experiments.py) it times, each as a separate `dvc repro`:

1. the full pipeline from an empty cache,
2. a no-op rerun (nothing changed: DVC only hashes and compares),
3. a change to an evaluate-only param (`evaluate.bootstrap_resamples`): evaluate and export rerun, training
   does not,
4. the same change undone: DVC restores the earlier outputs from its run cache instead of recomputing.

It prints the seconds, the stages each run executed, and each time as a fraction of the full run.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

from tests.pipeline_repo import make_pipeline_repo, run, update_params
from tests.test_experiments import QUICK_PIPELINE, stages_run


def _timed_repro(repo: Path) -> tuple[float, list[str]]:
    """Seconds, and the stages executed (restored from the run cache: marked 'restored')."""
    started = time.perf_counter()
    result = run(["dvc", "repro"], repo)
    seconds = time.perf_counter() - started
    restored = [line.split("'")[1] + " (restored)" for line in result.stdout.splitlines()
                if line.startswith("Stage '") and "is cached" in line]
    return seconds, stages_run(result.stdout) + restored


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--keep", type=Path, default=None, help="build the project here and keep it")
    args = parser.parse_args()

    scratch = Path(tempfile.mkdtemp(prefix="chestct-incremental-"))
    repo = make_pipeline_repo(args.keep or scratch / "project", QUICK_PIPELINE)
    resamples = QUICK_PIPELINE["evaluate"]["bootstrap_resamples"]
    try:
        steps = [("full pipeline", None), ("no-op rerun", None),
                 ("evaluate-only param changed", resamples + 100), ("change undone (run cache)", resamples)]
        rows = []
        for label, new_resamples in steps:
            if new_resamples is not None:
                update_params(repo, {"evaluate": {"bootstrap_resamples": new_resamples}})
            seconds, stages = _timed_repro(repo)
            rows.append((label, seconds, stages))
            print(f"{label}: {seconds:.1f} s", flush=True)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)

    full = rows[0][1]
    print(f"\n{'run':<30}{'seconds':>9}{'of full':>9}  stages executed")
    for label, seconds, stages in rows:
        print(f"{label:<30}{seconds:>9.1f}{seconds / full:>9.3f}  {', '.join(stages) or '(none)'}")


if __name__ == "__main__":
    main()
