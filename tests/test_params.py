"""params.yaml is complete, documented, and a wrong key or value fails naming the key."""

from __future__ import annotations

import copy

import pytest
import yaml

from chestct.params import ParamsError, load_params, parse_params


@pytest.fixture()
def raw(project_root):
    return yaml.safe_load((project_root / "params.yaml").read_text())


def test_defaults_keep_the_original_design_and_the_measured_lesion_configuration(default_params, lesion_params):
    p = default_params
    assert p.seed == 42
    assert p.preprocess.image_size == 256 and p.train.batch_size == 16
    assert p.model.backbone == "densenet121" and p.model.weights == "imagenet"
    assert (p.model.attention.ratio, p.model.attention.kernel_size) == (8, 7)
    assert p.model.head.units == [512, 256] and p.model.head.dropout == 0.5 and p.model.head.l2 == 0.0015
    assert (p.train.loss.name, p.train.loss.gamma, p.train.loss.alpha) == ("focal", 2.0, 0.25)
    assert (p.train.phase1.epochs, p.train.phase1.learning_rate) == (10, 1e-4)
    assert (p.train.phase2.epochs, p.train.phase2.learning_rate) == (40, 1e-5)
    assert p.model.unfreeze["densenet121"] == 0.5 and p.model.unfreeze["resnet50"] == 50
    assert p.model.unfreeze["efficientnetb0"] == 30
    assert p.train.early_stopping_patience == 10
    assert (p.train.reduce_lr.factor, p.train.reduce_lr.patience, p.train.reduce_lr.min_lr) == (0.2, 5, 1e-6)
    assert p.augment.mixup.alpha == 0.2 and p.augment.contrast.range == (0.5, 1.8)
    assert p.augment.sharpness.range == (0.5, 2.2) and p.augment.rotation.degrees == 30
    assert p.augment.shift.fraction == 0.2 and p.augment.zoom.fraction == 0.2
    assert p.train.balanced_batches and p.data.source == "kaggle" and p.split.dedup == "keep"
    # The lesion configuration became the default by measurement (docs/model-learned.md).
    assert p == lesion_params


def test_the_lesion_configuration_is_valid_and_every_step_is_on(lesion_params):
    """docs/lesion-configuration.md: one set of overrides, all of them real params."""
    p = lesion_params
    assert (p.preprocess.crop, p.preprocess.mask, p.preprocess.intensity, p.preprocess.denoise.method) == (
        "lungs", "lungs", "equalise_in_mask", "nlmeans")
    assert not p.preprocess.clahe.enabled and not p.preprocess.window.enabled  # redone in TF after augmentation
    assert p.augment.window_level.probability > 0 and p.augment.gamma.probability > 0
    assert p.augment.hu_window.probability == p.augment.brightness.probability == 0.0
    assert p.train.selection == "val_auc_robust" and p.evaluate.threshold.method == "youden_prior"


def test_every_leaf_key_has_a_comment(project_root):
    """Each scalar or inline-mapping line carries a one-line comment (or sits under a commented parent)."""
    undocumented = []
    for number, line in enumerate((project_root / "params.yaml").read_text().splitlines(), 1):
        stripped = line.strip()
        if not stripped or stripped.startswith("#") or stripped.endswith(":"):
            continue
        if "#" not in line:
            undocumented.append(f"{number}: {line}")
    # The unfreeze entries are documented by their parent's comment.
    undocumented = [u for u in undocumented if not any(b in u for b in ("densenet121:", "resnet50:",
                                                                          "efficientnetb0:", "mobilenetv3small:"))]
    assert undocumented == []


def test_unknown_key_is_named(raw):
    raw["train"]["phase1"]["learnig_rate"] = 1e-4
    with pytest.raises(ParamsError, match=r"train\.phase1\.learnig_rate: unknown key"):
        parse_params(raw)


@pytest.mark.parametrize(
    ("path", "value", "message"),
    [
        (("preprocess", "image_size"), 4, r"preprocess\.image_size"),
        (("train", "phase1", "learning_rate"), -1.0, r"train\.phase1\.learning_rate"),
        (("augment", "mixup", "probability"), 1.5, r"augment\.mixup\.probability"),
        (("data", "source"), "ftp", r"data\.source"),
        (("split", "dedup"), "sometimes", r"split\.dedup"),
        (("model", "backbone"), "VGG 99", r"model\.backbone"),
        (("export", "formats"), ["keras", "tflite int8"], r"export\.formats"),
        (("augment", "contrast", "range"), [1.8, 0.5], r"augment\.contrast"),
        (("data", "synthetic", "min_size"), 5000, r"data\.synthetic\.min_size"),
    ],
)
def test_out_of_range_value_is_named(raw, path, value, message):
    bad = copy.deepcopy(raw)
    node = bad
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    with pytest.raises(ParamsError, match=message):
        parse_params(bad)


def test_the_lung_mask_without_the_lung_crop_is_refused_naming_both_keys(raw):
    raw["preprocess"].update({"crop": "body", "mask": "lungs"})
    with pytest.raises(ParamsError, match=r"preprocess.*mask: lungs.*set crop: lungs \(got crop: body\)"):
        parse_params(raw)
    raw["preprocess"]["crop"] = "lungs"
    assert parse_params(raw).preprocess.mask == "lungs"


def test_missing_key_and_bad_fractions_are_named(raw):
    del raw["evaluate"]["bootstrap_resamples"]
    raw["split"]["fractions"] = {"train": 0.8, "valid": 0.1, "test": 0.2}
    with pytest.raises(ParamsError) as error:
        parse_params(raw)
    assert "evaluate.bootstrap_resamples: required key is missing" in str(error.value)
    assert "split.fractions" in str(error.value) and "sum to 1" in str(error.value)


def test_missing_or_broken_file(tmp_path):
    with pytest.raises(ParamsError, match="not found"):
        load_params(tmp_path / "nope.yaml")
    broken = tmp_path / "params.yaml"
    broken.write_text("seed: [1, 2\n")
    with pytest.raises(ParamsError, match="not valid YAML"):
        load_params(broken)


def test_check_params_refuses_names_no_registry_knows(raw):
    from chestct.cli import check_registry_names

    bad = copy.deepcopy(raw)
    bad["model"]["backbone"] = "vgg99"
    bad["export"]["formats"] = ["keras", "tflite_int8"]
    del bad["model"]["unfreeze"]["resnet50"]
    with pytest.raises(ParamsError) as error:
        check_registry_names(parse_params(bad))
    message = str(error.value)
    assert "model.backbone: unknown backbone 'vgg99'" in message
    assert "export.formats: unknown export format 'tflite_int8'" in message
    assert "model.unfreeze: no amount for resnet50" in message
    check_registry_names(parse_params(raw))  # the project's own params.yaml names only registered entries
