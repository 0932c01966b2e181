"""Seconds per training epoch and the cores they keep busy: the project's loop under each setting, the bare-fit
ceiling and a naive loop, side by side.

    python -m benchmarks.epoch_time [--real ../shared/data/chest-ctscan-images] [--precisions float32,mixed_bfloat16]
                                    [--steps 75] [--repeats 3] [--naive-repeats N] [--skip-naive]
                                    [--skip-onednn-off] [--skip-bare] [--skip-determinism] [--no-results]

The default configuration (params.yaml: DenseNet121, its image size, batch 16, 75 steps an epoch, op
determinism as `train.deterministic` says) with `model.weights: null`. Each row runs in its own process (the
oneDNN switch is read when TensorFlow loads; the precision policy is global): it builds the model, runs a 2-step
warm-up (graph tracing), then, for phase 1 (backbone frozen) and phase 2 (`model.unfreeze`), times `--repeats`
training epochs and validation passes in turn: training through the project's tf.data pipeline (balanced batches,
augmentation and MixUp in parallel maps, prefetch), validation over every validation image once (what
`ValidationAUC` does).

Every timing comes with the cores it kept busy: the process's CPU time over wall time, for the whole `fit` call
(its iterator's teardown included: where tf.data's autotuning thread used to idle both cores) and for the least
busy of its 5-step windows. On a 2-core machine a compute-bound step keeps about 1.9 busy.

Rows:
- `project <precision>`: the project as `dvc repro` runs it, oneDNN kernels on (chestct turns them on).
- `project float32, determinism <on|off>`: `train.deterministic` the other way round from params.yaml.
- `project float32, oneDNN off`: TensorFlow's oneDNN kernels off (its own default on CPUs without AVX512
  neural-network extensions): what oneDNN brings, apart from what the loop brings.
- `bare fit`: the same network and compile, fed one training batch repeated from memory (the project's dataset
  options): the ceiling of a training step on this machine. No validation.
- `naive loop`: the same model in float32, oneDNN off, fed the way the original project did: a single-threaded
  Python generator that augments each image with PIL and scipy, and validation on 1,200 images resampled from
  the validation split (Keras builds its datasets, autotuned, as the original's did).

Ratios are measured in one run on one machine; absolute seconds vary with its load. The figures are printed and
written to docs/results/epoch_time.json (benchmarks.results), from which the documentation renders its tables.

Images: `--real DIR` preprocesses the Kaggle train/valid folders with `chestct.imaging.preprocess`; otherwise random
images of the same size and count (613 train, 72 valid).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.results import provenance, write_result
from chestct.atomic_io import write_json

WINDOW_STEPS = 5  # the cores used are also judged over windows of this many steps


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


# --- timing ---------------------------------------------------------------------------------------------------


def _window_pace():
    """A Keras callback that keeps the least CPU-time-over-wall-time of the fit's WINDOW_STEPS-step windows."""
    import keras

    class WindowPace(keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.least = float("inf")

        def on_train_batch_begin(self, batch: int, logs=None) -> None:
            if batch % WINDOW_STEPS == 0:
                self._wall, self._cpu = time.perf_counter(), time.process_time()

        def on_train_batch_end(self, batch: int, logs=None) -> None:
            if batch % WINDOW_STEPS == WINDOW_STEPS - 1:
                wall = time.perf_counter() - self._wall
                self.least = min(self.least, (time.process_time() - self._cpu) / wall)

        def on_epoch_end(self, epoch: int, logs=None) -> None:
            self.last_epoch_end = time.perf_counter()  # put after the epoch timer: after its validation

    return WindowPace()


def _timed(run) -> tuple[dict, object]:
    started, cpu = time.perf_counter(), time.process_time()
    value = run()
    seconds = time.perf_counter() - started
    return {"seconds": seconds, "cores": (time.process_time() - cpu) / seconds}, value


# --- the project's loop and its ceiling ------------------------------------------------------------------------


def _project_validation(model, valid, batch_size: int) -> tuple[dict, float]:
    from chestct.training.input_pipeline import validation_dataset
    from chestct.training.loop import exact_auc

    timing, scores = _timed(lambda: model.predict(validation_dataset(valid, batch_size), verbose=0).ravel())
    return timing, exact_auc(valid.labels, scores)


def _epoch_timer(validate, runs: list, images_per_step: int, steps: int):
    """The training loop's own CorePace (each epoch's training steps: seconds, cores used), then `validate` (if
    any), timed, as the project's ValidationAUC runs it at the end of each epoch; appends one run per epoch."""
    from chestct.training.pace import CorePace

    class EpochTimer(CorePace):
        def on_epoch_end(self, epoch: int, logs=None) -> None:
            super().on_epoch_end(epoch, logs)
            run = {"train": {"seconds": self.seconds, "cores": self.cores_used}}
            if validate is not None:
                run["valid"], run["auc"] = validate(self.model)
            runs.append(run)

    return EpochTimer(images_per_step, steps)


def _phases(model, params, steps: int, repeats: int, dataset, validate):
    """Both phases of one row: compile, warm up, then one fit of `repeats` epochs, as training runs them, each
    epoch timed (training, then validation); the fit's teardown after its last epoch is timed apart."""
    from chestct.training.loop import compile_for_phase
    from chestct.training.model import unfreeze_for_finetuning

    results = {}
    for phase in ("phase1", "phase2"):
        if phase == "phase2":
            unfreeze_for_finetuning(model, params.model)
        compile_for_phase(model, params, getattr(params.train, phase))
        model.fit(dataset, epochs=1, steps_per_epoch=2, verbose=0)  # warm-up: tracing and the first prefetches
        if validate is not None:
            validate(model)
        runs, windows = [], _window_pace()
        started = time.perf_counter()
        model.fit(dataset, epochs=repeats, steps_per_epoch=steps, verbose=0,
                  callbacks=[_epoch_timer(validate, runs, params.train.batch_size, steps), windows])
        end_of_epochs = windows.last_epoch_end
        results[phase] = {"runs": runs, "window_cores_min": windows.least if windows.least < float("inf") else None,
                          "teardown_s": time.perf_counter() - end_of_epochs, "fit_s": end_of_epochs - started}
    return results


def project_epochs(params, precision: str, train, valid, steps: int, repeats: int, bare: bool = False) -> dict:
    import tensorflow as tf

    from chestct.tf_data import pipeline_options
    from chestct.training.input_pipeline import training_dataset
    from chestct.training.loop import configure_determinism, configure_precision
    from chestct.training.model import build_model

    policy = configure_precision(precision)
    configure_determinism(params.seed, params.train.deterministic)
    model = build_model(params.model, train.image_size)
    dataset = training_dataset(train, params.augment, params.train, params.seed).repeat()
    validate = lambda model: _project_validation(model, valid, params.train.validation_batch_size)  # noqa: E731
    if bare:  # one real training batch, repeated from memory: nothing to read, augment or mix
        batch = next(iter(dataset))
        dataset, validate = tf.data.Dataset.from_tensors(batch).repeat().with_options(pipeline_options()), None
    return {"policy": policy, **_phases(model, params, steps, repeats, dataset, validate)}


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


def naive_epochs(params, train, valid, steps: int, repeats: int, resampled: int = 1200) -> dict:
    import keras

    from chestct.training.loop import configure_precision, exact_auc
    from chestct.training.model import build_model

    configure_precision("float32")
    keras.utils.set_random_seed(params.seed)
    model = build_model(params.model, train.image_size)
    picks = np.random.default_rng(params.seed).integers(0, len(valid.images), resampled)

    def validate(model):
        timing, scores = _timed(lambda: model.predict(valid.images[picks], batch_size=params.train.batch_size,
                                                      verbose=0).ravel())
        return timing, exact_auc(valid.labels[picks], scores)

    generator = _naive_batches(train, params.train.batch_size, params.seed)
    return {"policy": "float32", **_phases(model, params, steps, repeats, generator, validate)}


# --- one row per process -----------------------------------------------------------------------------------


def _benchmark_params(deterministic: bool | None = None):
    from chestct.params import load_params

    params = load_params()
    train = params.train if deterministic is None else params.train.model_copy(update={"deterministic": deterministic})
    return params.model_copy(update={"model": params.model.model_copy(update={"weights": None}), "train": train})


def _save_splits(folder: Path, train, valid) -> None:
    """Write the images as the preprocess stage does (`<split>/` shards), for the row processes to load."""
    from chestct.imaging.processed import ARRAY_KEYS, save_processed

    save_processed(folder, {split: {key: getattr(arrays, key) for key in ARRAY_KEYS}
                            for split, arrays in (("train", train), ("valid", valid))})


def worker(loop: str, precision: str, deterministic: bool, splits: Path, steps: int, repeats: int,
           result_path: Path) -> None:
    """Run one row in this process and write its figures to `result_path`."""
    from chestct.imaging.processed import load_split
    from chestct.training.loop import onednn_enabled

    params = _benchmark_params(deterministic)
    train, valid = (load_split(splits / split) for split in ("train", "valid"))
    if loop == "naive":
        result = naive_epochs(params, train, valid, steps, repeats)
    else:
        result = project_epochs(params, precision, train, valid, steps, repeats, bare=loop == "bare")
    result |= {"onednn": onednn_enabled(), "deterministic": params.train.deterministic}
    result_path.write_text(json.dumps(result))


def run_row(row: dict, splits: Path, steps: int, repeats: int) -> dict:
    """Run one row in a fresh Python process, with TensorFlow's oneDNN switch set before it loads."""
    result_path = splits.with_name(f"row{row['index']}.json")
    env = {**os.environ, "TF_ENABLE_ONEDNN_OPTS": "1" if row["onednn"] else "0"}
    print(f"-- {row['name']}", flush=True)
    subprocess.run([sys.executable, "-m", "benchmarks.epoch_time", "--worker", row["loop"],
                    "--precisions", row["precision"], "--deterministic", str(row["deterministic"]).lower(),
                    "--splits", str(splits), "--steps", str(steps), "--repeats", str(repeats),
                    "--result", str(result_path)], env=env, check=True)
    result = json.loads(result_path.read_text())
    print(f"{row['name']}: {_summary_line(result)}", flush=True)
    return result


# --- report ---------------------------------------------------------------------------------------------------


def _spread(values: list[float]) -> dict:
    return {"min": min(values), "median": statistics.median(values), "max": max(values)}


def summarise(result: dict, steps: int, full_steps: int) -> dict:
    """Per phase: training and validation seconds (min / median / max over the epochs), the least cores an
    epoch's training and its least busy window kept busy, the fit's teardown, the median epoch, the last AUC."""
    summary = {}
    for phase in ("phase1", "phase2"):
        runs = result[phase]["runs"]
        train = _spread([run["train"]["seconds"] for run in runs])
        entry = {"train_s": train, "fit_cores_min": min(run["train"]["cores"] for run in runs),
                 "window_cores_min": result[phase]["window_cores_min"], "teardown_s": result[phase]["teardown_s"]}
        if "valid" in runs[0]:
            entry["valid_s"] = _spread([run["valid"]["seconds"] for run in runs])
            entry["valid_cores_min"] = min(run["valid"]["cores"] for run in runs)
            entry["auc"] = runs[-1]["auc"]
        # an epoch of train.steps_per_epoch steps: a step takes the same time whatever the epoch's length
        entry["epoch_s"] = (train["median"] * full_steps / steps
                            + (entry["valid_s"]["median"] if "valid_s" in entry else 0.0))
        summary[phase] = entry
    return summary


def _summary_line(result: dict) -> str:
    return "; ".join(f"{phase} training " + ", ".join(f"{run['train']['seconds']:.1f} s on {run['train']['cores']:.2f}"
                                                      " cores" for run in result[phase]["runs"])
                     for phase in ("phase1", "phase2"))


def _seconds(spread: dict) -> str:
    return f"{spread['median']:.1f} ({spread['min']:.1f}-{spread['max']:.1f})"


def _cores(entry: dict) -> str:
    window = entry["window_cores_min"]
    return f"{entry['fit_cores_min']:.2f} / {window:.2f}" if window is not None else f"{entry['fit_cores_min']:.2f}"


def build_tables(rows: dict[str, dict], steps: int, full_steps: int, batch_size: int, repeats: str,
                 reference: str, epochs: dict[str, int]) -> dict:
    """The tables the documentation renders: epochs per row, precision against float32, and the goals."""
    summaries = {name: summarise(result, steps, full_steps) for name, result in rows.items()}
    naive = summaries.get("naive loop")
    epoch_rows = []
    for name, summary in summaries.items():
        for phase, entry in summary.items():
            versus = f"{naive[phase]['epoch_s'] / entry['epoch_s']:.2f}x" if naive and name != "bare fit" else ""
            epoch_rows.append([name, phase, _seconds(entry["train_s"]),
                               f"{steps * batch_size / entry['train_s']['median']:.1f}", _cores(entry),
                               _seconds(entry["valid_s"]) if "valid_s" in entry else "",
                               f"{entry['epoch_s']:.1f}" if "valid_s" in entry else "",
                               f"{entry['teardown_s']:.1f}", versus])
    tables = {"phase_epochs": {
        "title": f"Training epochs of {steps} steps of {batch_size} images, {repeats} per phase and row",
        "columns": ["row", "phase", "training s, median (min-max)", "img/s", "cores used: least epoch / least "
                    f"{WINDOW_STEPS}-step window", "validation s", f"epoch s ({full_steps} steps)", "fit teardown s",
                    "naive epoch / this epoch"],
        "rows": epoch_rows,
        "notes": "Each row trains each phase as one fit of several epochs, as `dvc repro` does, and validates at "
                 "the end of each epoch. Cores used: process CPU time over wall time of the training steps; 2 is "
                 "every core of this machine. Epoch s: an epoch of train.steps_per_epoch steps at the median step "
                 "time, plus the median validation pass. Fit teardown: from the last epoch's end to fit's return. "
                 "The bare fit feeds one training batch repeated from memory: the ceiling of a training step "
                 "here."}}
    precisions = [name for name in summaries if name.startswith("project ") and "," not in name]
    if len(precisions) > 1:
        base = summaries[reference]
        tables["precision"] = {
            "title": "Training speed under each precision policy, relative to float32 (same run)",
            "columns": ["phase", *[name.removeprefix("project ") for name in precisions[1:]]],
            "rows": [[phase, *[f"{base[phase]['train_s']['median'] / summaries[name][phase]['train_s']['median']:.2f}x"
                               for name in precisions[1:]]] for phase in ("phase1", "phase2")]}
    project = summaries[reference]
    seconds = {phase: epochs[phase] * project[phase]["epoch_s"] for phase in ("phase1", "phase2")}
    tables["training_time"] = {
        "title": f"Training the default configuration on this CPU ({reference}): at most, if no epoch stops early",
        "columns": ["phase", "epochs (params.yaml)", f"one epoch of {full_steps} steps, validation included",
                    "all epochs"],
        "rows": [*[[phase, str(epochs[phase]), f"{project[phase]['epoch_s']:.0f} s", _duration(seconds[phase])]
                   for phase in ("phase1", "phase2")],
                 ["both phases", str(sum(epochs.values())), "", _duration(sum(seconds.values()))]],
        "notes": "Early stopping (train.early_stopping_patience) usually ends phase 2 sooner."}
    tables["goals"] = {"title": "The figures this benchmark is judged by", "columns": ["figure", "measured", "goal"],
                       "rows": _goal_rows(summaries, reference)}
    return tables


def _duration(seconds: float) -> str:
    minutes = round(seconds / 60)
    return f"{minutes // 60} h {minutes % 60:02d} min" if minutes >= 60 else f"{minutes} min"


def _goal_rows(summaries: dict[str, dict], reference: str) -> list[list[str]]:
    project = summaries[reference]
    least = min(min(entry["fit_cores_min"], entry["window_cores_min"] or entry["fit_cores_min"])
                for name, summary in summaries.items() if name.startswith("project") and "oneDNN off" not in name
                for entry in summary.values())
    rows = [["least cores used by a training fit or window of the project's rows (2 cores)", f"{least:.2f}",
             ">= 1.8"]]
    bare = summaries.get("bare fit")
    if bare:
        ratio = bare["phase2"]["train_s"]["median"] / project["phase2"]["train_s"]["median"]
        rows.append(["project phase-2 training / bare fit of the same network (img/s)", f"{ratio:.2f}", ">= 0.90"])
    naive = summaries.get("naive loop")
    if naive:
        for phase, goal in (("phase2", ">= 2x"), ("phase1", ">= 3x")):
            rows.append([f"{phase} epoch against the naive loop",
                         f"{naive[phase]['epoch_s'] / project[phase]['epoch_s']:.2f}x", goal])
    other = next((name for name in summaries if "determinism" in name), None)
    if other:
        for phase in ("phase1", "phase2"):
            ratio = summaries[other][phase]["train_s"]["median"] / project[phase]["train_s"]["median"]
            rows.append([f"{phase} training speed with determinism {'on' if 'on' in other.split()[-1] else 'off'}"
                         f" against {reference} (params.yaml's setting)", f"{1 / ratio:.2f}x", "(measured)"])
    return rows


def _print_tables(tables: dict) -> None:
    for table in tables.values():
        print(f"\n{table['title']}\n| " + " | ".join(table["columns"]) + " |")
        print("|" + "---|" * len(table["columns"]))
        for row in table["rows"]:
            print("| " + " | ".join(row) + " |")


def _epochs(params) -> dict[str, int]:
    return {"phase1": params.train.phase1.epochs, "phase2": params.train.phase2.epochs}


def retable(path: Path) -> None:
    """Rebuild a results file's tables from the raw rows it keeps (after the tables' code changed), keeping the
    run's provenance and adding when and at which commit the tables were rebuilt."""
    stored = json.loads(path.read_text())
    figures, params = stored["figures"], _benchmark_params()
    repeats = str(figures["repeats"]) if figures["naive_repeats"] == figures["repeats"] or \
        "naive loop" not in figures["rows"] else f"{figures['repeats']} ({figures['naive_repeats']} for the naive loop)"
    figures["tables"] = build_tables(figures["rows"], figures["steps"], params.train.steps_per_epoch,
                                     params.train.batch_size, repeats, reference=next(iter(figures["rows"])),
                                     epochs=_epochs(params))
    now = provenance(["--retable", str(path)])
    stored["provenance"]["tables_rebuilt"] = {key: now[key] for key in ("command", "commit", "dirty", "date")}
    write_json(path, stored)
    _print_tables(figures["tables"])


def _plan(args, params) -> list[dict]:
    rows = [{"name": f"project {precision}", "loop": "project", "precision": precision, "onednn": True,
             "deterministic": params.train.deterministic} for precision in args.precisions.split(",")]
    if not args.skip_determinism:
        other = not params.train.deterministic
        rows.append({"name": f"project float32, determinism {'on' if other else 'off'}", "loop": "project",
                     "precision": "float32", "onednn": True, "deterministic": other})
    if not args.skip_onednn_off:
        rows.append({"name": "project float32, oneDNN off", "loop": "project", "precision": "float32",
                     "onednn": False, "deterministic": params.train.deterministic})
    if not args.skip_bare:
        rows.append({"name": "bare fit", "loop": "bare", "precision": "float32", "onednn": True,
                     "deterministic": params.train.deterministic})
    if not args.skip_naive:
        rows.append({"name": "naive loop", "loop": "naive", "precision": "float32", "onednn": False,
                     "deterministic": params.train.deterministic})
    return [row | {"index": index} for index, row in enumerate(rows)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--real", type=Path, default=None, help="the Kaggle dataset folder (or its Data/)")
    parser.add_argument("--precisions", default="float32,mixed_bfloat16",
                        help="comma-separated policies, float32 first (the reference)")
    parser.add_argument("--steps", type=int, default=None, help="steps an epoch (default: train.steps_per_epoch)")
    parser.add_argument("--repeats", type=int, default=3, help="timed epochs per phase and row (default 3)")
    parser.add_argument("--naive-repeats", type=int, default=None,
                        help="timed epochs per phase of the naive loop (default: --repeats; it is the slow row)")
    parser.add_argument("--skip-naive", action="store_true")
    parser.add_argument("--skip-onednn-off", action="store_true", help="no `project float32, oneDNN off` row")
    parser.add_argument("--skip-bare", action="store_true", help="no `bare fit` row")
    parser.add_argument("--skip-determinism", action="store_true", help="no row with train.deterministic flipped")
    parser.add_argument("--no-results", action="store_true", help="print only; leave docs/results/ alone")
    parser.add_argument("--retable", type=Path, metavar="JSON",
                        help="only rebuild the tables of a results file from the raw rows it keeps")
    parser.add_argument("--worker", choices=("project", "naive", "bare"), help=argparse.SUPPRESS)
    parser.add_argument("--deterministic", choices=("true", "false"), help=argparse.SUPPRESS)
    parser.add_argument("--splits", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    naive_repeats = args.naive_repeats or args.repeats
    if min(args.repeats, naive_repeats) < 1:
        parser.error("--repeats and --naive-repeats must be at least 1")
    if args.retable:
        retable(args.retable)
        return
    if args.worker:
        worker(args.worker, args.precisions, args.deterministic == "true", args.splits, args.steps, args.repeats,
               args.result)
        return

    params = _benchmark_params()
    steps = args.steps or params.train.steps_per_epoch
    size = params.preprocess.image_size
    if args.real:
        train, valid, source = _load_real(args.real, params)
    else:
        train, valid, source = _random_split(613, size, 0), _random_split(72, size, 1), "random images"
    print(f"{params.model.backbone} at {size} px, weights null, batch {params.train.batch_size}, {steps} steps an "
          f"epoch, {args.repeats} epochs per phase and row (naive loop {naive_repeats}); "
          f"{len(train.images)} train / {len(valid.images)} valid "
          f"images ({source})", flush=True)
    plan = _plan(args, params)
    with tempfile.TemporaryDirectory(prefix="chestct-epoch-time-") as scratch:
        splits = Path(scratch) / "processed"
        _save_splits(splits, train, valid)
        rows = {row["name"]: run_row(row, splits, steps, naive_repeats if row["loop"] == "naive" else args.repeats)
                for row in plan}
    repeats = str(args.repeats) if naive_repeats == args.repeats or args.skip_naive else \
        f"{args.repeats} ({naive_repeats} for the naive loop)"
    tables = build_tables(rows, steps, params.train.steps_per_epoch, params.train.batch_size, repeats,
                          reference=plan[0]["name"], epochs=_epochs(params))
    _print_tables(tables)
    if not args.no_results:
        path = write_result("epoch_time", {"tables": tables, "source": source, "steps": steps,
                                           "repeats": args.repeats, "naive_repeats": naive_repeats, "rows": rows})
        print(f"\nwritten: {path}")


if __name__ == "__main__":
    main()
