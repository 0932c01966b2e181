"""A small real export folder for the serving tests: random-weight DenseNet121 at 64 px, every loadable format.

DenseNet121 rather than MobileNetV3: with random weights its outputs vary between images and its Grad-CAM maps
are not constant (see test_gradcam.py). The threshold is set to the median probability of a few phantoms, so
both diagnoses occur. Every export carries a feature domain (chestct.feature_domain) fitted on phantoms, its cut
set well above every phantom's distance: the phantoms the tests upload are in domain, and a test that wants one
out of domain lowers the loaded predictor's cut.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import numpy as np

SIZE = 64
FORMATS = ("keras", "h5", "savedmodel", "tflite_float32")


def serving_params(default_params, lesion_map: bool = False, **serve_overrides):
    model = default_params.model
    model = model.model_copy(update={"backbone": "densenet121", "weights": None,
                                     "head": model.head.model_copy(update={"units": [8]}),
                                     "lesion_map": model.lesion_map.model_copy(update={"enabled": lesion_map})})
    preprocess = default_params.preprocess.model_copy(update={"image_size": SIZE})
    serve = default_params.serve.model_copy(update=serve_overrides)
    return default_params.model_copy(update={"model": model, "preprocess": preprocess, "serve": serve})


def phantom_images(count: int = 6, seed: int = 0) -> list[tuple[int, np.ndarray]]:
    """(label, grayscale uint8 image) pairs alternating Normal and Cancer."""
    from chestct.data.phantoms import render_phantom

    rng = np.random.default_rng(seed)
    return [(index % 2, render_phantom(rng, (160, 160), 2 * (index % 2))) for index in range(count)]


# The tiny exports are calibrated by a known map, so every route can be checked to apply it (a random model's
# scores sit near 0.5: the map spreads them).
TEST_CALIBRATION = {"method": "platt", "slope": 3.0, "intercept": 0.4, "fitted_on": "valid", "fitted_images": 40}


def tiny_domain(model, params, images: np.ndarray, labels: np.ndarray):
    """A feature domain fitted on `images`, its cut at three times the largest distance of other phantoms (a
    dozen images against 1,024 features: held-out phantoms lie far from the fit, but within that cut)."""
    import dataclasses

    from chestct.evaluation.domain import fit_feature_domain
    from chestct.evaluation.features import predict_features
    from chestct.imaging.preprocess import preprocess_gray

    others = np.stack([preprocess_gray(gray, params.preprocess) for _, gray in phantom_images(12, seed=1)])
    valid = predict_features(model, others, 8)
    domain = fit_feature_domain(predict_features(model, images, 8), labels, valid, 0.99)
    return dataclasses.replace(domain, cut=3.0 * float(domain.distances(valid).max()))


def build_tiny_export(folder: Path, default_params, formats: tuple[str, ...] = FORMATS, lesion_map: bool = False,
                      with_domain: bool = True, **serve_overrides) -> Path:
    """The export; `lesion_map` makes it a lesion-map model (two outputs in every format), `with_domain` False an
    export as written before schema 2.5 (no feature output, no domain file)."""
    import keras

    from chestct.evaluation.features import with_features
    from chestct.evaluation.thresholds import threshold_record
    from chestct.export.formats import write_artifacts
    from chestct.export.writer import write_metadata_files
    from chestct.feature_domain import DOMAIN_FILE
    from chestct.imaging.preprocess import preprocess_gray
    from chestct.training.model import build_model, prediction_of

    params = serving_params(default_params, lesion_map, **serve_overrides)
    keras.utils.set_random_seed(3)
    model = build_model(params.model, SIZE)
    phantoms = phantom_images(12)
    images = np.stack([preprocess_gray(gray, params.preprocess) for _, gray in phantoms])
    threshold = float(np.median(prediction_of(model.predict(images[:6], verbose=0)).ravel()))
    domain = None
    if with_domain:
        domain = tiny_domain(model, params, images, np.array([label for label, _ in phantoms]))
        model = with_features(model)
    paths = write_artifacts(model, folder, list(formats))
    if domain is not None:
        domain.save(folder / DOMAIN_FILE)
    record = threshold_record({"threshold": threshold, "method": "fixed"}, params, TEST_CALIBRATION)
    write_metadata_files(folder, params, record, paths, {}, SIZE, None, None,
                         domain=None if domain is None else (folder / DOMAIN_FILE, domain))
    return folder


def png_bytes(gray: np.ndarray, mode: str = "L", fmt: str = "PNG") -> bytes:
    import io

    from PIL import Image

    buffer = io.BytesIO()
    image = Image.fromarray(gray.astype(np.uint16) * 257) if mode == "I;16" else Image.fromarray(gray).convert(mode)
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def serving_thread(config):
    """uvicorn.Server(config) in a background thread: yields once it has started, stops it after."""
    import threading
    import time

    import uvicorn

    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 120
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the test server did not start")
        time.sleep(0.05)
    try:
        yield server
    finally:
        server.should_exit = True
        thread.join(timeout=30)


def read_until_closed(sock) -> bytes:
    """Everything a server sends on a socket until it closes the connection (a reset counts as closed)."""
    chunks = []
    with contextlib.suppress(ConnectionResetError):
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


@contextlib.contextmanager
def running_server(export_dir: Path, formats: tuple[str, ...] | None = None):
    """uvicorn serving create_app(export_dir) on 127.0.0.1 in a thread; yields the base URL, stops it after."""
    import uvicorn

    from chestct.serving.app import create_app

    port = free_port()
    with serving_thread(uvicorn.Config(create_app(export_dir, formats), host="127.0.0.1", port=port,
                                       log_level="warning")):
        yield f"http://127.0.0.1:{port}"
