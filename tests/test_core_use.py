"""Every core, every step: the project's datasets release their iterators at once, and training says how many
cores its steps kept busy (chestct.training.input_pipeline, "Options"; chestct.training.pace)."""

from __future__ import annotations

import time

import pytest
import tensorflow as tf

from chestct.tf_data import array_batches
from chestct.training.input_pipeline import training_dataset, validation_dataset
from chestct.training.lesion_pool import LesionPool
from chestct.training.pace import MIN_CORE_SHARE, CorePace, under_used_warning
from tests.test_input_pipeline import make_arrays, train_params


@pytest.fixture(scope="module")
def project_datasets(original_params, default_params) -> dict[str, tf.data.Dataset]:
    arrays = make_arrays()
    settings = train_params(default_params.train)
    return {
        "training": training_dataset(arrays, original_params.augment, settings, 0),
        "training with lesion targets": training_dataset(arrays, original_params.augment, settings, 0,
                                                         lesion_pool=LesionPool()),
        "validation": validation_dataset(arrays, 8),
        "in-memory batches": array_batches(arrays.images, 8),
    }


def test_every_dataset_the_project_builds_has_autotuning_off(project_datasets):
    for name, dataset in project_datasets.items():
        options = dataset.options()
        assert options.autotune.enabled is False, name
        assert options.experimental_distribute.auto_shard_policy == tf.data.experimental.AutoShardPolicy.DATA, name


def _seconds_to_release(dataset: tf.data.Dataset, consume_s: float = 1.5) -> float:
    """Consume `dataset` (repeated) for `consume_s`, then time the iterator's destruction."""
    iterator = iter(dataset.repeat())
    started = time.perf_counter()
    while time.perf_counter() - started < consume_s:
        next(iterator)
    started = time.perf_counter()
    del iterator
    return time.perf_counter() - started


def test_a_project_iterator_is_released_at_once(project_datasets):
    # TensorFlow 2.21 with autotuning on: its thread sleeps 10 ms, 20 ms, 40 ms, ... and an iterator's destructor
    # usually waits for the current sleep to end; after 1.5 s of use that is the boundary at 2.55 s, about 1 s of
    # idle cores (measured here: 2 of 3 destructions waited 1.04 s, the third returned at once). Every fit, predict
    # and validation pass ended that way before chestct turned autotuning off, so three releases in a row under
    # 0.2 s say it is off in practice, not only in the options.
    for name in ("validation", "training"):
        assert max(_seconds_to_release(project_datasets[name]) for _ in range(3)) < 0.2, name


def test_the_guard_judges_the_share_of_cores():
    assert under_used_warning(1.87, 2) is None
    warning = under_used_warning(1.05, 2)
    assert warning is not None and "1.05 of 2 cores" in warning and f"{MIN_CORE_SHARE * 2:.2f}" in warning
    assert under_used_warning(0.9, 1) is None


class _FakeClock:
    """Stands in for the wall and CPU clocks CorePace reads, so an epoch's figures are known exactly."""

    def __init__(self):
        self.wall = self.cpu = 0.0

    def advance(self, wall: float, cpu: float) -> None:
        self.wall += wall
        self.cpu += cpu


@pytest.mark.parametrize(("epoch", "step_s", "cores_used", "warned"), [
    (1, 1.0, 1.05, True),     # a compute-bound epoch on about one core of two
    (1, 1.0, 1.88, False),    # both cores busy
    (0, 1.0, 1.05, False),    # the first epoch traces the graph on one thread
    (1, 0.05, 1.05, False),   # steps too short to be compute-bound
])
def test_the_guard_warns_only_for_a_compute_bound_epoch_on_too_few_cores(monkeypatch, epoch, step_s, cores_used,
                                                                          warned):
    from chestct.training import pace as pace_module

    clock = _FakeClock()
    monkeypatch.setattr(pace_module.time, "perf_counter", lambda: clock.wall)
    monkeypatch.setattr(pace_module, "process_cpu_seconds", lambda: clock.cpu)
    pace = CorePace(images_per_step=16, steps_per_epoch=10, cores=2)
    pace.on_epoch_begin(epoch)
    clock.advance(wall=10 * step_s, cpu=10 * step_s * cores_used)
    pace.on_epoch_end(epoch)
    assert pace.images_per_s == pytest.approx(16 / step_s)
    assert pace.cores_used == pytest.approx(cores_used)
    assert (pace.warning is not None) == warned


def test_the_guard_measures_the_training_steps_of_a_real_fit(project_datasets, default_params):
    import keras

    model = keras.Sequential([keras.Input((48, 48, 1)), keras.layers.Conv2D(4, 3),
                              keras.layers.GlobalAveragePooling2D(), keras.layers.Dense(1, activation="sigmoid")])
    model.compile("adam", "binary_crossentropy")
    pace = CorePace(images_per_step=16, steps_per_epoch=5, cores=2)
    model.fit(project_datasets["training"], epochs=2, steps_per_epoch=5, callbacks=[pace], verbose=0)
    assert pace.images_per_s > 0 and pace.cores_used > 0
    assert pace.describe().endswith("of 2 cores")
