"""Where training runs: one process, every GPU of one host, or every worker named in TF_CONFIG.

`train.distribute`:
- `none`: TensorFlow's default strategy (one process, one device).
- `mirrored`: `tf.distribute.MirroredStrategy`, every visible GPU on this host (one CPU replica where none).
- `multi_worker`: `tf.distribute.MultiWorkerMirroredStrategy` over the cluster in the `TF_CONFIG` environment
  variable, the one every TensorFlow launcher sets (Kubernetes training operators, Vertex AI, SageMaker). Every
  worker runs the same stage; the chief (task `chief`, or `worker` 0 when the cluster names no chief) is the only
  one that writes models, metrics and dvclive logs.
"""

from __future__ import annotations

import hashlib
import json
import os

import numpy as np
import tensorflow as tf

from chestct.errors import ChestctError

TF_CONFIG = "TF_CONFIG"


class DistributeError(ChestctError, ValueError):
    """train.distribute asks for a cluster the environment does not describe."""


class _KerasMultiWorkerStrategy(tf.distribute.MultiWorkerMirroredStrategy):
    """MultiWorkerMirroredStrategy with the `reduce` Keras 3 calls while it builds and logs.

    Keras 3.15's `fit` reduces a whole (x, y) batch structure at once, and the scalar loss with `axis=0`; the
    collective strategy takes neither (keras-team/keras#20585). Reducing leaf by leaf, with no axis for a scalar,
    is what those calls mean; every other use of the strategy is untouched.
    """

    def reduce(self, reduce_op, value, axis):
        def reduce_one(leaf):
            local = self.experimental_local_results(leaf)[0]
            scalar = getattr(local, "shape", None) is not None and local.shape.rank == 0
            return super(_KerasMultiWorkerStrategy, self).reduce(reduce_op, leaf, None if scalar else axis)

        return tf.nest.map_structure(reduce_one, value)


def cluster_from_environment() -> dict:
    """TF_CONFIG, parsed and checked: a cluster with workers, and this process's task in it."""
    raw = os.environ.get(TF_CONFIG, "").strip()
    how = (f"set {TF_CONFIG} on every worker, e.g. "
           '{"cluster": {"worker": ["host1:2222", "host2:2222"]}, "task": {"type": "worker", "index": 0}} '
           '(docs/scaling.md), or use train.distribute: none')
    if not raw:
        raise DistributeError(f"train.distribute is multi_worker but {TF_CONFIG} is not set; {how}")
    try:
        config = json.loads(raw)
        cluster, task = config["cluster"], config["task"]
        members = cluster[task["type"]]
        index = int(task["index"])
    except (ValueError, KeyError, TypeError) as exc:
        raise DistributeError(f"{TF_CONFIG} is not a cluster description ({type(exc).__name__}: {exc}); "
                              f"{how}") from None
    if not 0 <= index < len(members):
        raise DistributeError(f"{TF_CONFIG}: task {task['type']} {index} is not in the cluster's "
                              f"{len(members)} {task['type']} address(es); {how}")
    return config


def is_chief_task(config: dict | None) -> bool:
    """The chief writes; with no chief in the cluster, worker 0 is the chief (TensorFlow's convention)."""
    if config is None:
        return True
    task_type, index = config["task"]["type"], int(config["task"]["index"])
    if task_type == "chief":
        return True
    return task_type == "worker" and index == 0 and "chief" not in config["cluster"]


def make_strategy(distribute: str) -> tuple[tf.distribute.Strategy, bool]:
    """The strategy for `train.distribute`, and whether this process is the one that writes.

    Call it before any other TensorFlow op: a collective strategy must set up the runtime itself.
    """
    if distribute == "multi_worker":
        config = cluster_from_environment()
        return _KerasMultiWorkerStrategy(), is_chief_task(config)
    if distribute == "mirrored":
        return tf.distribute.MirroredStrategy(), True
    return tf.distribute.get_strategy(), True


def weights_digest(weights: list) -> str:
    """A short SHA-256 of the trainable weights' bytes: equal on every worker when they trained in lockstep."""
    digest = hashlib.sha256()
    for weight in weights:
        digest.update(np.ascontiguousarray(np.asarray(weight), dtype=np.float32).tobytes())
    return digest.hexdigest()[:16]
