"""Shared fixtures: the project root and validated default params."""

from __future__ import annotations

import os
from pathlib import Path

# gto configures logging when first imported (logging.config.dictConfig), closing every handler that exists then;
# absl's closes its stream with it, which inside a test is pytest's capture of stderr (the in-process stage run in
# test_dvc_contract.py then lost it). Imported here, before any handler exists, it closes nothing.
import gto  # noqa: F401
import pytest

import chestct  # noqa: F401  (sets TensorFlow's runtime options, before any test module imports it)

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

PROJECT_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def project_root() -> Path:
    return PROJECT_ROOT


@pytest.fixture(scope="session")
def default_params():
    from chestct.params import load_params

    return load_params(PROJECT_ROOT / "params.yaml")


def textured_image(seed: int, size: tuple[int, int] = (96, 128)):
    """A distinct grayscale test image (smooth random blobs: perceptual hashes differ between seeds)."""
    import cv2
    import numpy as np

    rng = np.random.default_rng(seed)
    coarse = rng.uniform(0, 255, size=(6, 6)).astype(np.float32)
    smooth = cv2.resize(coarse, (size[1], size[0]), interpolation=cv2.INTER_CUBIC)
    return np.clip(smooth + rng.normal(0, 4, size), 0, 255).astype(np.uint8)


def save_image(path: Path, gray, fmt: str = "PNG", mode: str = "L") -> Path:
    """Save a grayscale array as `fmt` (PNG/JPEG) in Pillow `mode` (L, RGB, RGBA, P, I;16)."""
    import numpy as np
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    if mode == "I;16":
        image = Image.fromarray(gray.astype(np.uint16) * 257)
    else:
        image = Image.fromarray(gray).convert(mode)
    image.save(path, format=fmt)
    return path


def make_kaggle_layout(root: Path, per_class: int = 3, seed: int = 0) -> Path:
    """A small Data/ tree with the real folder names, distinct images; returns the Data folder."""
    from chestct.labels import FOLDER_NAMES_BY_SPLIT, SPLITS

    data = root / "Data"
    counter = seed * 10_000
    for split in SPLITS:
        for folder in FOLDER_NAMES_BY_SPLIT[split].values():
            for index in range(per_class):
                counter += 1
                save_image(data / split / folder / f"{index:06d}.png", textured_image(counter))
    return data


# --- serving: one small real export and one live server per test session ------------------------------------


@pytest.fixture(scope="session")
def tiny_export(tmp_path_factory, default_params) -> Path:
    """A real export folder (random DenseNet121 at 64 px: keras, h5, savedmodel, tflite_float32)."""
    from tests.serving_support import build_tiny_export

    return build_tiny_export(tmp_path_factory.mktemp("export") / "export", default_params)


@pytest.fixture(scope="session")
def tiny_lesion_export(tmp_path_factory, default_params) -> Path:
    """As tiny_export, for a lesion-map model (model.lesion_map): both outputs in every format."""
    from tests.serving_support import build_tiny_export

    return build_tiny_export(tmp_path_factory.mktemp("lesion-export") / "export", default_params, lesion_map=True)


@pytest.fixture(scope="module")
def client(tiny_export):
    """The app over the tiny export, in process (one per test module: each starts with fresh metrics)."""
    from fastapi.testclient import TestClient

    from chestct.serving.app import create_app

    with TestClient(create_app(tiny_export), raise_server_exceptions=False) as client:
        yield client


@pytest.fixture()
def limits(client):
    """Change the loaded model's serving limits for one test, then restore them."""
    predictor = client.app.state.predictor
    original = predictor.serve_params

    def set_limits(**changes):
        predictor.serve_params = original.model_copy(update=changes)

    yield set_limits
    predictor.serve_params = original


@pytest.fixture(scope="session")
def live_server(tiny_export):
    """The service on loopback in a background thread: yields its base URL."""
    from tests.serving_support import running_server

    with running_server(tiny_export) as url:
        yield url


# --- the two configurations the docs compare -------------------------------------------------------------------

# The original pipeline (CLAHE, pad and resize, intensity augmentation), the default until the lesion configuration
# was measured better (docs/model-learned.md); still reachable through params.
ORIGINAL_CONFIGURATION = {
    "preprocess": {"crop": "none", "mask": "body", "clahe": {"enabled": True}, "denoise": {"method": "none"},
                   "intensity": "none"},
    "augment": {"brightness": {"probability": 0.5}, "contrast": {"probability": 0.5},
                "sharpness": {"probability": 0.3}, "hu_window": {"probability": 0.3},
                "window_level": {"probability": 0.0}, "gamma": {"probability": 0.0}, "noise": {"probability": 0.0},
                "blur": {"probability": 0.0}, "jpeg": {"probability": 0.0}},
    "train": {"selection": "val_auc", "phase2": {"epochs": 20}},
    "evaluate": {"threshold": {"method": "youden"}},
}

# The lesion configuration (docs/lesion-configuration.md): the defaults in params.yaml.
LESION_CONFIGURATION = {
    "preprocess": {"crop": "lungs", "mask": "lungs", "clahe": {"enabled": False},
                   "denoise": {"method": "nlmeans", "strength": 2.0},
                   "intensity": "equalise_in_mask"},
    "augment": {"brightness": {"probability": 0.0}, "contrast": {"probability": 0.0},
                "sharpness": {"probability": 0.0}, "hu_window": {"probability": 0.0},
                "window_level": {"probability": 0.8}, "gamma": {"probability": 0.5}, "noise": {"probability": 0.5},
                "blur": {"probability": 0.5}, "jpeg": {"probability": 0.3}},
    "train": {"selection": "val_auc_robust", "phase2": {"epochs": 40}},
    "evaluate": {"threshold": {"method": "youden_prior"}},
}


def _deep_update(model, changes: dict):
    updates = {key: _deep_update(getattr(model, key), value) if isinstance(value, dict) else value
               for key, value in changes.items()}
    return model.model_copy(update=updates)


@pytest.fixture(scope="session")
def original_params(default_params):
    """params.yaml with the original pipeline applied (CLAHE, no crop, intensity augmentation): what the tests of
    the original behaviour use, whatever the defaults are."""
    return _deep_update(default_params, ORIGINAL_CONFIGURATION)


@pytest.fixture(scope="session")
def lesion_params(default_params):
    """params.yaml with the lesion configuration applied."""
    return _deep_update(default_params, LESION_CONFIGURATION)


# --- the whole pipeline once, in this process: dvc.yaml's params contract and the out-of-fold threshold --------


@pytest.fixture(scope="session")
def in_process_pipeline(tmp_path_factory):
    """Every `python -m stages.*` of dvc.yaml run once as main() in this process, in dvc.yaml order, on a tiny copy
    of the project that chooses its threshold on out-of-fold scores (so that stage trains and reads its keys).
    Returns a tests.in_process_pipeline.PipelineRun: the copy, each stage's params reads and what it printed."""
    from tests.in_process_pipeline import run_every_stage

    return run_every_stage(tmp_path_factory.mktemp("in_process") / "project")
