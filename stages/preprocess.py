"""preprocess stage: every manifest image through THE preprocessing (crop, CLAHE, resize, standardise), into
class-pure .npy shards with an index per split (chestct.imaging.shards)."""

from __future__ import annotations

import time
from pathlib import Path

import pandas as pd

from chestct.atomic_io import write_json
from chestct.imaging.processed import preprocess_manifest
from chestct.params import load_params
from stages.errors import run_stage

DATA_FOLDER = Path("data/raw/Data")
MANIFEST = Path("data/split/manifest.csv")
PROCESSED = Path("data/processed")
METRICS = Path("metrics/preprocess.json")


def main() -> None:
    params = load_params()
    manifest = pd.read_csv(MANIFEST, keep_default_na=False)
    started = time.perf_counter()
    report = preprocess_manifest(manifest, DATA_FOLDER, params.preprocess, PROCESSED)
    write_json(METRICS, report)
    seconds = time.perf_counter() - started
    shapes = ", ".join(f"{split} {count}" for split, count in manifest["split"].value_counts(sort=False).items())
    crop = report["crop"]
    if crop["mode"] != "none":
        fallbacks = {split: {k: v for k, v in counts.items() if k != "lungs" and v} for split, counts in crop.items()
                     if split != "mode"}
        print(f"preprocess: crop to {crop['mode']}; boxes not from the {crop['mode']}: {fallbacks}")
    print(f"preprocess: {shapes} images at {params.preprocess.image_size} px in {seconds:.1f} s "
          f"({len(manifest) / max(seconds, 1e-9):.0f} img/s, {params.preprocess.workers} workers) -> {PROCESSED} "
          f"(shards of at most {params.preprocess.shard_images} images)")


if __name__ == "__main__":
    run_stage("preprocess", main)
