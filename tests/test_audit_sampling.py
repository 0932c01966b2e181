"""The audits' train sample (evaluate.audit_max_train_images): all rows when it fits, else a seeded sample that
keeps the class shares, read from the shards row by row."""

from __future__ import annotations

import numpy as np
import pytest

from chestct.evaluation.sampling import audit_rows
from chestct.imaging.processed import load_split, save_processed
from chestct.params import EvaluateParams
from tests.test_shards import make_split

LABELS = np.array([0] * 300 + [1] * 700)[np.random.default_rng(3).permutation(1000)]


@pytest.mark.parametrize("cap", [None, 1000, 5000])
def test_a_cap_at_or_above_the_split_keeps_every_row_in_order(cap):
    np.testing.assert_array_equal(audit_rows(LABELS, cap, seed=42), np.arange(1000))


def test_a_cap_below_the_split_keeps_the_class_shares():
    rows = audit_rows(LABELS, 100, seed=42)
    assert len(rows) == 100 and len(np.unique(rows)) == 100 and np.all(np.diff(rows) > 0)
    assert np.sum(LABELS[rows] == 0) == 30 and np.sum(LABELS[rows] == 1) == 70


def test_the_sample_is_seeded():
    np.testing.assert_array_equal(audit_rows(LABELS, 100, seed=42), audit_rows(LABELS, 100, seed=42))
    assert not np.array_equal(audit_rows(LABELS, 100, seed=42), audit_rows(LABELS, 100, seed=43))


def test_a_rare_class_keeps_at_least_one_image():
    labels = np.array([0] + [1] * 999)
    rows = audit_rows(labels, 10, seed=0)
    assert 0 in rows and set(labels[rows].tolist()) == {0, 1}


def test_the_param_defaults_to_every_image_and_refuses_a_cap_below_two(default_params):
    settings = default_params.evaluate.model_dump()
    assert EvaluateParams(**{k: v for k, v in settings.items() if k != "audit_max_train_images"}) \
        .audit_max_train_images is None
    with pytest.raises(ValueError, match="audit_max_train_images"):
        EvaluateParams(**{**settings, "audit_max_train_images": 1})


def test_taking_rows_from_shards_reads_exactly_those_rows(tmp_path):
    arrays = make_split()
    save_processed(tmp_path, {"train": arrays}, shard_images=4)
    split = load_split(tmp_path / "train")
    rows = audit_rows(split.labels, 10, seed=1)
    taken = split.take(rows)
    assert isinstance(taken.images, np.ndarray) and len(taken) == 10
    np.testing.assert_array_equal(taken.images, arrays["images"][rows])
    np.testing.assert_array_equal(taken.unstandardised, arrays["unstandardised"][rows])
    assert taken.ids.tolist() == arrays["ids"][rows].tolist()
    assert taken.labels.tolist() == arrays["labels"][rows].tolist()


def test_evaluation_can_open_a_split_without_its_unstandardised_images(tmp_path):
    """Evaluation and export read the model's input only: the unstandardised shards are not opened or read."""
    arrays = make_split()
    save_processed(tmp_path, {"train": arrays}, shard_images=4)
    split = load_split(tmp_path / "train", unstandardised=False)
    assert split.unstandardised is None and load_split(tmp_path / "train").unstandardised is not None
    taken = split.take(audit_rows(split.labels, 10, seed=1))
    assert taken.unstandardised is None
    np.testing.assert_array_equal(split.in_memory().images, arrays["images"])
