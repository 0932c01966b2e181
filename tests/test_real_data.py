"""The split stage on the real dataset (skipped unless CHESTCT_REAL_DATA points at it)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from chestct.data.duplicates import add_duplicate_columns
from chestct.data.records import scan_dataset
from chestct.data.report import data_summary
from chestct.data.splits import apply_dedup

REAL_DATA = os.environ.get("CHESTCT_REAL_DATA")
pytestmark = [
    pytest.mark.real_data,
    pytest.mark.skipif(not REAL_DATA, reason="set CHESTCT_REAL_DATA to the chest-ctscan-images folder"),
]


@pytest.fixture(scope="module")
def scanned():
    table, unreadable = scan_dataset(Path(REAL_DATA) / "Data", workers=2, progress=False)
    return table, unreadable


def test_split_counts_duplicates_and_leaks_on_the_real_data(scanned, default_params):
    table, unreadable = scanned
    table = add_duplicate_columns(table, default_params.split.near_duplicate_distance)
    final, dedup = apply_dedup(table, default_params.split, default_params.seed)
    summary = data_summary(table, final, unreadable, dedup, "local")
    splits = summary["splits"]
    assert (splits["train"]["total"], splits["train"]["normal"]) == (613, 148)
    assert (splits["valid"]["total"], splits["valid"]["normal"]) == (72, 13)
    assert (splits["test"]["total"], splits["test"]["normal"]) == (315, 54)
    assert summary["unique_sha256"] == 847
    assert summary["leaks"]["test"]["normal"] >= 46 and summary["leaks"]["valid"]["normal"] >= 10
    assert summary["cross_class_duplicates"] >= 1  # large.cell l4.png == squamous sq2.png
    assert summary["extension_mismatches"] == 4  # the train/normal n7*.png JPEGs
    assert summary["formats"] == {"JPEG/RGB": 16, "PNG/L": 3, "PNG/RGB": 58, "PNG/RGBA": 923}
    assert summary["unreadable"]["count"] == 0


def test_drop_leaks_on_the_real_data(scanned, default_params):
    table, _ = scanned
    table = add_duplicate_columns(table, default_params.split.near_duplicate_distance)
    params = default_params.split.model_copy(update={"dedup": "drop_leaks"})
    final, dedup = apply_dedup(table, params, default_params.seed)
    assert dedup["dropped"]["test"] >= 46 and dedup["dropped"]["valid"] >= 10
    assert not final.loc[final["split"] != "train", "dup_in_train"].any()
