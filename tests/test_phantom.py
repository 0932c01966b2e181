"""The synthetic chest CT phantoms: Kaggle layout, determinism, the real data's quirks, no intensity shortcut."""

from __future__ import annotations

import hashlib
from collections import Counter
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image
from sklearn.metrics import roc_auc_score

import chestct.data.phantoms as phantom
from chestct.data.phantoms import generate_phantom_dataset, render_phantom
from chestct.labels import CANCER_SUBTYPES, FOLDER_NAMES_BY_SPLIT, SPLITS
from chestct.params import SyntheticParams

MIN_SIZE, MAX_SIZE = 96, 200
COUNTS = {"normal": {"train": 12, "valid": 8, "test": 10}, "cancer": {"train": 12, "valid": 8, "test": 10}}


def make_params(seed: int = 3, duplicates: int = 3, normal: dict | None = None, cancer: dict | None = None):
    return SyntheticParams(
        seed=seed,
        normal=normal or COUNTS["normal"],
        cancer=cancer or COUNTS["cancer"],
        min_size=MIN_SIZE,
        max_size=MAX_SIZE,
        duplicates=duplicates,
    )


def files_of(data: Path) -> dict[str, Path]:
    """Every file under Data/, keyed by its 'split/folder/name' path."""
    return {path.relative_to(data).as_posix(): path for path in sorted(data.rglob("*")) if path.is_file()}


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
    root = tmp_path_factory.mktemp("phantoms")
    summary = generate_phantom_dataset(root, make_params(), progress=False)
    return root, summary


# --- layout -----------------------------------------------------------------------------------------------


def test_every_split_has_the_four_class_folders_with_exact_counts(generated):
    root, summary = generated
    for split in SPLITS:
        folders = {path.name: len(list(path.iterdir())) for path in (root / "Data" / split).iterdir()}
        names = FOLDER_NAMES_BY_SPLIT[split]
        assert set(folders) == set(names.values())
        assert folders[names["normal"]] == COUNTS["normal"][split]
        cancer = [folders[names[subtype]] for subtype in CANCER_SUBTYPES]
        assert sum(cancer) == COUNTS["cancer"][split]
        assert max(cancer) - min(cancer) <= 1  # spread evenly over the three subtypes
        assert summary["counts"][split] == folders
    assert set((root / "Data").iterdir()) == {root / "Data" / split for split in SPLITS}


def test_test_split_uses_short_folder_names_and_train_long_ones(generated):
    root, _ = generated
    assert (root / "Data/test/large.cell.carcinoma").is_dir()
    assert (root / "Data/train/large.cell.carcinoma_left.hilum_T2_N2_M0_IIIa").is_dir()
    assert (root / "Data/valid/squamous.cell.carcinoma_left.hilum_T1_N2_M0_IIIa").is_dir()


# --- determinism ------------------------------------------------------------------------------------------


def test_same_seed_gives_byte_identical_files_and_another_seed_differs(generated, tmp_path, capsys):
    root, _ = generated
    reference = {name: sha256(path) for name, path in files_of(root / "Data").items()}

    generate_phantom_dataset(tmp_path / "again", make_params(), progress=True)
    again = {name: sha256(path) for name, path in files_of(tmp_path / "again" / "Data").items()}
    assert again == reference
    assert "generating phantoms" in capsys.readouterr().err

    generate_phantom_dataset(tmp_path / "other", make_params(seed=4), progress=False)
    other = {sha256(path) for path in files_of(tmp_path / "other" / "Data").values()}
    assert not other & set(reference.values())


def test_render_phantom_is_a_deterministic_uint8_image():
    image = render_phantom(np.random.default_rng(5), (120, 170), 2)
    assert image.dtype == np.uint8 and image.shape == (120, 170)
    assert np.array_equal(image, render_phantom(np.random.default_rng(5), (120, 170), 2))
    assert not np.array_equal(image, render_phantom(np.random.default_rng(6), (120, 170), 2))
    assert image.std() > 20  # an actual picture, not a flat field


@pytest.mark.parametrize(("size", "lesions"), [((16, 100), 0), ((100, 100), -1)])
def test_render_phantom_rejects_bad_arguments(size, lesions):
    with pytest.raises(ValueError):
        render_phantom(np.random.default_rng(0), size, lesions)


# --- the real data's quirks -------------------------------------------------------------------------------


def test_storage_formats_are_mixed_like_the_real_dataset(generated):
    root, summary = generated
    kinds: dict[str, set[tuple[str, str, str]]] = {split: set() for split in SPLITS}
    for name, path in files_of(root / "Data").items():
        with Image.open(path) as image:
            kinds[name.split("/")[0]].add((image.format, image.mode, path.suffix))
            assert min(image.size) >= MIN_SIZE and max(image.size) <= MAX_SIZE, name
            if image.mode == "RGBA":
                assert image.getextrema()[3] == (255, 255), f"{name}: alpha must be opaque"
    for split, found in kinds.items():
        formats = {(fmt, mode) for fmt, mode, _ in found}
        assert {("PNG", "RGBA"), ("PNG", "RGB"), ("PNG", "L")} <= formats, split
        assert ("JPEG", "RGB", ".jpg") in found, split
    jpeg_named_png = summary["quirk_files"]["jpeg_named_png"]
    assert jpeg_named_png and all(path.startswith("Data/train/normal/") for path in jpeg_named_png)
    for path in jpeg_named_png:
        with Image.open(root / path) as image:
            assert image.format == "JPEG" and path.endswith(".png")


