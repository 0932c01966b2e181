"""The classifier: uint8 input, attention that is trained and saved, save/load, the unfreeze rule, weights errors.

Models are built with random weights at 32 px (the smallest size every backbone accepts) to stay fast.
"""

from __future__ import annotations

import urllib.error

import keras
import numpy as np
import pytest

from chestct.params import ModelParams
from chestct.training.backbones import BACKBONES, UnknownBackboneError, WeightsUnavailableError, keras_weights_cache
from chestct.training.layers import BackbonePreprocessing, ChannelAttention, SpatialAttention
from chestct.training.model import (
    backbone_layers,
    backbone_of,
    build_model,
    last_conv_layer_name,
    layers_to_unfreeze,
    unfreeze_for_finetuning,
)

SIZE = 32


def small_params(default_params, backbone: str, weights: str | None = None,
                 batchnorm: str = "frozen") -> ModelParams:
    """params.yaml's model section with a given backbone, a one-layer head and no download.

    Backbone BatchNorm is `frozen` (the policy for pretrained weights) unless a test asks otherwise.
    """
    model = default_params.model
    head = model.head.model_copy(update={"units": [8]})
    backbone_batchnorm = model.backbone_batchnorm.model_copy(update={"mode": batchnorm})
    return model.model_copy(update={"backbone": backbone, "weights": weights, "head": head,
                                    "backbone_batchnorm": backbone_batchnorm})


def uint8_batch(count: int = 4, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (count, SIZE, SIZE, 1), dtype=np.uint8)


def predict(model: keras.Model, images: np.ndarray):
    """An eager inference call: the same numbers as model.predict without seconds of graph tracing."""
    outputs = model(images, training=False)
    if isinstance(outputs, list | tuple):
        return [keras.ops.convert_to_numpy(output) for output in outputs]
    return keras.ops.convert_to_numpy(outputs)


@pytest.fixture(scope="module")
def densenet(default_params) -> keras.Model:
    # DenseNet121 with random weights gives varied outputs (MobileNetV3's random features are all ~0).
    return build_model(small_params(default_params, "densenet121"), SIZE)


@pytest.fixture(scope="module")
def mobilenet_params(default_params) -> ModelParams:
    return small_params(default_params, "mobilenetv3small")


# --- input -----------------------------------------------------------------------------------------------


def test_model_takes_the_cached_uint8_grayscale_image(densenet):
    image = densenet.inputs[0]
    assert image.dtype == "uint8"
    assert tuple(image.shape) == (None, SIZE, SIZE, 1)
    predictions = predict(densenet, uint8_batch())
    assert predictions.shape == (4, 1)
    assert predictions.dtype == np.float32
    assert np.all((predictions > 0) & (predictions < 1))
    assert np.ptp(predictions) > 0, "different images should give different outputs"


@pytest.mark.parametrize(
    ("mode", "reference"),
    [
        ("torch", keras.applications.densenet.preprocess_input),
        ("caffe", keras.applications.resnet50.preprocess_input),
        ("raw", lambda rgb: rgb),
    ],
)
def test_preprocessing_matches_the_backbone_own_preprocess_input(mode, reference):
    gray = np.array([[[[0], [1]], [[128], [255]]]], dtype=np.uint8)
    rgb = np.repeat(gray.astype("float32"), 3, axis=-1)
    ours = keras.ops.convert_to_numpy(BackbonePreprocessing(mode)(gray))
    assert ours.shape == (1, 2, 2, 3)
    np.testing.assert_allclose(ours, reference(rgb.copy()), rtol=1e-5, atol=1e-5)


# --- attention -------------------------------------------------------------------------------------------


