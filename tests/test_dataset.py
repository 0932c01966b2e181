"""Labels from folder names, hashing, duplicate groups, leak flags and the three dedup modes."""

from __future__ import annotations

import hashlib
import shutil

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from chestct.data.duplicates import add_duplicate_columns, add_leak_columns, near_groups
from chestct.data.records import scan_dataset
from chestct.data.splits import apply_dedup
from chestct.labels import UnknownClassFolderError, label_of_subtype, subtype_of_folder
from tests.conftest import make_kaggle_layout, save_image, textured_image


@pytest.mark.parametrize(
    ("folder", "subtype", "label"),
    [
        ("normal", "normal", 0),
        ("adenocarcinoma_left.lower.lobe_T2_N0_M0_Ib", "adenocarcinoma", 1),
        ("adenocarcinoma", "adenocarcinoma", 1),
        ("large.cell.carcinoma_left.hilum_T2_N2_M0_IIIa", "large.cell.carcinoma", 1),
        ("large.cell.carcinoma", "large.cell.carcinoma", 1),
        ("squamous.cell.carcinoma_left.hilum_T1_N2_M0_IIIa", "squamous.cell.carcinoma", 1),
        ("squamous.cell.carcinoma", "squamous.cell.carcinoma", 1),
    ],
)
def test_labels_by_folder_prefix(folder, subtype, label):
    assert subtype_of_folder(folder) == subtype
    assert label_of_subtype(subtype) == label


def test_unknown_folder_is_named():
    with pytest.raises(UnknownClassFolderError, match="'benign'"):
        subtype_of_folder("benign")
    with pytest.raises(UnknownClassFolderError):
        subtype_of_folder("normally")  # a prefix must end at the name or at '_'


@pytest.fixture()
def leaky_layout(tmp_path):
    """3 images per class and split, plus: an exact copy of a train normal in test and in valid, a re-encoded
    (near) copy of a train cancer image in test, and one train file duplicated across two cancer folders."""
    data = make_kaggle_layout(tmp_path, per_class=3)
    train_normal = data / "train/normal/000000.png"
    shutil.copyfile(train_normal, data / "test/normal/10 - Copy.png")
    shutil.copyfile(train_normal, data / "valid/normal/10 - Copy.png")
    adeno = data / "train/adenocarcinoma_left.lower.lobe_T2_N0_M0_Ib/000001.png"
    near = np.clip(np.asarray(Image.open(adeno)).astype(int) + 2, 0, 255).astype(np.uint8)  # re-encoded, brighter
    save_image(data / "test/adenocarcinoma/near.jpg", near, "JPEG", "RGB")
    shutil.copyfile(adeno, data / "train/squamous.cell.carcinoma_left.hilum_T1_N2_M0_IIIa/sq2.png")
    return data


def test_scan_records_hashes_and_formats(leaky_layout):
    table, unreadable = scan_dataset(leaky_layout, workers=2, progress=False)
    assert unreadable == []
    assert len(table) == 3 * 4 * 3 + 4
    row = table.set_index("id").loc["test/normal/10 - Copy.png"]
    assert row["sha256"] == hashlib.sha256((leaky_layout / row.name).read_bytes()).hexdigest()
    assert (row["split"], row["subtype"], row["label"], row["format"]) == ("test", "normal", 0, "PNG")
    jpeg = table.set_index("id").loc["test/adenocarcinoma/near.jpg"]
    assert jpeg["format"] == "JPEG" and jpeg["mode"] == "RGB" and bool(jpeg["extension_matches"])
    assert (row["width"], row["height"]) == (128, 96)


def test_duplicate_groups_and_leaks(leaky_layout):
    table, _ = scan_dataset(leaky_layout, workers=1, progress=False)
    table = add_leak_columns(add_duplicate_columns(table, max_distance=4)).set_index("id")
    original = table.loc["train/normal/000000.png"]
    assert table.loc["test/normal/10 - Copy.png", "exact_group"] == original["exact_group"]
    assert original["exact_group_size"] == 3
    near = table.loc["test/adenocarcinoma/near.jpg"]
    assert near["exact_group_size"] == 1 and near["near_group_size"] == 3  # adeno original + its sq2 copy
    assert bool(near["dup_in_train"]) and bool(table.loc["valid/normal/10 - Copy.png", "dup_in_train"])
    assert bool(table.loc["test/normal/10 - Copy.png", "dup_in_valid"])
    assert not table.loc["test/normal/000001.png", ["dup_in_train", "dup_in_valid"]].any()
    # An image is not its own duplicate: an original train image with no copy elsewhere in train.
    assert not bool(table.loc["train/normal/000001.png", "dup_in_train"])


