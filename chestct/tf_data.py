"""The options of every tf.data dataset chestct builds, and in-memory images as such a dataset.

tf.data's autotuning is off. Its model thread sleeps in doubling periods (10 ms, 20 ms, ... up to a minute) and,
on TensorFlow 2.21, destroying an iterator usually waits for the current period to end: every `fit` and `predict`
call and every validation pass ended with both cores idle until the next period boundary (a 7-second fit of 5
steps returned at 10.23 s; a 142-second epoch at 163.8 s). With autotuning off, `tf.data.AUTOTUNE` parallelism
means one call per core and prefetching keeps its own buffer tuning, which is what a 2-core machine wants anyway
(docs/benchmarks.md, "One core or two").
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf


def pipeline_options() -> tf.data.Options:
    """Autotuning off (above), and DATA auto-sharding: under a multi-worker strategy each worker keeps its
    replicas' slices of every global batch."""
    options = tf.data.Options()
    options.autotune.enabled = False
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    return options


def array_batches(images: np.ndarray, batch_size: int) -> tf.data.Dataset:
    """In-memory images in order, batched, with the project's options: what `model.predict` should be given
    instead of a bare array (Keras would build its own dataset, autotuned, and wait at its end)."""
    return tf.data.Dataset.from_tensor_slices(images).batch(batch_size).with_options(pipeline_options())