def test_attention_weights_are_counted_and_trainable_while_the_backbone_is_frozen(mobilenet_params):
    model = build_model(mobilenet_params, SIZE)
    backbone = backbone_of(model)
    channels = backbone.output.shape[-1]
    ratio, kernel = mobilenet_params.attention.ratio, mobilenet_params.attention.kernel_size
    hidden = channels // ratio

    channel_attention = model.get_layer("channel_attention")
    spatial_attention = model.get_layer("spatial_attention")
    assert isinstance(channel_attention, ChannelAttention)
    assert isinstance(spatial_attention, SpatialAttention)
    assert channel_attention.count_params() == channels * hidden + hidden + hidden * channels + channels
    assert spatial_attention.count_params() == kernel * kernel * 2 + 1

    # phase 1: the backbone contributes no trainable weight, every attention weight is trainable
    assert backbone.trainable_weights == []
    trainable = {id(weight) for weight in model.trainable_weights}
    attention_weights = channel_attention.weights + spatial_attention.weights
    assert len(attention_weights) == 6  # two Dense kernels and biases, one Conv2D kernel and bias
    assert all(id(weight) in trainable for weight in attention_weights)

    # the whole model counts them: backbone + attention + head (Dense C->8, BatchNorm 4*8, Dense 8->1)
    head = channels * 8 + 8 + 4 * 8 + 8 + 1
    attention = channel_attention.count_params() + spatial_attention.count_params()
    assert model.count_params() == backbone.count_params() + attention + head


# --- save and load ---------------------------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore:`input_shape` is undefined:UserWarning")  # MobileNetV3 below 224 px
@pytest.mark.parametrize("backbone", sorted(BACKBONES))
def test_every_registered_backbone_builds_saves_and_reloads(default_params, backbone, tmp_path):
    """Each registry entry: a uint8 model of the right shape, reloaded from .keras (and from .h5 when the entry
    says legacy .h5 holds it) with the same predictions."""
    spec = BACKBONES[backbone]
    model = build_model(small_params(default_params, backbone), SIZE)
    assert model.name == f"chestct_{backbone}" and model.get_layer("preprocessing").mode == spec.preprocessing
    images = uint8_batch(3, seed=2)
    expected = predict(model, images)
    assert expected.shape == (3, 1)
    for extension in ("keras", "h5") if spec.legacy_h5 else ("keras",):
        path = tmp_path / f"model.{extension}"
        model.save(path)
        np.testing.assert_allclose(predict(keras.models.load_model(path), images), expected, atol=1e-5)


@pytest.mark.parametrize("extension", ["keras", "h5"])
def test_save_and_load_give_identical_predictions(densenet, tmp_path, extension):
    path = tmp_path / f"model.{extension}"
    densenet.save(path)
    restored = keras.models.load_model(path)

    images = uint8_batch(6, seed=1)
    np.testing.assert_allclose(predict(restored, images), predict(densenet, images), atol=1e-6)
    assert restored.inputs[0].dtype == "uint8"
    assert isinstance(restored.get_layer("channel_attention"), ChannelAttention)
    assert isinstance(restored.get_layer("spatial_attention"), SpatialAttention)
    assert isinstance(backbone_of(restored), keras.Model)
    assert not backbone_of(restored).trainable
    for name in ("channel_attention", "spatial_attention"):
        for saved, loaded in zip(densenet.get_layer(name).weights, restored.get_layer(name).weights, strict=True):
            np.testing.assert_array_equal(keras.ops.convert_to_numpy(loaded), keras.ops.convert_to_numpy(saved))


def test_mobilenetv3_cannot_be_restored_from_legacy_h5(mobilenet_params, tmp_path):
    # Pins the Keras limitation behind the registry's legacy_h5=False: if this starts passing, change the entry.
    assert not BACKBONES["mobilenetv3small"].legacy_h5
    model = build_model(mobilenet_params, SIZE)
    model.save(tmp_path / "model.h5")
    with pytest.raises(ValueError, match="positional arguments"):
        keras.models.load_model(tmp_path / "model.h5")


# --- fine-tuning -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("amount", "layer_count", "expected"),
    [(0.5, 426, 213), (0.3, 156, 47), (50, 174, 50), (50.0, 174, 50), (500, 174, 174), (1, 10, 1)],
)
def test_layers_to_unfreeze_reads_a_fraction_or_a_count(amount, layer_count, expected):
    assert layers_to_unfreeze(amount, layer_count) == expected


def test_layers_to_unfreeze_rejects_a_fractional_count():
    with pytest.raises(ValueError, match=r"model.unfreeze.resnet50: .*whole number"):
        layers_to_unfreeze(1.5, 174, "resnet50")


