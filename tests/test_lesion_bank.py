"""The nodule bank reader on small generated banks in the LIDC-IDRI-slices layout, and every malformed case."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from chestct.training.lesion_bank import LesionBankError, bank_digest, consensus, read_nodule_bank


def _disc(size: int, centre: tuple[int, int], radius: int) -> np.ndarray:
    mask = np.zeros((size, size), np.uint8)
    cv2.circle(mask, centre, radius, 255, -1)
    return mask


def make_bank(root: Path, nodules: int = 3, size: int = 32, readers: int = 3, index: bool = True) -> Path:
    """A bank of `nodules` crops, each outlined by `readers` readers whose discs overlap but differ a little."""
    rows = []
    for number in range(nodules):
        folder = root / "LIDC-IDRI-slices" / f"LIDC-IDRI-{number:04d}" / "nodule-0"
        (folder / "images").mkdir(parents=True)
        crop = np.full((size, size), 60, np.uint8)
        cv2.circle(crop, (size // 2, size // 2), size // 4, 170, -1)
        cv2.imwrite(str(folder / "images" / "slice-1.png"), crop)
        for reader in range(readers):
            (folder / f"mask-{reader}").mkdir()
            cv2.imwrite(str(folder / f"mask-{reader}" / "slice-1.png"),
                        _disc(size, (size // 2 + reader - 1, size // 2), size // 4))
        rows.append(f"LIDC-IDRI-{number:04d}/nodule-0/images/slice-1.png,{int(np.pi * (size // 4) ** 2)}")
    if index:
        (root / "nodules.csv").write_text("image,consensus_area_px\n" + "\n".join(rows) + "\n")
    return root


def test_a_bank_reads_every_listed_nodule_with_its_consensus_outline(tmp_path):
    bank = read_nodule_bank(make_bank(tmp_path))
    assert [nodule.name for nodule in bank] == [f"LIDC-IDRI-{n:04d}/nodule-0/slice-1" for n in range(3)]
    for nodule in bank:
        assert nodule.crop.shape == nodule.outline.shape == (32, 32)
        assert nodule.outline[16, 16] and not nodule.outline[0, 0]
        # The consensus is what two of three readers drew: never wider than their union, never empty.
        assert 0 < nodule.outline.sum() <= (nodule.crop > 100).sum() + 40
    assert bank_digest(bank) == bank_digest(read_nodule_bank(tmp_path))


def test_without_an_index_every_crop_under_the_slices_folder_is_read(tmp_path):
    assert len(read_nodule_bank(make_bank(tmp_path, nodules=2, index=False))) == 2


def test_consensus_is_two_readers_or_the_only_one():
    a, b, c = (np.zeros((4, 4), bool) for _ in range(3))
    a[0, :3] = True
    b[0, 1:] = True
    assert consensus([a, b, c]).tolist()[0] == [False, True, True, False]  # c drew nothing: two of a and b
    assert consensus([a, c]).tolist()[0] == [True, True, True, False]  # one reader drew: that reader's outline


@pytest.mark.parametrize("breakage, named", [
    ("missing_masks", "nodule-0"),
    ("empty_consensus", "nodule-0"),
    ("wrong_size", "mask-0"),
    ("missing_crop", "slice-1.png"),
    ("unreadable_crop", "slice-1.png"),
])
def test_a_malformed_nodule_stops_the_reading_naming_its_folder(tmp_path, breakage, named):
    make_bank(tmp_path, nodules=2)
    folder = tmp_path / "LIDC-IDRI-slices" / "LIDC-IDRI-0001" / "nodule-0"
    if breakage == "missing_masks":
        for reader in range(3):
            (folder / f"mask-{reader}" / "slice-1.png").unlink()
    elif breakage == "empty_consensus":
        for reader in range(3):
            cv2.imwrite(str(folder / f"mask-{reader}" / "slice-1.png"), np.zeros((32, 32), np.uint8))
    elif breakage == "wrong_size":
        cv2.imwrite(str(folder / "mask-0" / "slice-1.png"), np.zeros((16, 16), np.uint8))
    elif breakage == "missing_crop":
        (folder / "images" / "slice-1.png").unlink()
    else:
        (folder / "images" / "slice-1.png").write_bytes(b"not a png")
    with pytest.raises(LesionBankError, match="LIDC-IDRI-0001") as error:
        read_nodule_bank(tmp_path)
    assert named in str(error.value)


def test_a_missing_bank_or_layout_says_how_to_go_on(tmp_path):
    with pytest.raises(LesionBankError, match="bank_path .*bank_rate: 0"):
        read_nodule_bank(tmp_path / "nowhere")
    with pytest.raises(LesionBankError, match="LIDC-IDRI-slices"):
        read_nodule_bank(tmp_path)
    (tmp_path / "LIDC-IDRI-slices").mkdir()
    (tmp_path / "nodules.csv").write_text("path\nx.png\n")
    with pytest.raises(LesionBankError, match="'image' column"):
        read_nodule_bank(tmp_path)
