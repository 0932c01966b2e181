"""Training-phase pieces: the exact validation AUC callback, precision choice, single-class validation."""

from __future__ import annotations

import keras
import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from chestct.imaging.processed import SplitArrays
from chestct.training.input_pipeline import validation_dataset
from chestct.training.loop import TrainingError, ValidationAUC, _check_validation, resolve_precision
from chestct.training.losses import BinaryFocalLoss


def _arrays(labels):
    rng = np.random.default_rng(0)
    labels = np.asarray(labels)
    images = rng.integers(0, 256, (len(labels), 8, 8, 1), dtype=np.uint8)
    images[labels == 1, :4] = 255  # a learnable difference, so predictions vary with the label
    return SplitArrays(images=images, labels=labels, subtypes=np.array(["x"] * len(labels)),
                       ids=np.array([f"{i}" for i in range(len(labels))]))


def test_validation_auc_is_the_exact_auc_over_the_whole_set():
    arrays = _arrays([0, 1] * 10 + [1] * 5)
    model = keras.Sequential([keras.Input((8, 8, 1)), keras.layers.Flatten(),
                              keras.layers.Dense(1, activation="sigmoid")])
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss="binary_crossentropy")
    callback = ValidationAUC(validation_dataset(arrays, batch_size=4), BinaryFocalLoss())
    callback.set_model(model)
    logs = {"loss": 1.0}
    callback.on_epoch_end(0, logs)
    scores = model.predict(arrays.images.astype("float32"), verbose=0).ravel()
    assert logs["val_auc"] == pytest.approx(roc_auc_score(arrays.labels, scores), abs=1e-9)
    assert np.isfinite(logs["val_loss"]) and logs["learning_rate"] == pytest.approx(1e-3)


def test_single_class_validation_is_refused():
    with pytest.raises(TrainingError, match="only one class"):
        _check_validation(_arrays([1, 1, 1]))


def test_precision_choice(monkeypatch):
    import chestct.training.loop as training

    assert resolve_precision("float32") == "float32"
    assert resolve_precision("mixed_bfloat16") == "mixed_bfloat16"
    # auto: float16 on a GPU, bfloat16 on a CPU with bfloat16 instructions, else float32
    monkeypatch.setattr(training.tf.config, "list_physical_devices", lambda kind=None: [])
    monkeypatch.setattr(training, "cpu_supports_bfloat16", lambda: True)
    assert resolve_precision("auto") == "mixed_bfloat16"
    monkeypatch.setattr(training, "cpu_supports_bfloat16", lambda: False)
    assert resolve_precision("auto") == "float32"
    monkeypatch.setattr(training.tf.config, "list_physical_devices", lambda kind=None: ["GPU:0"])
    assert resolve_precision("auto") == "mixed_float16"


def test_mirrored_strategy_runs_on_a_cpu_only_machine():
    """train.distribute: mirrored uses every visible GPU; without one it must still train on one replica."""
    from chestct.training.distribute import make_strategy

    strategy, chief = make_strategy("mirrored")
    assert strategy.num_replicas_in_sync >= 1 and chief
    arrays = _arrays([0, 1] * 8)
    with strategy.scope():
        model = keras.Sequential([keras.Input((8, 8, 1)), keras.layers.Flatten(),
                                  keras.layers.Dense(1, activation="sigmoid")])
        model.compile(optimizer=keras.optimizers.Adam(1e-2), loss=BinaryFocalLoss())
    history = model.fit(arrays.images.astype("float32"), arrays.labels.astype("float32"), epochs=2,
                        batch_size=8, verbose=0)
    assert all(np.isfinite(history.history["loss"]))