# Pinned figures for the original entries at 32 px: computing layers, N from params.yaml's model.unfreeze, the
# trainable ones among them (N minus the BatchNorm layers in the last N). A new registry entry needs no line here:
# the rule test below derives its figures from the model itself.
UNFREEZE_PINNED = {
    "densenet121": (426, 213, 152),  # 0.5 of 426
    "resnet50": (174, 50, 35),  # a count of 50
    "efficientnetb0": (236, 30, 23),  # a count of 30
    "mobilenetv3small": (156, 47, 37),  # 0.3 of 156 = 46.8
}


def test_every_registered_backbone_has_a_params_amount(default_params):
    # A new registry entry needs its model.unfreeze amount in params.yaml; the tests below then cover it.
    assert set(BACKBONES) == set(default_params.model.unfreeze)


def test_an_unknown_backbone_is_refused_naming_the_choices(default_params):
    with pytest.raises(UnknownBackboneError, match=r"unknown backbone 'vgg99'; choose one of densenet121"):
        build_model(small_params(default_params, "vgg99"), SIZE)


@pytest.mark.parametrize("backbone", sorted(BACKBONES))
def test_unfreeze_makes_the_last_layers_trainable_except_batchnorm(default_params, backbone):
    params = small_params(default_params, backbone)
    model = build_model(params, SIZE)
    computing = backbone_layers(model)
    layer_count = len(computing)
    unfrozen = layers_to_unfreeze(params.unfreeze[backbone], layer_count, backbone)
    batchnorm_in_tail = sum(isinstance(layer, keras.layers.BatchNormalization)
                            for layer in computing[layer_count - unfrozen:])
    trainable_count = unfrozen - batchnorm_in_tail
    if backbone in UNFREEZE_PINNED:
        assert (layer_count, unfrozen, trainable_count) == UNFREEZE_PINNED[backbone]

    assert unfreeze_for_finetuning(model, params) == trainable_count
    assert backbone_of(model).trainable
    assert not any(layer.trainable for layer in computing[: layer_count - unfrozen])
    for layer in computing[layer_count - unfrozen :]:
        assert layer.trainable == (not isinstance(layer, keras.layers.BatchNormalization)), layer.name
    assert sum(layer.trainable for layer in computing) == trainable_count
    assert backbone_of(model).trainable_weights, "unfrozen layers must contribute trainable weights"


def test_from_scratch_batchnorm_trains_with_its_own_momentum(default_params):
    """With weights null (mode auto) nothing pretrained needs protecting: unfrozen BatchNorm learns."""
    params = small_params(default_params, "mobilenetv3small", batchnorm="auto")
    unfreeze = {**params.unfreeze, "mobilenetv3small": 1000}  # a count above the layer count
    params = params.model_copy(update={"unfreeze": unfreeze})
    model = build_model(params, SIZE)
    computing = backbone_layers(model)
    assert unfreeze_for_finetuning(model, params) == len(computing)
    batchnorm = [layer for layer in computing if isinstance(layer, keras.layers.BatchNormalization)]
    assert batchnorm and all(layer.trainable and layer.momentum == 0.9 for layer in batchnorm)
    pretrained = params.model_copy(update={"weights": "imagenet"})
    from chestct.training.model import backbone_batchnorm_trains

    assert backbone_batchnorm_trains(params) and not backbone_batchnorm_trains(pretrained)


