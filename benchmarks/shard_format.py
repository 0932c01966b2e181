"""Which shard format to stream: .npy files (what preprocess writes) or TFRecord, measured on the same images.

    python -m benchmarks.shard_format [--images 4096] [--px 256] [--shard-images 1024] [--repeats 3]

Writes `--images` random uint8 images both ways, in shards of `--shard-images` (npy: the project's writer,
class-pure shards with an index; TFRecord: one tf.train.Example per image holding its raw bytes and label), then
times tf.data reading every image once, 4 shards interleaved, batched by 16, without augmentation: for npy the
training pipeline's own reader (`chestct.training.input_pipeline._stream`), for TFRecord `TFRecordDataset` +
`parse_single_example` + `decode_raw`. Also random access: reading 256 rows by index, which evaluation and the
audits do (npy: a memory map; TFRecord has none, so it scans). Prints write time, disk size and read speed.

Last, whether streaming costs a small dataset anything: the whole training pipeline (params.yaml's balanced
batches and augmentation) fed from the arrays in memory (how it worked before sharding) and streamed from the
npy shards, on the first `--small` images.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np


def _write_npy(folder: Path, images: np.ndarray, labels: np.ndarray, shard_images: int) -> None:
    from chestct.imaging.processed import save_processed

    count = len(images)
    save_processed(folder, {"train": {"images": images, "labels": labels, "subtypes": np.array(["x"] * count),
                                      "ids": np.array([f"{i}.png" for i in range(count)])}}, shard_images)


def _write_tfrecord(folder: Path, images: np.ndarray, labels: np.ndarray, shard_images: int) -> list[str]:
    import tensorflow as tf

    folder.mkdir(parents=True)
    paths = []
    for number, start in enumerate(range(0, len(images), shard_images)):
        path = str(folder / f"train-{number:05d}.tfrecord")
        with tf.io.TFRecordWriter(path) as writer:
            for image, label in zip(images[start:start + shard_images], labels[start:start + shard_images],
                                    strict=True):
                feature = {"image": tf.train.Feature(bytes_list=tf.train.BytesList(value=[image.tobytes()])),
                           "label": tf.train.Feature(int64_list=tf.train.Int64List(value=[int(label)]))}
                writer.write(tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString())
        paths.append(path)
    return paths


def _tfrecord_dataset(paths: list[str], px: int):
    import tensorflow as tf

    spec = {"image": tf.io.FixedLenFeature([], tf.string), "label": tf.io.FixedLenFeature([], tf.int64)}

    def parse(record):
        example = tf.io.parse_single_example(record, spec)
        return tf.reshape(tf.io.decode_raw(example["image"], tf.uint8), [px, px, 1]), example["label"]

    files = tf.data.Dataset.from_tensor_slices(paths)
    return files.interleave(tf.data.TFRecordDataset, cycle_length=4, num_parallel_calls=tf.data.AUTOTUNE,
                            deterministic=True).map(parse, num_parallel_calls=tf.data.AUTOTUNE)


def _images_per_second(dataset, repeats: int) -> float:
    best = 0.0
    for _ in range(repeats):
        started, count = time.perf_counter(), 0
        for images, _ in dataset.batch(16).prefetch(4):
            count += int(images.shape[0])
        best = max(best, count / (time.perf_counter() - started))
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=4096)
    parser.add_argument("--px", type=int, default=256)
    parser.add_argument("--shard-images", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--small", type=int, default=1000)
    args = parser.parse_args()

    from chestct.imaging.processed import load_split
    from chestct.training.input_pipeline import _stream

    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (args.images, args.px, args.px, 1), dtype=np.uint8)
    labels = np.arange(args.images) % 2
    root = Path(tempfile.mkdtemp(prefix="chestct-shard-format-"))
    try:
        started = time.perf_counter()
        _write_npy(root / "npy", images, labels, args.shard_images)
        npy_write = time.perf_counter() - started
        started = time.perf_counter()
        paths = _write_tfrecord(root / "tfrecord", images, labels, args.shard_images)
        tfrecord_write = time.perf_counter() - started
        split = load_split(root / "npy" / "train")
        npy_read = _images_per_second(_stream(split, "images", None, seed=0, shuffle_shards=False), args.repeats)
        tfrecord_read = _images_per_second(_tfrecord_dataset(paths, args.px), args.repeats)
        rows = rng.choice(args.images, 256, replace=False)
        started = time.perf_counter()
        np.testing.assert_array_equal(split.images[rows], images[rows])
        npy_random = 256 / (time.perf_counter() - started)
        sizes = {name: sum(p.stat().st_size for p in (root / name).rglob("*") if p.is_file())
                 for name in ("npy", "tfrecord")}
        _write_npy(root / "small", images[:args.small], labels[:args.small], args.shard_images)
        streamed, held = _training_speeds(load_split(root / "small" / "train"), args.repeats)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(f"{args.images} images at {args.px} px, shards of {args.shard_images}; best of {args.repeats} reads")
    print("| format | write | on disk | tf.data read, img/s | 256 rows by index, img/s |")
    print("|---|---|---|---|---|")
    print(f"| npy (chosen) | {npy_write:.1f} s | {sizes['npy'] / 2**20:.0f} MiB | {npy_read:,.0f} | "
          f"{npy_random:,.0f} (memory map) |")
    print(f"| TFRecord | {tfrecord_write:.1f} s | {sizes['tfrecord'] / 2**20:.0f} MiB | {tfrecord_read:,.0f} | "
          "no index: a scan |")
    print(f"\ntraining pipeline on {args.small} images (augmentation included): in memory {held:,.0f} img/s, "
          f"streamed from shards {streamed:,.0f} img/s ({streamed / held:.2f}x)")


def _training_speeds(split, repeats: int) -> tuple[float, float]:
    """Images/s of training_dataset streamed from `split`'s shards and fed from the same arrays in memory."""
    from chestct.imaging.processed import SplitArrays
    from chestct.params import load_params
    from chestct.training.input_pipeline import training_dataset

    params = load_params()
    train = params.train.model_copy(update={"steps_per_epoch": 40})
    held = SplitArrays(images=np.asarray(split.images), labels=split.labels, subtypes=split.subtypes, ids=split.ids)
    speeds = []
    for arrays in (split, held):
        dataset = training_dataset(arrays, params.augment, train, params.seed)
        for _ in dataset.take(2):  # warm-up: tracing
            pass
        best = 0.0
        for _ in range(repeats):
            started = time.perf_counter()
            count = sum(int(images.shape[0]) for images, _ in dataset)
            best = max(best, count / (time.perf_counter() - started))
        speeds.append(best)
    return speeds[0], speeds[1]


if __name__ == "__main__":
    main()
