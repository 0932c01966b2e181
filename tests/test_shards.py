"""Sharded processed splits: the round trip, bad folders, and the streaming training pipeline that reads them.

Shards hold one class each and at most `preprocess.shard_images` images; the index keeps manifest order. The
tf.data pipeline streams the shard files (never the whole split) and must give exactly balanced batches, the same
batches for the same seed, and, for a split that fits in one shard per class, exactly the batches the in-memory
pipeline gives.
"""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from chestct.imaging.processed import SplitArrays, SplitFileError, load_split, preprocess_manifest, save_processed
from chestct.imaging.shards import LAYOUT, ShardedSplitWriter, ShardError
from chestct.training.input_pipeline import training_dataset, validation_dataset

SIZE = 16
COUNT = 37  # 11 Normal, 26 Cancer


def make_split(count: int = COUNT, normals: int = 11, seed: int = 0, unstandardised: bool = True) -> dict:
    """Distinct random images with classes interleaved, as a manifest interleaves them."""
    rng = np.random.default_rng(seed)
    labels = np.ones(count, np.int64)
    labels[rng.choice(count, normals, replace=False)] = 0
    arrays = {"images": rng.integers(0, 256, (count, SIZE, SIZE, 1), dtype=np.uint8), "labels": labels,
              "subtypes": np.where(labels == 0, "normal", "squamous"), "ids": np.array([f"img{i:03d}.png"
                                                                                        for i in range(count)])}
    if unstandardised:
        arrays["unstandardised"] = rng.integers(0, 256, (count, SIZE, SIZE), dtype=np.uint8)
    return arrays


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    """(arrays, folder) with shards of at most 4 images: 3 Normal and 7 Cancer shards."""
    arrays = make_split()
    folder = tmp_path_factory.mktemp("processed") / "processed"
    save_processed(folder, {"train": arrays}, shard_images=4)
    return arrays, folder / "train"


def test_shard_round_trip_equals_the_arrays_in_manifest_order(written):
    arrays, folder = written
    split = load_split(folder)
    names = sorted(path.name for path in folder.glob("*.npy"))
    assert len([n for n in names if n.startswith("images-normal")]) == 3  # ceil(11 / 4)
    assert len([n for n in names if n.startswith("unstandardised-cancer")]) == 7  # ceil(26 / 4)
    assert [shard.count for shard in split.layout.shards_of(0)] == [4, 4, 3]
    np.testing.assert_array_equal(np.asarray(split.images), arrays["images"])
    np.testing.assert_array_equal(np.asarray(split.unstandardised), arrays["unstandardised"])
    assert split.ids.tolist() == arrays["ids"].tolist() and split.labels.tolist() == arrays["labels"].tolist()
    assert split.subtypes.tolist() == arrays["subtypes"].tolist()
    # Rows are read without loading the split: by index, list, mask, slice, and with an Ellipsis.
    np.testing.assert_array_equal(split.images[5], arrays["images"][5])
    np.testing.assert_array_equal(split.images[[30, 2, 17]], arrays["images"][[30, 2, 17]])
    normal = arrays["labels"] == 0
    np.testing.assert_array_equal(split.images[normal], arrays["images"][normal])
    np.testing.assert_array_equal(split.images[3:9], arrays["images"][3:9])
    np.testing.assert_array_equal(split.images[..., 0], arrays["images"][..., 0])
    assert split.images.shape == (COUNT, SIZE, SIZE, 1) and len(split) == COUNT and split.image_size == SIZE
    index = pd.read_csv(folder / "index.csv", keep_default_na=False)
    assert list(index.columns) == ["id", "label", "subtype", "shard", "offset"]
    assert (index.groupby("shard")["label"].nunique() == 1).all()  # every shard holds one class


def test_a_split_without_unstandardised_images_and_an_empty_split_round_trip(tmp_path):
    arrays = make_split(unstandardised=False)
    empty = {key: value[:0] for key, value in arrays.items()}
    save_processed(tmp_path / "p", {"train": arrays, "test": empty}, shard_images=1000)
    split = load_split(tmp_path / "p" / "train")
    assert split.unstandardised is None and len(split.layout.shards) == 2
    np.testing.assert_array_equal(np.asarray(split.images), arrays["images"])
    assert len(load_split(tmp_path / "p" / "test")) == 0


