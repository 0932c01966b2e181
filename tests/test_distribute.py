"""train.distribute: reading TF_CONFIG, who the chief is, and the errors a wrong cluster gets.

The two-worker training itself is tests/test_multi_worker.py (e2e: it starts real worker processes).
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from chestct.training.distribute import (
    DistributeError,
    cluster_from_environment,
    is_chief_task,
    make_strategy,
    weights_digest,
)


def _config(task_type: str, index: int, chief: bool = False) -> dict:
    cluster = {"worker": ["127.0.0.1:2222", "127.0.0.1:2223"]}
    if chief:
        cluster["chief"] = ["127.0.0.1:2221"]
    return {"cluster": cluster, "task": {"type": task_type, "index": index}}


@pytest.mark.parametrize(("task_type", "index", "has_chief", "expected"), [
    ("worker", 0, False, True),   # no chief in the cluster: worker 0 writes
    ("worker", 1, False, False),
    ("worker", 0, True, False),   # a named chief writes, worker 0 does not
    ("chief", 0, True, True),
])
def test_the_chief_is_the_named_chief_or_else_worker_zero(task_type, index, has_chief, expected):
    assert is_chief_task(_config(task_type, index, has_chief)) is expected
    assert is_chief_task(None) is True  # one process: it writes


def test_a_missing_tf_config_names_the_variable_and_the_way_out(monkeypatch):
    monkeypatch.delenv("TF_CONFIG", raising=False)
    with pytest.raises(DistributeError, match=r"multi_worker but TF_CONFIG is not set.*train.distribute: none"):
        make_strategy("multi_worker")


@pytest.mark.parametrize(("value", "message"), [
    ("{not json", "not a cluster description"),
    (json.dumps({"cluster": {"worker": ["a:1"]}}), r"not a cluster description \(KeyError: 'task'\)"),
    (json.dumps({"cluster": {"worker": ["a:1"]}, "task": {"type": "ps", "index": 0}}), "KeyError: 'ps'"),
    (json.dumps(_config("worker", 2)), r"task worker 2 is not in the cluster's 2 worker"),
])
def test_a_malformed_tf_config_is_named(monkeypatch, value, message):
    monkeypatch.setenv("TF_CONFIG", value)
    with pytest.raises(DistributeError, match=message):
        cluster_from_environment()


def test_tf_config_is_read_from_the_environment(monkeypatch):
    monkeypatch.setenv("TF_CONFIG", json.dumps(_config("worker", 1)))
    assert cluster_from_environment()["task"] == {"type": "worker", "index": 1}


def test_the_weights_digest_changes_with_any_weight():
    weights = [np.zeros((3, 2), np.float32), np.ones(2, np.float32)]
    changed = [weights[0].copy(), weights[1].copy()]
    changed[1][0] += 1e-7
    assert weights_digest(weights) == weights_digest([w.copy() for w in weights])
    assert weights_digest(weights) != weights_digest(changed)
