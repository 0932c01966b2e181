"""How fast an epoch trains and how many cores it keeps busy: the guard against a training that idles.

Training on a CPU is compute-bound: every training step keeps every core busy, so the process's CPU time over
the wall time of the training steps should be close to the number of cores it may run on. When it is well under
(the cores wait on something: an input pipeline, a lock, a sleeping thread), the epoch is slower than it need be
and its timings mean nothing; `CorePace` says so in the epoch's line instead of leaving it to be found by chance.
(It once found this: tf.data's autotuning thread kept both cores idle at the end of every fit and validation
pass, chestct.tf_data.)
"""

from __future__ import annotations

import os
import time

import keras

# Below this share of the available cores, a training epoch is reported as under-using the machine. Healthy
# epochs measured here keep 0.93-0.96 of 2 cores busy; the idling epochs the guard exists for kept 0.52-0.66.
MIN_CORE_SHARE = 0.75
# Steps shorter than this are not judged: with a tiny model or image, per-step Python overhead, not arithmetic,
# sets the pace, and a low share says nothing about idle cores (the default model's steps take 1-1.5 s here).
MIN_STEP_SECONDS = 0.25


def available_cores() -> int:
    """The cores this process may run on (its CPU affinity), which may be fewer than the machine has."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def process_cpu_seconds() -> float:
    """CPU time of every thread of this process, user and system."""
    return time.process_time()


class CorePace(keras.callbacks.Callback):
    """Measures each epoch's training steps (not its validation): images/s and CPU time over wall time.

    Put it FIRST in the callback list: its `on_epoch_end` then runs before the validation pass, which other
    callbacks run in theirs. The figures of the last epoch are in `seconds` (its training steps' wall time),
    `images_per_s`, `cores_used` and `warning`.
    """

    def __init__(self, images_per_step: int, steps_per_epoch: int, cores: int | None = None):
        super().__init__()
        self.images_per_step, self.steps_per_epoch = images_per_step, steps_per_epoch
        self.cores = cores or available_cores()
        self.seconds = self.images_per_s = self.cores_used = float("nan")
        self.warning: str | None = None

    def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
        self._wall, self._cpu = time.perf_counter(), process_cpu_seconds()

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        self.seconds = wall = time.perf_counter() - self._wall
        self.images_per_s = self.images_per_step * self.steps_per_epoch / wall
        self.cores_used = (process_cpu_seconds() - self._cpu) / wall
        # the first epoch also traces the training step's graph, on one thread
        judged = epoch > 0 and wall / self.steps_per_epoch >= MIN_STEP_SECONDS
        self.warning = under_used_warning(self.cores_used, self.cores) if judged else None

    def describe(self) -> str:
        """e.g. "11.2 img/s on 1.87 of 2 cores" (for the epoch's line)."""
        return f"{self.images_per_s:.1f} img/s on {self.cores_used:.2f} of {self.cores} cores"


def under_used_warning(cores_used: float, cores: int) -> str | None:
    """The warning for a compute-bound epoch that kept `cores_used` of `cores` busy, or None when that is as it
    should be."""
    if cores_used >= MIN_CORE_SHARE * cores:
        return None
    return (f"warning: the training steps kept {cores_used:.2f} of {cores} cores busy (expected at least "
            f"{MIN_CORE_SHARE * cores:.2f}); something idles the CPU or competes for it: another process "
            f"(check `top`), or a wait in the input pipeline (docs/benchmarks.md, \"One core or two\")")
