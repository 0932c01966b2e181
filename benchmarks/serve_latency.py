"""Single-image latency of the service, per export format: p50 and p95 over HTTP on loopback, and in-process.

    python -m benchmarks.serve_latency [--export-dir models/export] [--image scan.png] [--requests 50]
                                       [--formats keras,h5,savedmodel,tflite_float32,tflite_dynamic]

Without --export-dir it builds an export of the default configuration (params.yaml: DenseNet121 at its image
size) with random weights in a temporary folder: latency does not depend on what the weights learned. For each
format it starts `chestct serve` in its own process with that format only, posts the same image `--requests`
times one after another (after 3 warm-up requests) and reports the wall time per request as the client sees it
(upload, decoding, preprocessing, inference, JSON), then the same through `Predictor` without HTTP, and in
process once more without the domain check (decoding, preprocessing, the forward pass and the decision alone):
the last column is what the check (chestct.imaging.domain and the feature distance) adds. The default export
carries a feature domain fitted on phantoms, as a pipeline export does.
Figures are printed, never asserted: timings on a shared machine are noisy, compare ratios within one run.
"""

from __future__ import annotations

import argparse
import io
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def _default_export(folder: Path) -> Path:
    import keras

    from chestct.evaluation.features import with_features
    from chestct.evaluation.thresholds import threshold_record
    from chestct.export.formats import planned_formats, write_artifacts
    from chestct.export.writer import write_metadata_files
    from chestct.feature_domain import DOMAIN_FILE
    from chestct.imaging.preprocess import preprocess_gray
    from chestct.params import load_params
    from chestct.training.backbones import backbone_spec
    from chestct.training.model import build_model
    from tests.serving_support import phantom_images, tiny_domain

    params = load_params()
    params = params.model_copy(update={"model": params.model.model_copy(update={"weights": None})})
    size = params.preprocess.image_size
    print(f"building a {params.model.backbone} export at {size} px with random weights in {folder} ...", flush=True)
    keras.utils.set_random_seed(0)
    backbone = backbone_spec(params.model.backbone)
    formats, skipped = planned_formats(params.export.formats, backbone.legacy_h5, backbone.name)
    model = build_model(params.model, size)
    phantoms = phantom_images(12)
    images = np.stack([preprocess_gray(gray, params.preprocess) for _, gray in phantoms])
    domain = tiny_domain(model, params, images, np.array([label for label, _ in phantoms]))
    paths = write_artifacts(with_features(model), folder, formats)
    domain.save(folder / DOMAIN_FILE)
    threshold = threshold_record({"threshold": 0.5, "method": "fixed", "chosen_on": "none (benchmark)"}, params)
    write_metadata_files(folder, params, threshold, paths, skipped, size, None, None,
                         domain=(folder / DOMAIN_FILE, domain))
    return folder


def _phantom_png(size: int = 512) -> bytes:
    from PIL import Image

    from chestct.data.phantoms import render_phantom

    buffer = io.BytesIO()
    Image.fromarray(render_phantom(np.random.default_rng(0), (size, size), 1)).save(buffer, format="PNG")
    return buffer.getvalue()


def _percentiles(milliseconds: list[float]) -> tuple[float, float]:
    return float(np.percentile(milliseconds, 50)), float(np.percentile(milliseconds, 95))


def _http_latencies(export_dir: Path, format_name: str, image: bytes, requests: int) -> list[float]:
    import httpx

    from tests.serving_support import free_port

    port = free_port()
    command = [sys.executable, "-m", "chestct.cli", "serve", "--port", str(port), "--export-dir", str(export_dir),
               "--formats", format_name]
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=120) as client:
            deadline = time.monotonic() + 180
            while True:
                try:
                    if client.get("/health").json().get("format") == format_name:
                        break
                except httpx.TransportError:
                    pass
                if server.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"chestct serve with {format_name} did not start")
                time.sleep(0.5)
            files = [("files", ("scan.png", image, "image/png"))]
            timings = []
            for index in range(requests + 3):
                started = time.perf_counter()
                response = client.post("/predict", files=files)
                elapsed = (time.perf_counter() - started) * 1000
                response.raise_for_status()
                if index >= 3:  # warm-up: first calls trace graphs and allocate
                    timings.append(elapsed)
            return timings
    finally:
        server.terminate()
        server.wait(timeout=30)


def _direct_latencies(export_dir: Path, format_name: str, image: bytes, requests: int) -> tuple[list, list]:
    """In-process latencies of `Predictor.predict`, and of the same work without the domain check, alternated
    request by request so that both see the same machine."""
    from chestct.serving.predictor import Predictor

    predictor = Predictor(export_dir, formats=(format_name,))

    def without_domain_check() -> None:
        model_input = predictor.prepare(image, "scan.png")
        outputs = predictor.outputs(model_input[None])
        predictor.decide("scan.png", model_input, float(outputs.scores[0]))

    checked, unchecked = [], []
    for index in range(requests + 3):
        for timings, run in ((checked, lambda: predictor.predict([("scan.png", image)])),
                             (unchecked, without_domain_check)):
            started = time.perf_counter()
            run()
            if index >= 3:
                timings.append((time.perf_counter() - started) * 1000)
    return checked, unchecked


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--export-dir", type=Path, default=None)
    parser.add_argument("--image", type=Path, default=None, help="image to send (default: a 512 px phantom)")
    parser.add_argument("--requests", type=int, default=50)
    parser.add_argument("--formats", default=None, help="comma-separated (default: every exported format)")
    args = parser.parse_args()

    import json

    with tempfile.TemporaryDirectory() as scratch:
        export_dir = args.export_dir or _default_export(Path(scratch) / "export")
        metadata = json.loads((export_dir / "metadata.json").read_text())
        formats = args.formats.split(",") if args.formats else list(metadata["artifacts"])
        image = args.image.read_bytes() if args.image else _phantom_png()
        print(f"\n{metadata['backbone']} at {metadata['input']['shape'][0]} px, {len(image) / 1e3:.0f} KB image, "
              f"{args.requests} sequential single-image requests per format\n")
        print(f"domain check: {'first layer and feature distance' if metadata.get('domain') else 'first layer only'}")
        print(f"{'format':<16}{'HTTP p50 ms':>12}{'HTTP p95 ms':>12}{'direct p50':>12}{'direct p95':>12}"
              f"{'unchecked p50':>15}{'check adds':>12}")
        for name in formats:
            http_p50, http_p95 = _percentiles(_http_latencies(export_dir, name, image, args.requests))
            checked, unchecked = _direct_latencies(export_dir, name, image, args.requests)
            (direct_p50, direct_p95), (bare_p50, _) = _percentiles(checked), _percentiles(unchecked)
            print(f"{name:<16}{http_p50:>12.1f}{http_p95:>12.1f}{direct_p50:>12.1f}{direct_p95:>12.1f}"
                  f"{bare_p50:>15.1f}{(direct_p50 / bare_p50 - 1):>12.1%}", flush=True)


if __name__ == "__main__":
    main()
