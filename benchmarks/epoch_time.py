"""Seconds per training epoch: each precision policy through the project's loop, and a naive loop, side by side.

    python -m benchmarks.epoch_time [--real ../shared/data/chest-ctscan-images] [--precisions float32,mixed_bfloat16]
                                    [--steps 75] [--skip-naive] [--skip-onednn-off]

The default configuration (params.yaml: DenseNet121, its image size, batch 16, 75 steps an epoch, op
determinism as `train.deterministic` says) with `model.weights: null`. Each row runs in its own process (the
oneDNN switch is read when TensorFlow loads; the precision policy is global): it builds the model, runs a 2-step
warm-up (graph tracing), then times one phase-1 epoch (backbone frozen) and one phase-2 epoch (`model.unfreeze`),
each split into training (the project's tf.data pipeline: balanced batches, augmentation and MixUp in parallel
maps, prefetch) and validation (every validation image once, batched, no augmentation: what `ValidationAUC` does).

Rows:
- `project <precision>`: the project as `dvc repro` runs it, oneDNN kernels on (chestct turns them on).
- `project float32, oneDNN off`: the same with TensorFlow's oneDNN kernels off, which is TensorFlow's own
  default on CPUs without AVX512 neural-network extensions; it separates what oneDNN brings from what the loop
  brings.
- `naive loop`: the same model in float32, oneDNN off, fed the way the original project did: a single-threaded
  Python generator that augments each image with PIL and scipy, and validation on 1,200 images resampled from
  the validation split.

Ratios are measured in one run on one machine; absolute seconds vary with its load.

Images: `--real DIR` preprocesses the Kaggle train/valid folders with `chestct.imaging.preprocess`; otherwise random
images of the same size and count (613 train, 72 valid).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def _load_real(root: Path, params) -> tuple:
    from chestct.data.records import list_image_files
    from chestct.imaging.preprocess import preprocess_image
    from chestct.imaging.processed import SplitArrays
    from chestct.labels import label_of_subtype, subtype_of_folder

    data = root / "Data" if (root / "Data").is_dir() else root
    entries = list_image_files(data)
    arrays = {}
    for split in ("train", "valid"):
        rows = [(folder, path) for entry_split, folder, path in entries if entry_split == split]
        subtypes = [subtype_of_folder(folder) for folder, _ in rows]
        arrays[split] = SplitArrays(
            images=np.stack([preprocess_image(path, params.preprocess) for _, path in rows]),
            labels=np.array([label_of_subtype(subtype) for subtype in subtypes]), subtypes=np.array(subtypes),
            ids=np.array([str(path) for _, path in rows]))
    return arrays["train"], arrays["valid"], f"real data from {root}"


def _random_split(count: int, size: int, seed: int):
    from chestct.imaging.processed import SplitArrays

    rng = np.random.default_rng(seed)
    labels = (np.arange(count) % 4 != 0).astype(np.int64)  # about the real 1:3 Normal:Cancer ratio
    return SplitArrays(images=rng.integers(0, 256, (count, size, size, 1), dtype=np.uint8), labels=labels,
                       subtypes=np.array(["x"] * count), ids=np.array([str(i) for i in range(count)]))


# --- the project's loop ---------------------------------------------------------------------------------------


def _timed_fit(model, dataset, steps: int) -> float:
    started = time.perf_counter()
    model.fit(dataset, epochs=1, steps_per_epoch=steps, verbose=0)
    return time.perf_counter() - started


def _timed_validation(model, valid, batch_size: int) -> tuple[float, float]:
    from chestct.training.input_pipeline import validation_dataset
    from chestct.training.loop import exact_auc

    dataset = validation_dataset(valid, batch_size)
    started = time.perf_counter()
    scores = model.predict(dataset, verbose=0).ravel()
    auc = exact_auc(valid.labels, scores)
    return time.perf_counter() - started, auc


def project_epochs(params, precision: str, train, valid, steps: int) -> dict:
    from chestct.training.input_pipeline import training_dataset, validation_dataset
    from chestct.training.loop import compile_for_phase, configure_determinism, configure_precision
    from chestct.training.model import build_model, unfreeze_for_finetuning

    policy = configure_precision(precision)
    configure_determinism(params.seed, params.train.deterministic)
    model = build_model(params.model, train.image_size)
    dataset = training_dataset(train, params.augment, params.train, params.seed).repeat()
    results = {"policy": policy}
    for phase in ("phase1", "phase2"):
        if phase == "phase2":
            unfreeze_for_finetuning(model, params.model)
        compile_for_phase(model, params, getattr(params.train, phase))
        _timed_fit(model, dataset, 2)  # warm-up: tracing and the first prefetches
        model.predict(validation_dataset(valid, params.train.validation_batch_size), verbose=0)
        train_s = _timed_fit(model, dataset, steps)
        valid_s, auc = _timed_validation(model, valid, params.train.validation_batch_size)
        results[phase] = {"train_s": train_s, "valid_s": valid_s, "auc": auc,
                          "img_s": steps * params.train.batch_size / train_s}
    return results


# --- the naive loop -------------------------------------------------------------------------------------------


def _naive_augment(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Per image, in Python: PIL rotation, scipy shift and zoom, brightness/contrast (the original's style)."""
    from PIL import Image
    from scipy import ndimage

    size = image.shape[0]
    pil = Image.fromarray(image[..., 0]).rotate(float(rng.uniform(-15, 15)), resample=Image.BILINEAR)
    array = np.asarray(pil, dtype=np.float32)
    array = ndimage.shift(array, rng.uniform(-0.1, 0.1, 2) * size, order=1, mode="constant")
    zoomed = ndimage.zoom(array, float(rng.uniform(0.9, 1.1)), order=1)
    canvas = np.zeros_like(array)
    h, w = min(size, zoomed.shape[0]), min(size, zoomed.shape[1])
    canvas[:h, :w] = zoomed[:h, :w]
    canvas = canvas * rng.uniform(0.9, 1.1) + rng.uniform(-10, 10)
    return np.clip(canvas, 0, 255)[..., None]


