"""How cost grows with the dataset: preprocessing, disk, the input pipeline and one training epoch.

    python -m benchmarks.scaling [--sizes 1000,10000,50000] [--px 64] [--epoch-backbone mobilenetv3small]
                                 [--model-backbone <params.yaml's>] [--work DIR] [--no-results]

For each size N: writes N phantom chest CT slices as PNG files (128-192 px, half Normal, half with lesions; a bank
of distinct phantoms reused, since only the per-file cost matters) with a 70/15/15 manifest; runs the preprocess
stage's code (params.yaml's preprocessing at `--px`, `preprocess.workers` processes, `preprocess.shard_images`)
in a fresh process and records its time and peak RSS (the main process and the largest worker); the shards'
size on disk; the training input pipeline alone (balanced batches, augmentation, re-standardisation: what
training iterates) in images/s; and the peak RSS of a process that trains one epoch (`train.steps_per_epoch`
steps) of `--epoch-backbone` on the streamed split.

Then, once: the model's own training speed at 256 px (params.yaml's backbone unless `--model-backbone`, weights
null, constant batches, after warm-up), and the input pipeline's images/s at 256 px on the first size, so the
two can be compared on this CPU. Goals (issue 19): per-image preprocess time at the largest size within 1.2x of
the smallest, peak RSS within 1.5x, input pipeline at least 2x the model's training speed.

Every measurement runs in its own process (`--child ...`), so peak RSS is that step's alone. The table (the
documentation's Scaling out page) goes to docs/results/scaling.json.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.results import cpu_name, write_result

BANK = 200  # distinct phantoms per class
SPLIT_SHARES = (("train", 0.70), ("valid", 0.15), ("test", 0.15))


# --- the dataset ----------------------------------------------------------------------------------------------


def _bank(seed: int = 0) -> dict[int, list[bytes]]:
    import cv2

    from chestct.data.phantoms import render_phantom

    rng = np.random.default_rng(seed)
    bank = {0: [], 1: []}
    for label in (0, 1):
        for _ in range(BANK):
            side = (int(rng.integers(128, 193)), int(rng.integers(128, 193)))
            image = render_phantom(rng, side, lesions=int(label * rng.integers(1, 3)))
            bank[label].append(cv2.imencode(".png", image)[1].tobytes())
    return bank


def write_dataset(folder: Path, count: int, bank: dict[int, list[bytes]]):
    """`count` PNG files under folder/Data and the manifest frame (id, split, label, subtype)."""
    import pandas as pd

    rows = []
    edges = np.cumsum([0] + [round(count * share) for _, share in SPLIT_SHARES])
    edges[-1] = count
    for index in range(count):
        split = SPLIT_SHARES[int(np.searchsorted(edges, index, side="right")) - 1][0]
        label = index % 2
        subtype = "normal" if label == 0 else "squamous.cell.carcinoma"
        image_id = f"{split}/{subtype}/{index:06d}.png"
        path = folder / "Data" / image_id
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(bank[label][(index // 2) % BANK])
        rows.append({"id": image_id, "split": split, "label": label, "subtype": subtype})
    return pd.DataFrame(rows)


def folder_bytes(folder: Path) -> int:
    return sum(path.stat().st_size for path in folder.rglob("*") if path.is_file())


# --- the measurements, each in its own process -------------------------------------------------------------


def _peak_mib(who: int) -> float:
    return resource.getrusage(who).ru_maxrss / 1024  # KiB on Linux


def child_preprocess(work: Path, px: int) -> dict:
    import pandas as pd

    from chestct.imaging.processed import preprocess_manifest
    from chestct.params import load_params

    params = load_params().preprocess.model_copy(update={"image_size": px})
    manifest = pd.read_csv(work / "manifest.csv", keep_default_na=False)
    started = time.perf_counter()
    preprocess_manifest(manifest, work / "Data", params, work / f"processed{px}", progress=False)
    seconds = time.perf_counter() - started
    return {"seconds": seconds, "rss_main_mib": _peak_mib(resource.RUSAGE_SELF),
            "rss_worker_mib": _peak_mib(resource.RUSAGE_CHILDREN), "workers": params.workers}


def _training_inputs(work: Path, px: int):
    from chestct.imaging.processed import load_split
    from chestct.params import load_params
    from chestct.training.loop import restandardisation

    params = load_params()
    train = load_split(work / f"processed{px}" / "train")
    return params, train, restandardisation(params, train)


def child_pipeline(work: Path, px: int, batches: int = 60) -> dict:
    from chestct.training.input_pipeline import training_dataset

    params, train, standardise = _training_inputs(work, px)
    settings = params.train.model_copy(update={"steps_per_epoch": batches})
    dataset = training_dataset(train, params.augment, settings, params.seed, standardise)
    iterator = iter(dataset)
    for _ in range(5):  # warm-up: tracing, the first shard reads and the shuffle buffers filling
        next(iterator)
    started, images = time.perf_counter(), 0
    for _ in range(batches - 5):
        images += int(next(iterator)[0].shape[0])
    return {"images_per_s": images / (time.perf_counter() - started), "rss_mib": _peak_mib(resource.RUSAGE_SELF)}


def child_epoch(work: Path, px: int, backbone: str) -> dict:
    from chestct.training.input_pipeline import training_dataset
    from chestct.training.loop import compile_for_phase
    from chestct.training.model import build_model

    params, train, standardise = _training_inputs(work, px)
    model_params = params.model.model_copy(update={"backbone": backbone, "weights": None})
    model = build_model(model_params, train.image_size)
    compile_for_phase(model, params, params.train.phase1)
    dataset = training_dataset(train, params.augment, params.train, params.seed, standardise)
    started = time.perf_counter()
    model.fit(dataset, epochs=1, steps_per_epoch=params.train.steps_per_epoch, verbose=0)
    return {"seconds": time.perf_counter() - started, "steps": params.train.steps_per_epoch,
            "rss_mib": _peak_mib(resource.RUSAGE_SELF)}


def child_model_speed(backbone: str, px: int, steps: int = 6) -> dict:
    import tensorflow as tf

    from chestct.params import load_params
    from chestct.training.loop import compile_for_phase
    from chestct.training.model import build_model

    params = load_params()
    model = build_model(params.model.model_copy(update={"backbone": backbone, "weights": None}), px)
    compile_for_phase(model, params, params.train.phase1)
    batch = params.train.batch_size
    images = tf.random.uniform((batch, px, px, 1), 0, 255)
    labels = tf.cast(tf.reshape(tf.range(batch) % 2, (-1, 1)), tf.float32)
    for _ in range(2):
        model.train_on_batch(images, labels)
    started = time.perf_counter()
    for _ in range(steps):
        model.train_on_batch(images, labels)
    return {"images_per_s": steps * batch / (time.perf_counter() - started)}


CHILDREN = {"preprocess": child_preprocess, "pipeline": child_pipeline, "epoch": child_epoch,
            "model": child_model_speed}


def _in_child(name: str, **kwargs) -> dict:
    """Run one measurement in a fresh Python process; its figures come back as JSON on the last line."""
    command = [sys.executable, "-m", "benchmarks.scaling", "--child", name, "--child-args", json.dumps(
        {key: str(value) if isinstance(value, Path) else value for key, value in kwargs.items()})]
    done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})
    if done.returncode != 0:
        raise SystemExit(f"scaling: the {name} step failed:\n{done.stdout[-2000:]}{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# --- the report ---------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="1000,10000,50000", help="comma-separated image counts")
    parser.add_argument("--px", type=int, default=64, help="preprocess.image_size for the scaling rows")
    parser.add_argument("--epoch-backbone", default="mobilenetv3small")
    parser.add_argument("--model-backbone", default=None, help="default: params.yaml's model.backbone")
    parser.add_argument("--work", type=Path, default=None, help="keep the datasets here (default: a temp dir)")
    parser.add_argument("--no-results", action="store_true",
                        help="do not write docs/results/scaling.json (the documentation's table)")
    parser.add_argument("--child", choices=sorted(CHILDREN), help=argparse.SUPPRESS)
    parser.add_argument("--child-args", default="{}", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        kwargs = json.loads(args.child_args)
        kwargs = {key: Path(value) if key == "work" else value for key, value in kwargs.items()}
        print(json.dumps(CHILDREN[args.child](**kwargs)))
        return

    from chestct.params import load_params

    params = load_params()
    sizes = [int(size) for size in args.sizes.split(",")]
    model_backbone = args.model_backbone or params.model.backbone
    root = args.work or Path(tempfile.mkdtemp(prefix="chestct-scaling-"))
    print(f"scaling: sizes {sizes} at {args.px} px; preprocess workers {params.preprocess.workers}, shard_images "
          f"{params.preprocess.shard_images}, crop {params.preprocess.crop}, denoise "
          f"{params.preprocess.denoise.method}, intensity {params.preprocess.intensity}; epoch of "
          f"{params.train.steps_per_epoch} steps x {params.train.batch_size} on {args.epoch_backbone}; "
          f"CPU: {cpu_name()}, {os.cpu_count()} cores", flush=True)
    bank = _bank()
    rows = []
    try:
        for size in sizes:
            work = root / f"n{size}"
            started = time.perf_counter()
            manifest = write_dataset(work, size, bank)
            manifest.to_csv(work / "manifest.csv", index=False)
            print(f"scaling: {size} images written in {time.perf_counter() - started:.0f} s", flush=True)
            pre = _in_child("preprocess", work=work, px=args.px)
            disk = folder_bytes(work / f"processed{args.px}")
            pipe = _in_child("pipeline", work=work, px=args.px)
            epoch = _in_child("epoch", work=work, px=args.px, backbone=args.epoch_backbone)
            rows.append({"size": size, "pre": pre, "disk": disk, "pipe": pipe, "epoch": epoch})
            print(f"scaling: {size}: preprocess {pre['seconds']:.0f} s, pipeline {pipe['images_per_s']:.0f} img/s, "
                  f"epoch {epoch['seconds']:.0f} s", flush=True)
            shutil.rmtree(work / "Data")  # the raw files are no longer needed; the shards are
        first = root / f"n{sizes[0]}"
        shutil.rmtree(first / "Data", ignore_errors=True)
        write_dataset(first, sizes[0], bank)
        _in_child("preprocess", work=first, px=256)
        pipe256 = _in_child("pipeline", work=first, px=256)
        model256 = _in_child("model", backbone=model_backbone, px=256)
    finally:
        if args.work is None:
            shutil.rmtree(root, ignore_errors=True)
    _print_table(rows, pipe256, model256, model_backbone, sizes[0])
    if not args.no_results:
        figures = {"tables": {"cost": cost_table(rows, args.px)}, "rows": rows, "pipeline_256px": pipe256,
                   "model_256px": model256, "model_backbone": model_backbone}
        print(f"written: {write_result('scaling', figures)}")


def cost_table(rows: list[dict], px: int) -> dict:
    """The documentation's table: one row per size, the ratios against the first size."""
    base_ms = 1000 * rows[0]["pre"]["seconds"] / rows[0]["size"]
    table = []
    for row in rows:
        ms = 1000 * row["pre"]["seconds"] / row["size"]
        table.append([f"{row['size']:,}", f"{row['pre']['seconds']:.0f} s", f"{ms:.2f} ({ms / base_ms:.2f}x)",
                      f"{row['pre']['rss_main_mib']:,.0f} / {row['pre']['rss_worker_mib']:,.0f} MiB",
                      f"{row['disk'] / 2**20:,.0f} MiB", f"{row['pipe']['images_per_s']:,.0f} img/s",
                      f"{row['epoch']['seconds']:.0f} s, {row['epoch']['rss_mib']:,.0f} MiB"])
    return {"title": f"How cost grows with the dataset (phantoms at {px} px, params.yaml's preprocessing)",
            "columns": ["images", "preprocess", f"ms/image (x {rows[0]['size']:,})",
                        "preprocess peak RSS, main / worker", "shards on disk", "input pipeline alone",
                        "one training epoch: time, peak RSS"], "rows": table}