def test_file_names_look_like_the_real_ones(generated):
    root, summary = generated
    names = files_of(root / "Data")
    assert any(" - Copy" in name for name in names)
    assert all(Path(name).name in {Path(p).name for p in names} for name in summary["quirk_files"]["copy_named"])
    cancer = [Path(name).stem for name in names if "/normal/" not in name]
    assert all(stem[:6].isdigit() for stem in cancer)  # '000123 (4)'
    assert any(stem.endswith(")") for stem in cancer)


def test_duplicates_copy_train_images_into_test_normal(generated):
    root, summary = generated
    train_hashes = {sha256(path) for name, path in files_of(root / "Data").items() if name.startswith("train/")}
    copies = [name for name, path in files_of(root / "Data").items()
              if not name.startswith("train/") and sha256(path) in train_hashes]
    assert len(copies) == summary["duplicates"] == 3
    assert all(name.startswith("test/normal/") for name in copies)
    assert sorted(summary["quirk_files"]["duplicate"]) == sorted(f"Data/{name}" for name in copies)
    all_hashes = [sha256(path) for path in files_of(root / "Data").values()]
    assert len(set(all_hashes)) == len(all_hashes) - 3  # no other file repeats


def test_duplicates_spill_into_valid_when_test_normal_is_full(tmp_path):
    small = {"train": 4, "valid": 2, "test": 2}
    summary = generate_phantom_dataset(tmp_path, make_params(duplicates=3, normal=small, cancer=small), False)
    leaked = Counter(path.split("/")[1] + "/" + path.split("/")[2] for path in summary["quirk_files"]["duplicate"])
    assert leaked == {"test/normal": 2, "valid/normal": 1}
    assert summary["counts"]["test"]["normal"] == 2 and summary["counts"]["valid"]["normal"] == 2


def test_too_many_duplicates_fail_before_writing_anything(tmp_path):
    small = {"train": 2, "valid": 1, "test": 1}
    with pytest.raises(ValueError, match="duplicates"):
        generate_phantom_dataset(tmp_path, make_params(duplicates=50, normal=small, cancer=small), False)
    assert list(tmp_path.iterdir()) == []


# --- no shortcut, visible lesions -------------------------------------------------------------------------


def test_global_intensity_does_not_separate_the_classes():
    means, stds, labels = [], [], []
    for i in range(300):
        rng = np.random.default_rng([11, i])
        label = i % 2
        image = render_phantom(rng, (104, 128), int(rng.integers(1, 4)) if label else 0)
        means.append(image.mean())
        stds.append(image.std())
        labels.append(label)
    assert 0.3 <= roc_auc_score(labels, means) <= 0.7
    assert 0.3 <= roc_auc_score(labels, stds) <= 0.7


def lung_mask(seed: int, size: tuple[int, int]) -> np.ndarray:
    """The renderer's own lung mask for this rng state: render_phantom draws the anatomy from the rng first."""
    return phantom._render_anatomy(np.random.default_rng(seed), *size).lung.astype(bool)


def test_lesions_change_only_pixels_inside_a_lung():
    for seed in range(24):  # enough seeds that some lesions sit against the lung edge
        size = (100 + 5 * seed, 130 + 3 * seed)
        normal = render_phantom(np.random.default_rng(seed), size, 0)
        cancer = render_phantom(np.random.default_rng(seed), size, 1 + seed % 3)
        lungs = lung_mask(seed, size)
        otsu, _ = cv2.threshold(normal, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
        assert 0.05 < lungs.mean() < 0.5 and np.median(normal[lungs]) < otsu, seed  # the mask is the dark lungs
        changed = normal != cancer
        assert changed.sum() > 0, seed
        assert not (changed & ~lungs).any(), f"seed {seed}: a lesion leaked out of the lungs"
        assert cancer[changed].astype(float).mean() > normal[changed].astype(float).mean() + 20, seed  # a bright mass


# --- all or nothing ---------------------------------------------------------------------------------------


def test_success_leaves_only_data_behind(generated):
    root, summary = generated
    assert [path.name for path in root.iterdir()] == ["Data"]
    assert summary["root"] == str(root / "Data")


def test_existing_data_folder_is_refused_and_left_alone(tmp_path):
    (tmp_path / "Data").mkdir()
    (tmp_path / "Data" / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="Data"):
        generate_phantom_dataset(tmp_path, make_params(), progress=False)
    assert [path.name for path in tmp_path.iterdir()] == ["Data"]
    assert (tmp_path / "Data" / "keep.txt").read_text() == "mine"


def test_a_failure_midway_leaves_nothing_behind(tmp_path, monkeypatch):
    calls = []

    def failing_render(rng, size, lesions):
        calls.append(size)
        if len(calls) > 5:
            raise RuntimeError("disk full")
        return np.zeros(size, np.uint8)

    monkeypatch.setattr(phantom, "render_phantom", failing_render)
    with pytest.raises(RuntimeError, match="disk full"):
        generate_phantom_dataset(tmp_path, make_params(), progress=False)
    assert list(tmp_path.iterdir()) == []