def test_a_missing_split_names_the_folder_and_the_fix(tmp_path):
    with pytest.raises(SplitFileError, match=r"valid.*dvc repro preprocess"):
        load_split(tmp_path / "valid")


def test_a_truncated_shard_is_named(written, tmp_path):
    arrays, _ = written
    save_processed(tmp_path / "p", {"train": arrays}, shard_images=4)
    shard = tmp_path / "p" / "train" / "images-cancer-00002.npy"
    shard.write_bytes(shard.read_bytes()[:-10])
    with pytest.raises(SplitFileError, match=r"images-cancer-00002\.npy.*dvc repro preprocess"):
        load_split(tmp_path / "p" / "train")


def test_an_index_that_disagrees_with_the_layout_is_refused(written, tmp_path):
    arrays, _ = written
    save_processed(tmp_path / "p", {"train": arrays}, shard_images=4)
    layout = json.loads((tmp_path / "p" / "train" / LAYOUT).read_text())
    layout["shards"][0]["count"] = 3
    (tmp_path / "p" / "train" / LAYOUT).write_text(json.dumps(layout))
    with pytest.raises(SplitFileError, match=r"normal-00000 holds 3 images but the index lists 4"):
        load_split(tmp_path / "p" / "train")


def test_the_writer_refuses_a_wrong_image_and_a_missing_row(tmp_path):
    rows = pd.DataFrame({"id": ["a", "b"], "label": [0, 1], "subtype": ["normal", "squamous"]})
    writer = ShardedSplitWriter(tmp_path / "w", rows, SIZE, ("images",), shard_images=8)
    with pytest.raises(ShardError, match=r"images of a is float64 \(16, 16, 1\), expected uint8"):
        writer.add({"images": np.zeros((SIZE, SIZE, 1))})
    writer.add({"images": np.zeros((SIZE, SIZE, 1), np.uint8)})
    with pytest.raises(ShardError, match=r"1 of 2 images were written"):
        writer.close()


def test_malformed_arrays_never_reach_the_folder(tmp_path):
    arrays = make_split()
    arrays["labels"] = arrays["labels"][:-1]
    with pytest.raises(SplitFileError, match="nothing was written"):
        save_processed(tmp_path / "p", {"train": arrays})
    assert not (tmp_path / "p").exists()


# --- preprocessing streams into shards ----------------------------------------------------------------------


def test_preprocessing_streams_every_image_into_its_split(tmp_path, original_params):
    import cv2

    rng = np.random.default_rng(3)
    data = tmp_path / "Data"
    rows = []
    for index in range(14):
        split, label = ("train", "valid", "test")[index % 3], index % 2
        path = data / f"{split}/{'normal' if label == 0 else 'squamous'}/{index}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(path), rng.integers(0, 256, (40, 30), dtype=np.uint8))
        rows.append({"id": str(path.relative_to(data)), "split": split, "label": label,
                     "subtype": "normal" if label == 0 else "squamous"})
    manifest = pd.DataFrame(rows)
    params = original_params.preprocess.model_copy(update={"image_size": SIZE, "workers": 2, "shard_images": 2})
    report = preprocess_manifest(manifest, data, params, tmp_path / "processed", progress=False)
    assert report == {"crop": {"mode": "none"}}
    from chestct.imaging.preprocess import preprocess_image

    for split in ("train", "valid", "test"):
        loaded = load_split(tmp_path / "processed" / split)
        expected = manifest[manifest["split"] == split]
        assert loaded.ids.tolist() == expected["id"].tolist()
        for row, image_id in enumerate(loaded.ids):
            np.testing.assert_array_equal(loaded.images[row], preprocess_image((data / image_id).read_bytes(), params))


# --- streaming ----------------------------------------------------------------------------------------------


