"""download stage: fill data/raw/Data in the Kaggle layout from data.source (kaggle, local or synthetic)."""

from __future__ import annotations

from pathlib import Path

from chestct.data.sources import acquire_dataset
from chestct.params import load_params
from stages.errors import run_stage

RAW_DIR = Path("data/raw")


def main() -> None:
    params = load_params()
    summary = acquire_dataset(params.data, RAW_DIR)
    print(f"download: {summary['files']} files from {summary['origin']} -> {RAW_DIR / 'Data'}")


if __name__ == "__main__":
    run_stage("download", main)
