"""Does the input pipeline keep the model fed? Training images/s through the real pipeline vs constant tensors.

    python -m benchmarks.train_throughput [--backbone densenet121] [--sizes 256 128] [--steps 20] [--phase 1]
                                          [--processed data/processed]

For each image size: builds the model (weights null), then times `--steps` training steps (after two warm-up
steps that absorb graph tracing) fed (a) by the real tf.data pipeline (balanced batches, augmentation, MixUp)
and (b) by one constant in-memory batch repeated. Prints both rates and their ratio; a ratio near 1 means
the pipeline never starves the model. Uses data/processed/train.npz when it exists at that size, otherwise
random images of the same shape.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np


def _arrays(processed: Path, size: int, count: int = 256):
    from chestct.imaging.processed import SplitArrays, load_split

    path = processed / "train"
    if path.exists():
        arrays = load_split(path)
        if arrays.image_size == size:
            return arrays, "cached data/processed/train"
    rng = np.random.default_rng(0)
    labels = np.arange(count) % 2
    images = rng.integers(0, 256, (count, size, size, 1), dtype=np.uint8)
    return SplitArrays(images=images, labels=labels, subtypes=np.array(["x"] * count),
                       ids=np.array([str(i) for i in range(count)])), "random images"


def _images_per_second(model, dataset, steps: int, batch_size: int) -> float:
    iterator = iter(dataset.repeat())
    for _ in range(2):  # warm-up: graph tracing and the first prefetches
        model.train_on_batch(*next(iterator))
    started = time.perf_counter()
    for _ in range(steps):
        model.train_on_batch(*next(iterator))
    return steps * batch_size / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default="densenet121")
    parser.add_argument("--sizes", type=int, nargs="+", default=[256])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--phase", type=int, choices=(1, 2), default=1, help="1: base frozen, 2: unfrozen")
    parser.add_argument("--processed", type=Path, default=Path("data/processed"))
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    args = parser.parse_args()

    import tensorflow as tf

    from chestct.params import load_params
    from chestct.training.input_pipeline import training_dataset
    from chestct.training.loop import compile_for_phase
    from chestct.training.model import build_model, unfreeze_for_finetuning

    params = load_params(args.params)
    model_params = params.model.model_copy(update={"backbone": args.backbone, "weights": None})
    batch_size = params.train.batch_size
    print(f"{args.backbone}, phase {args.phase}, batch {batch_size}, {args.steps} timed steps")
    print(f"{'size':>6}{'pipeline img/s':>16}{'constant img/s':>16}{'ratio':>8}  data")
    for size in args.sizes:
        arrays, origin = _arrays(args.processed, size)
        model = build_model(model_params, size)
        phase = params.train.phase1
        if args.phase == 2:
            unfreeze_for_finetuning(model, model_params)
            phase = params.train.phase2
        compile_for_phase(model, params, phase)
        pipeline = training_dataset(arrays, params.augment, params.train, params.seed)
        images, labels = next(iter(pipeline))
        constant = tf.data.Dataset.from_tensors((images, labels))
        real_rate = _images_per_second(model, pipeline, args.steps, batch_size)
        constant_rate = _images_per_second(model, constant, args.steps, batch_size)
        print(f"{size:>6}{real_rate:>16.1f}{constant_rate:>16.1f}{real_rate / constant_rate:>8.2f}  {origin}")


if __name__ == "__main__":
    main()