def _params(params, **changes):
    augment = params.augment.model_copy(update={
        "mixup": params.augment.mixup.model_copy(update={"probability": 0.0})})
    train = params.train.model_copy(update={"batch_size": 8, "steps_per_epoch": 6} | changes)
    return augment, train


def _no_augment(params):
    from tests.test_input_pipeline import augment_params

    return augment_params(params.augment, 0.0, mixup=0.0)


def test_streamed_batches_are_exactly_half_and_half_from_many_shards(written, original_params):
    arrays, folder = written
    split = load_split(folder)
    _, train = _params(original_params, shuffle_buffer=3)
    seen = set()
    for images, labels in training_dataset(split, _no_augment(original_params), train, seed=4):
        assert labels.numpy().sum() == 4  # 4 Cancer of 8
        for image in images.numpy().astype(np.uint8):
            row = np.flatnonzero((arrays["images"] == image).all(axis=(1, 2, 3)))
            assert len(row) == 1  # every batch image is one of the split's images, untouched
            seen.add(int(row[0]))
    assert len({r for r in seen if arrays["labels"][r] == 0}) >= 8  # a small buffer still mixes the shards


def test_streaming_is_deterministic_and_the_seed_matters(written, original_params):
    _, folder = written
    split = load_split(folder)
    _, train = _params(original_params, shuffle_buffer=5)
    augment = _no_augment(original_params)

    def epochs(seed):
        dataset = training_dataset(split, augment, train, seed=seed)
        return [np.concatenate([images.numpy() for images, _ in dataset]) for _ in range(2)]

    first, again, other = epochs(7), epochs(7), epochs(8)
    np.testing.assert_array_equal(first[0], again[0])
    assert not np.array_equal(first[0], first[1])  # a new epoch draws new batches
    assert not np.array_equal(first[0], other[0])


def test_a_split_in_one_shard_per_class_streams_the_in_memory_batches(tmp_path, original_params):
    arrays = make_split()
    save_processed(tmp_path / "p", {"train": arrays}, shard_images=1000)
    on_disk = load_split(tmp_path / "p" / "train")
    in_memory = SplitArrays(**{key: arrays[key] for key in ("images", "labels", "subtypes", "ids")})
    augment, train = _params(original_params)
    for streamed, held in zip(training_dataset(on_disk, augment, train, seed=1),
                              training_dataset(in_memory, augment, train, seed=1), strict=True):
        np.testing.assert_array_equal(streamed[0].numpy(), held[0].numpy())
        np.testing.assert_array_equal(streamed[1].numpy(), held[1].numpy())


def test_streamed_validation_reads_every_image_once_with_its_label(written):
    arrays, folder = written
    batches = list(validation_dataset(load_split(folder), batch_size=5))
    images = np.concatenate([b[0].numpy() for b in batches]).astype(np.uint8)
    labels = np.concatenate([b[1].numpy() for b in batches]).ravel()
    assert len(images) == COUNT
    for image, label in zip(images, labels, strict=True):
        row = np.flatnonzero((arrays["images"] == image).all(axis=(1, 2, 3)))
        assert len(row) == 1 and arrays["labels"][row[0]] == label


def test_streaming_agrees_with_itself_under_op_determinism(written, original_params):
    """Training turns op determinism on: the shard reads, interleave and shuffles must run under it, unchanged."""
    import tensorflow as tf
    from tensorflow.python.framework import config as tf_config

    _, folder = written
    split = load_split(folder)
    augment, train = _params(original_params, shuffle_buffer=5)  # params.yaml's augmentation, MixUp off

    def first_epoch():
        return np.concatenate([images.numpy() for images, _ in training_dataset(split, augment, train, seed=11)])

    expected = first_epoch()
    was_enabled = tf_config.is_op_determinism_enabled()
    tf.config.experimental.enable_op_determinism()
    try:
        under_determinism = first_epoch()
    finally:
        if not was_enabled:
            tf_config.disable_op_determinism()
    np.testing.assert_allclose(under_determinism, expected, atol=1e-3)
