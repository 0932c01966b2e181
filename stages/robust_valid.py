"""robust_valid stage: a fixed perturbed copy of the validation split, for shortcut-aware model selection.

Each raw validation image gets one perturbation of the robustness suite (evaluate.robustness), in turn, before the
pipeline's preprocessing; with `train.selection: val_auc_robust` training keeps the epoch with the best minimum of
the clean and the perturbed validation AUC.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from chestct.evaluation.robustness import perturbed_split
from chestct.imaging.processed import load_split, save_processed
from chestct.params import load_params
from stages.errors import run_stage

RAW_DATA = Path("data/raw/Data")
MANIFEST = Path("data/split/manifest.csv")
VALID = Path("data/processed/valid")
OUT = Path("data/robust_valid")


def main() -> None:
    params = load_params()
    manifest = pd.read_csv(MANIFEST, keep_default_na=False)
    valid = load_split(VALID)
    train_ids = manifest.loc[manifest["split"] == "train", "id"].to_numpy()
    perturbed, names = perturbed_split(valid, RAW_DATA, train_ids, params)
    # save_processed validates the arrays as a split before it writes them.
    save_processed(OUT, {"valid": {"images": perturbed.images, "labels": valid.labels, "subtypes": valid.subtypes,
                                   "ids": valid.ids}}, params.preprocess.shard_images)
    print(f"robust_valid: {len(valid)} validation images, each under one of {len(set(names))} perturbations "
          f"({', '.join(sorted(set(names)))}) -> {OUT}")


if __name__ == "__main__":
    run_stage("robust_valid", main)