def test_near_groups_chain_by_hamming_distance():
    hashes = pd.Series(["0000000000000000", "0000000000000003", "000000000000000f", "ffffffffffffffff"])
    assert list(near_groups(hashes, 0)) == [0, 1, 2, 3]
    assert list(near_groups(hashes, 2)) == [0, 0, 0, 1]  # 0-3 (2 bits) and 3-f (2 bits) chain together


def _scanned(layout):
    table, _ = scan_dataset(layout, workers=1, progress=False)
    return add_duplicate_columns(table, max_distance=4)


def test_dedup_keep_reports_but_keeps(leaky_layout, default_params):
    table = _scanned(leaky_layout)
    final, info = apply_dedup(table, default_params.split, seed=1)
    assert len(final) == len(table) and info == {"mode": "keep", "dropped": {"valid": 0, "test": 0}, "moved": 0}
    assert int(final["dup_in_train"][final["split"] == "test"].sum()) == 2


def test_dedup_drop_leaks_removes_exactly_the_leaks(leaky_layout, default_params):
    table = _scanned(leaky_layout)
    params = default_params.split.model_copy(update={"dedup": "drop_leaks"})
    final, info = apply_dedup(table, params, seed=1)
    assert info["dropped"] == {"valid": 1, "test": 2}
    assert len(final) == len(table) - 3
    assert not final.loc[final["split"] != "train", "dup_in_train"].any()
    assert (final["split"] == "train").sum() == (table["split"] == "train").sum()


def test_dedup_regroup_keeps_groups_together_and_stratifies(tmp_path, default_params):
    data = make_kaggle_layout(tmp_path, per_class=8)
    for index in range(4):  # copies spread over splits must end up together
        source = data / f"train/normal/{index:06d}.png"
        shutil.copyfile(source, data / f"test/normal/copy{index}.png")
        shutil.copyfile(source, data / f"valid/normal/copy{index}.png")
    table = _scanned(data)
    params = default_params.split.model_copy(update={"dedup": "regroup"})
    final, info = apply_dedup(table, params, seed=3)
    assert len(final) == len(table) and info["moved"] > 0
    assert final.groupby("near_group")["split"].nunique().max() == 1
    assert not final[["dup_in_train", "dup_in_valid"]][final["split"] != "train"].any().any()
    shares = final["split"].value_counts(normalize=True)
    assert abs(shares["train"] - 0.7) < 0.12 and abs(shares["test"] - 0.2) < 0.12 and shares["valid"] > 0.03
    for split in ("train", "valid", "test"):
        assert set(final.loc[final["split"] == split, "subtype"]) == {
            "normal", "adenocarcinoma", "large.cell.carcinoma", "squamous.cell.carcinoma"}
    again, _ = apply_dedup(table, params, seed=3)
    assert list(again["split"]) == list(final["split"])


def test_unreadable_images_are_listed_not_dropped(tmp_path):
    data = make_kaggle_layout(tmp_path, per_class=1)
    (data / "train/normal/empty.png").write_bytes(b"")
    (data / "test/normal/notes.png").write_text("not an image")
    good = (data / "valid/normal/000000.png").read_bytes()
    (data / "valid/normal/cut.png").write_bytes(good[: len(good) // 2])
    table, unreadable = scan_dataset(data, workers=2, progress=False)
    reasons = {u.id: u.reason for u in unreadable}
    assert set(reasons) == {"train/normal/empty.png", "test/normal/notes.png", "valid/normal/cut.png"}
    assert "empty" in reasons["train/normal/empty.png"]
    assert "not a recognised image" in reasons["test/normal/notes.png"]
    assert len(table) == 12


def test_unknown_class_folder_stops_the_scan(tmp_path):
    data = make_kaggle_layout(tmp_path, per_class=1)
    save_image(data / "train/benign/x.png", textured_image(1))
    with pytest.raises(UnknownClassFolderError, match="benign"):
        scan_dataset(data, workers=1, progress=False)