def _naive_batches(train, batch_size: int, seed: int):
    rng = np.random.default_rng(seed)
    while True:
        indices = rng.integers(0, len(train.images), batch_size)
        images = np.stack([_naive_augment(train.images[i], rng) for i in indices]).astype(np.uint8)
        yield images, train.labels[indices].astype(np.float32).reshape(-1, 1)


def naive_epochs(params, train, valid, steps: int, resampled: int = 1200) -> dict:
    import keras

    from chestct.training.loop import compile_for_phase, configure_precision, exact_auc
    from chestct.training.model import build_model, unfreeze_for_finetuning

    configure_precision("float32")
    keras.utils.set_random_seed(params.seed)
    model = build_model(params.model, train.image_size)
    rng = np.random.default_rng(params.seed)
    picks = rng.integers(0, len(valid.images), resampled)
    results = {"policy": "float32"}
    for phase in ("phase1", "phase2"):
        if phase == "phase2":
            unfreeze_for_finetuning(model, params.model)
        compile_for_phase(model, params, getattr(params.train, phase))
        generator = _naive_batches(train, params.train.batch_size, params.seed)
        model.fit(generator, epochs=1, steps_per_epoch=2, verbose=0)  # the same warm-up
        started = time.perf_counter()
        model.fit(generator, epochs=1, steps_per_epoch=steps, verbose=0)
        train_s = time.perf_counter() - started
        started = time.perf_counter()
        scores = model.predict(valid.images[picks], batch_size=params.train.batch_size, verbose=0).ravel()
        auc = exact_auc(valid.labels[picks], scores)
        valid_s = time.perf_counter() - started
        results[phase] = {"train_s": train_s, "valid_s": valid_s, "auc": auc,
                          "img_s": steps * params.train.batch_size / train_s}
    return results


# --- one row per process -----------------------------------------------------------------------------------


def _benchmark_params():
    from chestct.params import load_params

    params = load_params()
    return params.model_copy(update={"model": params.model.model_copy(update={"weights": None})})


def _save_splits(folder: Path, train, valid) -> None:
    """Write the images as the preprocess stage does (`<split>/` shards), for the row processes to load."""
    from chestct.imaging.processed import ARRAY_KEYS, save_processed

    save_processed(folder, {split: {key: getattr(arrays, key) for key in ARRAY_KEYS}
                            for split, arrays in (("train", train), ("valid", valid))})