def test_backbone_batchnorm_statistics_stay_fixed_in_both_phases(mobilenet_params):
    model = build_model(mobilenet_params, SIZE)
    backbone = backbone_of(model)
    images, labels = uint8_batch(8), np.array([0, 1] * 4, "float32")

    def snapshot(weights):
        return [keras.ops.convert_to_numpy(weight).copy() for weight in weights]

    def train_one_step():
        # run_eagerly: the same semantics as fit without seconds of graph tracing
        model.compile(optimizer=keras.optimizers.Adam(1e-2), loss="binary_crossentropy", run_eagerly=True)
        model.train_on_batch(images, labels)

    backbone_batchnorm = [layer for layer in backbone.layers if isinstance(layer, keras.layers.BatchNormalization)]
    batchnorm_stats = [w for layer in backbone_batchnorm for w in (layer.moving_mean, layer.moving_variance)]
    head_variance = model.get_layer("head_bn_0").moving_variance

    # phase 1: nothing in the backbone moves, while the head's BatchNorm does (training really happened)
    backbone_before, head_before = snapshot(backbone.weights), snapshot([head_variance])
    train_one_step()
    for before, after in zip(backbone_before, snapshot(backbone.weights), strict=True):
        np.testing.assert_array_equal(after, before)
    assert not np.array_equal(snapshot([head_variance])[0], head_before[0])

    # phase 2: the unfrozen layers learn, the backbone's BatchNorm statistics still do not move
    unfreeze_for_finetuning(model, mobilenet_params)
    stats_before, trainable_before = snapshot(batchnorm_stats), snapshot(backbone.trainable_weights)
    train_one_step()
    for before, after in zip(stats_before, snapshot(batchnorm_stats), strict=True):
        np.testing.assert_array_equal(after, before)
    trainable_after = snapshot(backbone.trainable_weights)
    assert any(not np.array_equal(b, a) for b, a in zip(trainable_before, trainable_after, strict=True))


# --- weights ---------------------------------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore:`input_shape` is undefined:UserWarning")  # MobileNetV3 below 224 px
@pytest.mark.parametrize(
    ("backbone", "file_name"),
    [
        ("densenet121", "densenet121_weights_tf_dim_ordering_tf_kernels_notop.h5"),
        ("mobilenetv3small", "weights_mobilenet_v3_small_224_1.0_float_no_top_v2.h5"),
    ],
)
def test_missing_imagenet_weights_name_the_file_and_the_ways_out(default_params, monkeypatch, backbone, file_name):
    if (keras_weights_cache() / file_name).exists():
        pytest.skip(f"{file_name} is cached, so nothing is downloaded")

    # Simulate the offline machine even where a network exists, so the test never downloads anything.
    def offline(url, *args, **kwargs):
        raise urllib.error.URLError("offline (simulated by the test)")

    monkeypatch.setattr("keras.src.utils.file_utils.urlretrieve", offline)
    with pytest.raises(WeightsUnavailableError) as caught:
        build_model(small_params(default_params, backbone, weights="imagenet"), SIZE)
    message = str(caught.value)
    assert isinstance(caught.value, RuntimeError)
    assert file_name in message
    assert "~/.keras/models" in message
    assert "model.weights: null" in message


def test_a_missing_local_weights_file_is_named(default_params, tmp_path):
    missing = tmp_path / "nowhere" / "backbone.weights.h5"
    with pytest.raises(WeightsUnavailableError, match="model.weights") as caught:
        build_model(small_params(default_params, "mobilenetv3small", weights=str(missing)), SIZE)
    assert str(missing) in str(caught.value)


def test_a_local_weights_file_is_loaded_into_the_backbone(mobilenet_params, tmp_path):
    source = backbone_of(build_model(mobilenet_params, SIZE))
    # Mark the weights so that loading is visible (random init would differ anyway, this makes it explicit).
    kernel = source.get_layer("conv").kernel
    kernel.assign(keras.ops.full(kernel.shape, 0.125))
    path = tmp_path / "backbone.weights.h5"
    source.save_weights(path)

    loaded = backbone_of(build_model(mobilenet_params.model_copy(update={"weights": str(path)}), SIZE))
    for expected, actual in zip(source.weights, loaded.weights, strict=True):
        np.testing.assert_array_equal(keras.ops.convert_to_numpy(actual), keras.ops.convert_to_numpy(expected))


# --- Grad-CAM --------------------------------------------------------------------------------------------


def test_last_conv_layer_gives_the_feature_map_next_to_the_prediction(densenet):
    name = last_conv_layer_name(densenet)
    assert name == "spatial_attention"
    gradcam = keras.Model(densenet.input, [densenet.get_layer(name).output, densenet.output])
    images = uint8_batch(2)
    features, predictions = predict(gradcam, images)
    assert features.ndim == 4 and features.shape[-1] == backbone_of(densenet).output.shape[-1]
    np.testing.assert_allclose(predictions, predict(densenet, images), atol=1e-6)
