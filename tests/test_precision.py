"""Mixed precision: a few real training steps under each `train.precision` policy, then save, reload and export.

Under every policy the loss must stay finite, the saved model must reload and predict float32 probabilities
from uint8 images, and the exported formats must keep those dtypes and agree with the Keras model.
"""

from __future__ import annotations

import keras
import numpy as np
import pytest

from chestct.imaging.processed import SplitArrays
from chestct.training.input_pipeline import training_dataset
from chestct.training.loop import compile_for_phase, configure_precision
from chestct.training.model import PREDICTION_NAME, build_model, load_trained_model

SIZE = 32
POLICIES = ["float32", "mixed_bfloat16", "mixed_float16"]  # `auto` resolves to one of these (test_training.py)


@pytest.fixture()
def params(default_params):
    model = default_params.model.model_copy(update={
        "backbone": "mobilenetv3small", "weights": None,
        "head": default_params.model.head.model_copy(update={"units": [8]})})
    train = default_params.train.model_copy(update={"batch_size": 8, "steps_per_epoch": 3})
    return default_params.model_copy(update={"model": model, "train": train})


@pytest.fixture()
def arrays() -> SplitArrays:
    rng = np.random.default_rng(0)
    count = 16
    return SplitArrays(images=rng.integers(0, 256, (count, SIZE, SIZE, 1), dtype=np.uint8),
                       labels=np.arange(count) % 2, subtypes=np.array(["x"] * count),
                       ids=np.array([f"{i}.png" for i in range(count)]))


@pytest.fixture(autouse=True)
def restore_policy():
    yield
    keras.mixed_precision.set_global_policy("float32")


@pytest.mark.parametrize("precision", POLICIES)
def test_training_steps_under_each_policy_then_reload_in_float32(precision, params, arrays, tmp_path):
    policy = configure_precision(precision)
    keras.utils.set_random_seed(0)
    model = build_model(params.model, SIZE)
    assert model.get_layer(PREDICTION_NAME).compute_dtype == "float32"  # the output layer stays float32
    compute = {"float32": "float32", "mixed_bfloat16": "bfloat16", "mixed_float16": "float16"}[policy]
    assert model.get_layer("head_dense_0").compute_dtype == compute

    compile_for_phase(model, params, params.train.phase1)
    dataset = training_dataset(arrays, params.augment, params.train, seed=0)
    history = model.fit(dataset, epochs=1, steps_per_epoch=params.train.steps_per_epoch, verbose=0)
    assert np.all(np.isfinite(history.history["loss"])), history.history

    path = tmp_path / "model.keras"
    model.save(path)
    expected = np.asarray(model.predict(arrays.images, verbose=0))
    keras.mixed_precision.set_global_policy("float32")
    reloaded = load_trained_model(path)
    scores = np.asarray(reloaded.predict(arrays.images, verbose=0))
    assert reloaded.inputs[0].dtype == "uint8"
    assert scores.dtype == np.float32 and scores.shape == (len(arrays.images), 1)
    assert np.all((scores >= 0) & (scores <= 1))
    np.testing.assert_allclose(scores, expected, atol=1e-6)


@pytest.mark.parametrize("precision", ["mixed_bfloat16"])  # float16 takes the same path
def test_a_mixed_precision_model_exports_with_the_same_dtypes_and_parity(precision, params, arrays, tmp_path):
    """As the export stage does: a float32 copy of the trained weights is exported (TFLite has no bfloat16)."""
    from chestct.export.formats import open_exported, write_artifacts
    from chestct.training.model import compute_dtypes, float32_copy

    configure_precision(precision)
    keras.utils.set_random_seed(1)
    trained = build_model(params.model, SIZE)
    mixed_scores = np.asarray(trained.predict(arrays.images, verbose=0)).ravel()
    keras.mixed_precision.set_global_policy("float32")  # as in the export stage's process
    model = float32_copy(trained)
    assert len(compute_dtypes(trained)) == 2 and compute_dtypes(model) == {"float32"}
    reference = np.asarray(model.predict(arrays.images, verbose=0)).ravel()
    # The same weights: float32 arithmetic differs from the mixed one by rounding only.
    np.testing.assert_allclose(reference, mixed_scores, atol=params.export.quantized_tolerance)
    paths = write_artifacts(model, tmp_path / "export", ["keras", "savedmodel", "tflite_float32"])

    import tensorflow as tf

    interpreter = tf.lite.Interpreter(model_path=str(paths["tflite_float32"]))
    assert interpreter.get_input_details()[0]["dtype"] == np.uint8
    assert interpreter.get_output_details()[0]["dtype"] == np.float32
    for name, path in paths.items():
        scores = open_exported(name, path).predict(arrays.images)
        np.testing.assert_allclose(scores, reference, atol=params.export.float_tolerance, err_msg=name)
