"""Does mixed precision cost accuracy? Train on the real data under each precision and compare validation AUC.

    python -m benchmarks.precision_auc --real ../shared/data/chest-ctscan-images
                                       [--precisions float32,mixed_bfloat16] [--backbone mobilenetv3small]
                                       [--image-size 128]

For each precision, in a temporary copy of the project with `data.source: local`, runs
`dvc repro train_phase2` (download, split, preprocess, both training phases) with random initial weights and
the whole backbone fine-tuned in phase 2, and prints the best validation AUC of each phase and the wall time.
The data stages run once; the later precisions reuse them from the DVC cache. A small backbone and image size
keep it to minutes on a CPU; pass --backbone densenet121 --image-size 256 for the default model.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

from tests.pipeline_repo import make_pipeline_repo, run, update_params


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--real", type=Path, required=True, help="the Kaggle dataset folder (holds Data/)")
    parser.add_argument("--precisions", default="float32,mixed_bfloat16")
    parser.add_argument("--backbone", default="mobilenetv3small")
    parser.add_argument("--image-size", type=int, default=128)
    args = parser.parse_args()

    scratch = Path(tempfile.mkdtemp(prefix="chestct-precision-"))
    overrides = {
        "data": {"source": "local", "local_path": str(args.real.resolve())},
        "preprocess": {"image_size": args.image_size},
        "model": {"backbone": args.backbone, "weights": None, "unfreeze": {args.backbone: 1000}},
        "train": {"phase1": {"epochs": 3, "learning_rate": 1e-3}, "phase2": {"epochs": 10, "learning_rate": 1e-3}},
    }
    rows = []
    try:
        repo = make_pipeline_repo(scratch / "project", overrides)
        for precision in args.precisions.split(","):
            update_params(repo, {"train": {"precision": precision}})
            started = time.perf_counter()
            run(["dvc", "repro", "train_phase2"], repo)
            seconds = time.perf_counter() - started
            phases = [json.loads((repo / f"metrics/train_phase{n}.json").read_text()) for n in (1, 2)]
            rows.append((precision, phases[0]["best_val_auc"], phases[1]["best_val_auc"],
                         phases[1]["best_epoch"], seconds))
            print(f"{precision}: phase-2 best validation AUC {phases[1]['best_val_auc']:.4f} "
                  f"({seconds:.0f} s)", flush=True)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)

    print(f"\n{args.backbone} at {args.image_size} px, weights null, real data")
    print(f"{'precision':<16}{'phase-1 AUC':>12}{'phase-2 AUC':>12}{'best epoch':>11}{'wall s':>8}{'AUC - fp32':>11}")
    reference = rows[0][2]
    for precision, auc1, auc2, epoch, seconds in rows:
        print(f"{precision:<16}{auc1:>12.4f}{auc2:>12.4f}{epoch:>11}{seconds:>8.0f}{auc2 - reference:>+11.4f}")


if __name__ == "__main__":
    main()
