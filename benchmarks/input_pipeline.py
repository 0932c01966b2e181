"""Images per second the input pipeline alone delivers, with the project's dataset options and with tf.data's
autotuning turned back on: does turning it off (chestct.tf_data) cost the pipeline anything?

    python -m benchmarks.input_pipeline [--real ../shared/data/chest-ctscan-images] [--batches 60] [--rounds 3]
                                        [--no-results]

No model: each round draws `--batches` training batches (balanced, augmented, MixUp: params.yaml's settings at
its image size) and one validation pass from a fresh iterator, under each setting in turn, so both see the same
machine state; the figures are the median and range over the rounds. The time to release each iterator is
reported too: with autotuning on it is where the cores used to idle. Written to docs/results/input_pipeline.json.

Images: `--real DIR` preprocesses the Kaggle train/valid folders; otherwise random images of the same size and
count (613 train, 72 valid).
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

from benchmarks.epoch_time import _benchmark_params, _load_real, _random_split
from benchmarks.results import write_result


def _draw(dataset, batches: int | None, images_per_batch: int | None) -> tuple[float, float]:
    """(images/s over `batches` batches, or the whole dataset when None; seconds to release the iterator)."""
    iterator = iter(dataset)
    count, started = 0, time.perf_counter()
    for index, batch in enumerate(iterator):
        images = batch[0]
        count += int(images.shape[0]) if images_per_batch is None else images_per_batch
        if batches is not None and index + 1 >= batches:
            break
    rate = count / (time.perf_counter() - started)
    started = time.perf_counter()
    del iterator
    return rate, time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--real", type=Path, default=None, help="the Kaggle dataset folder (or its Data/)")
    parser.add_argument("--batches", type=int, default=60, help="training batches drawn per round (default 60)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--no-results", action="store_true", help="print only; leave docs/results/ alone")
    args = parser.parse_args()

    import tensorflow as tf

    from chestct.training.input_pipeline import training_dataset, validation_dataset

    params = _benchmark_params()
    size = params.preprocess.image_size
    if args.real:
        train, valid, source = _load_real(args.real, params)
    else:
        train, valid, source = _random_split(613, size, 0), _random_split(72, size, 1), "random images"
    autotuned = tf.data.Options()
    autotuned.autotune.enabled = True
    settings = {"chestct (autotuning off)": lambda dataset: dataset,
                "autotuning on": lambda dataset: dataset.with_options(autotuned)}
    figures = {name: {"train": [], "valid": [], "release": []} for name in settings}
    print(f"{size} px, batch {params.train.batch_size}, {args.batches} training batches and one validation pass "
          f"per round, {args.rounds} rounds ({source})", flush=True)
    for round_index in range(args.rounds):
        for name, configure in settings.items():
            data = configure(training_dataset(train, params.augment, params.train, params.seed + round_index))
            rate, release = _draw(data.repeat(), args.batches, params.train.batch_size)
            valid_rate, valid_release = _draw(configure(validation_dataset(valid, params.train.validation_batch_size)),
                                              None, None)
            figures[name]["train"].append(rate)
            figures[name]["valid"].append(valid_rate)
            figures[name]["release"].append(max(release, valid_release))
            print(f"round {round_index + 1}, {name}: training {rate:.0f} img/s, validation {valid_rate:.0f} img/s, "
                  f"release {release:.2f} s / {valid_release:.2f} s", flush=True)

    def spread(values: list[float], digits: int = 0) -> str:
        return f"{statistics.median(values):.{digits}f} ({min(values):.{digits}f}-{max(values):.{digits}f})"

    rows = [[name, spread(entry["train"]), spread(entry["valid"]), spread(entry["release"], 2)]
            for name, entry in figures.items()]
    table = {"title": f"The input pipeline alone at {size} px: images/s, median (range) over {args.rounds} rounds",
             "columns": ["dataset options", "training batches (augmented, MixUp) img/s", "validation img/s",
                         "longest iterator release s"],
             "rows": rows,
             "notes": "No model: what the pipeline can deliver on its own, to compare with what a training step "
                      "consumes (benchmarks.epoch_time, img/s)."}
    print("\n| " + " | ".join(table["columns"]) + " |\n|" + "---|" * len(table["columns"]))
    for row in rows:
        print("| " + " | ".join(row) + " |")
    if not args.no_results:
        print(f"\nwritten: {write_result('input_pipeline', {'tables': {'throughput': table}, 'raw': figures})}")


if __name__ == "__main__":
    main()
