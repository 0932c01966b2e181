"""Saved models keep loading, and every export format in the registry round-trips.

tests/fixtures/model_before_package_move.keras was saved by main at 794138b, before the flat chestct/ modules
became stage packages: a tiny classifier (16 px, a two-layer "backbone") holding every custom object chestct
registers (BackbonePreprocessing, ChannelAttention, SpatialAttention, compiled with BinaryFocalLoss). Its .npz
holds eight test images and the probabilities that commit computed for them. Keras finds custom objects by their
registered names ("chestct>ChannelAttention", ...), not by module path: this test fails if a rename breaks that.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from chestct.export.formats import FORMAT_ORDER, FORMATS, open_exported, write_artifacts
from chestct.training.model import load_trained_model

FIXTURES = Path(__file__).parent / "fixtures"
OLD_MODEL = FIXTURES / "model_before_package_move.keras"


@pytest.fixture(scope="module")
def old_model():
    return load_trained_model(OLD_MODEL)


@pytest.fixture(scope="module")
def reference():
    with np.load(FIXTURES / "model_before_package_move.npz") as saved:
        return saved["images"], saved["probabilities"]


def test_a_model_saved_before_the_package_move_loads_and_predicts_the_same(old_model, reference):
    from chestct.training.layers import BackbonePreprocessing, ChannelAttention, SpatialAttention

    images, probabilities = reference
    np.testing.assert_allclose(old_model.predict(images, verbose=0).ravel(), probabilities, atol=1e-6)
    assert isinstance(old_model.get_layer("preprocessing"), BackbonePreprocessing)
    assert isinstance(old_model.get_layer("channel_attention"), ChannelAttention)
    assert isinstance(old_model.get_layer("spatial_attention"), SpatialAttention)


def test_the_registry_order_is_the_predictors_default_and_names_are_unique():
    assert tuple(FORMATS) == FORMAT_ORDER and FORMAT_ORDER[0] == "keras"
    assert len({fmt.file_name for fmt in FORMATS.values()}) == len(FORMATS)


@pytest.mark.parametrize("name", list(FORMATS))
def test_every_registered_format_writes_loads_and_matches_keras(old_model, reference, tmp_path, name, default_params):
    """A new registry entry is exercised here without any other edit: written, digested, loaded, compared."""
    images, _ = reference
    fmt = FORMATS[name]
    paths = write_artifacts(old_model, tmp_path, [name])
    assert paths == {name: tmp_path / fmt.file_name} and paths[name].exists()
    digest, size = fmt.digest(paths[name])
    assert len(digest) == 64 and size > 0
    loaded = open_exported(name, paths[name])
    expected = old_model.predict(images, verbose=0).ravel()
    tolerance = default_params.export.quantized_tolerance if fmt.quantized else default_params.export.float_tolerance
    np.testing.assert_allclose(loaded.predict(images), expected, atol=tolerance)
    assert (loaded.keras_model is not None) == fmt.gives_keras_model
