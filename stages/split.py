"""split stage: manifest of every image (label, hashes, duplicate groups, final split) and the data report."""

from __future__ import annotations

from pathlib import Path

from chestct.atomic_io import atomic_path, write_json
from chestct.data.duplicates import add_duplicate_columns
from chestct.data.records import DatasetError, scan_dataset
from chestct.data.report import data_summary, save_montage, save_size_histogram
from chestct.data.splits import apply_dedup
from chestct.params import load_params
from stages.errors import run_stage

DATA_FOLDER = Path("data/raw/Data")
MANIFEST = Path("data/split/manifest.csv")
DATA_METRICS = Path("metrics/data.json")
PLOTS = Path("plots/data")


def main() -> None:
    params = load_params()
    scanned, unreadable = scan_dataset(DATA_FOLDER, workers=params.preprocess.workers)
    if unreadable and params.split.on_unreadable == "fail":
        listing = "\n  ".join(f"{u.reason}" for u in unreadable[:10])
        more = f"\n  ... and {len(unreadable) - 10} more" if len(unreadable) > 10 else ""
        raise DatasetError(
            f"{len(unreadable)} unreadable image(s) under {DATA_FOLDER}:\n  {listing}{more}\n"
            "Remove or replace them, or set `split.on_unreadable: skip` to leave them out (they are then "
            "counted in metrics/data.json)."
        )
    scanned = add_duplicate_columns(scanned, params.split.near_duplicate_distance)
    final, dedup = apply_dedup(scanned, params.split, params.seed)
    summary = data_summary(scanned, final, unreadable, dedup, params.data.source)

    with atomic_path(MANIFEST) as temp:
        final.to_csv(temp, index=False)
    write_json(DATA_METRICS, summary)
    save_montage(final, DATA_FOLDER, PLOTS / "samples.png", seed=params.seed)
    save_size_histogram(final, PLOTS / "sizes.png")

    counts = ", ".join(f"{s} {c['total']} ({c['normal']} normal)" for s, c in summary["splits"].items())
    print(f"split: {counts}; {summary['unique_sha256']} unique files; "
          f"leaks test normal {summary['leaks']['test']['normal']}, valid normal {summary['leaks']['valid']['normal']}"
          f"; unreadable {len(unreadable)}")


if __name__ == "__main__":
    run_stage("split", main)