def worker(loop: str, precision: str, splits: Path, steps: int, result_path: Path) -> None:
    """Run one row in this process and write its figures to `result_path`."""
    from chestct.imaging.processed import load_split
    from chestct.training.loop import onednn_enabled

    params = _benchmark_params()
    train, valid = (load_split(splits / split) for split in ("train", "valid"))
    if loop == "naive":
        result = naive_epochs(params, train, valid, steps)
    else:
        result = project_epochs(params, precision, train, valid, steps)
    result["onednn"] = onednn_enabled()
    result_path.write_text(json.dumps(result))


def run_row(name: str, loop: str, precision: str, onednn: bool, splits: Path, steps: int) -> dict:
    """Run one row in a fresh Python process, with TensorFlow's oneDNN switch set before it loads."""
    result_path = splits.with_name(f"{name.replace(' ', '_').replace(',', '')}.json")
    env = {**os.environ, "TF_ENABLE_ONEDNN_OPTS": "1" if onednn else "0"}
    print(f"-- {name}", flush=True)
    subprocess.run([sys.executable, "-m", "benchmarks.epoch_time", "--worker", loop, "--precisions", precision,
                    "--splits", str(splits), "--steps", str(steps), "--result", str(result_path)],
                   env=env, check=True)
    result = json.loads(result_path.read_text())
    print(f"{name}: {result}", flush=True)
    return result


# --- report ---------------------------------------------------------------------------------------------------


def _print_table(rows: dict[str, dict], reference: str) -> None:
    print(f"\n{'loop':<30}{'oneDNN':>7}  {'phase':<8}{'train s':>9}{'valid s':>9}{'epoch s':>9}{'img/s':>8}"
          f"{'val AUC':>9}{'vs float32':>11}{'naive/this':>11}")
    for phase in ("phase1", "phase2"):
        base = rows[reference][phase]["train_s"] + rows[reference][phase]["valid_s"]
        naive = rows.get("naive loop")
        naive_epoch = naive[phase]["train_s"] + naive[phase]["valid_s"] if naive else None
        for name, result in rows.items():
            r = result[phase]
            epoch = r["train_s"] + r["valid_s"]
            speedup = f"{naive_epoch / epoch:>11.2f}" if naive_epoch else f"{'':>11}"
            onednn = "on" if result["onednn"] else "off"
            print(f"{name:<30}{onednn:>7}  {phase:<8}{r['train_s']:>9.1f}{r['valid_s']:>9.1f}{epoch:>9.1f}"
                  f"{r['img_s']:>8.1f}{r['auc']:>9.3f}{base / epoch:>11.2f}{speedup}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--real", type=Path, default=None, help="the Kaggle dataset folder (or its Data/)")
    parser.add_argument("--precisions", default="float32,mixed_bfloat16,mixed_float16")
    parser.add_argument("--steps", type=int, default=None, help="steps an epoch (default: train.steps_per_epoch)")
    parser.add_argument("--skip-naive", action="store_true")
    parser.add_argument("--skip-onednn-off", action="store_true", help="no `project float32, oneDNN off` row")
    parser.add_argument("--worker", choices=("project", "naive"), help=argparse.SUPPRESS)
    parser.add_argument("--splits", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, args.precisions, args.splits, args.steps, args.result)
        return

    params = _benchmark_params()
    steps = args.steps or params.train.steps_per_epoch
    size = params.preprocess.image_size
    if args.real:
        train, valid, source = _load_real(args.real, params)
    else:
        train, valid, source = _random_split(613, size, 0), _random_split(72, size, 1), "random images"
    print(f"{params.model.backbone} at {size} px, weights null, batch {params.train.batch_size}, {steps} steps an "
          f"epoch; {len(train.images)} train / {len(valid.images)} valid images ({source})", flush=True)

    plan = [(f"project {precision}", "project", precision, True) for precision in args.precisions.split(",")]
    if not args.skip_onednn_off:
        plan.append(("project float32, oneDNN off", "project", "float32", False))
    if not args.skip_naive:
        plan.append(("naive loop", "naive", "float32", False))
    with tempfile.TemporaryDirectory(prefix="chestct-epoch-time-") as scratch:
        splits = Path(scratch) / "processed"
        _save_splits(splits, train, valid)
        rows = {name: run_row(name, loop, precision, onednn, splits, steps) for name, loop, precision, onednn in plan}
    _print_table(rows, reference=plan[0][0])


if __name__ == "__main__":
    main()