def _print_table(rows: list[dict], pipe256: dict, model256: dict, backbone: str, first_size: int) -> None:
    base = rows[0]
    base_ms = 1000 * base["pre"]["seconds"] / base["size"]
    print("\n| images | preprocess | ms/image (x first) | preprocess peak RSS main / worker MiB | shards on disk "
          "| input pipeline img/s | one epoch: s, peak RSS MiB |")
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        ms = 1000 * row["pre"]["seconds"] / row["size"]
        print(f"| {row['size']:,} | {row['pre']['seconds']:.0f} s | {ms:.2f} ({ms / base_ms:.2f}x) | "
              f"{row['pre']['rss_main_mib']:.0f} / {row['pre']['rss_worker_mib']:.0f} | "
              f"{row['disk'] / 2**20:.0f} MiB | {row['pipe']['images_per_s']:.0f} | "
              f"{row['epoch']['seconds']:.0f} s, {row['epoch']['rss_mib']:.0f} |")
    last = rows[-1]
    time_ratio = (1000 * last["pre"]["seconds"] / last["size"]) / base_ms
    rss = max(last["pre"]["rss_main_mib"], last["pre"]["rss_worker_mib"])
    rss_base = max(base["pre"]["rss_main_mib"], base["pre"]["rss_worker_mib"])
    epoch_ratio = last["epoch"]["rss_mib"] / base["epoch"]["rss_mib"]
    speed_ratio = pipe256["images_per_s"] / model256["images_per_s"]
    print(f"\nper-image preprocess time, {last['size']:,} vs {base['size']:,}: {time_ratio:.2f}x (goal <= 1.2)")
    print(f"preprocess peak RSS, {last['size']:,} vs {base['size']:,}: {rss / rss_base:.2f}x; one epoch: "
          f"{epoch_ratio:.2f}x (goal <= 1.5)")
    print(f"at 256 px: input pipeline {pipe256['images_per_s']:.0f} img/s ({first_size:,}-image set), model "
          f"{backbone} training {model256['images_per_s']:.1f} img/s: {speed_ratio:.1f}x (goal >= 2)")


if __name__ == "__main__":
    main()
