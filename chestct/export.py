"""Every export format from one trained model, and the parity check that each one gives the same answers.

Formats: the native .keras file, legacy .h5, a SavedModel (`model.export`), a float32 TFLite model and a
dynamic-range-quantized TFLite model. Each is loaded back in a fresh process and run on the whole test array;
float formats must match the Keras probabilities within `export.float_tolerance`, the quantized one within
`export.quantized_tolerance` and with at least `export.min_decision_agreement` of the decisions.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from chestct.errors import ChestctError
from chestct.exported_model import ARTIFACT_NAMES
from chestct.params import ExportParams

QUANTIZED_FORMATS = frozenset({"tflite_dynamic"})


class ExportParityError(ChestctError, RuntimeError):
    """An exported format disagrees with the Keras model beyond its tolerance."""


@contextlib.contextmanager
def _quiet_output():
    """Silence both Python prints and native (C++) logs: model.export prints about 2,000 lines."""
    saved = [os.dup(1), os.dup(2)]
    with open(os.devnull, "w") as devnull:
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(devnull.fileno(), 1)
        os.dup2(devnull.fileno(), 2)
        try:
            with contextlib.redirect_stdout(devnull), contextlib.redirect_stderr(devnull):
                yield
        finally:
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            for descriptor in saved:
                os.close(descriptor)


def planned_formats(params: ExportParams, backbone: str) -> tuple[list[str], dict[str, str]]:
    """The format names to write, and those skipped with the reason."""
    from chestct.model import LEGACY_H5_UNSUPPORTED_BACKBONES

    names, skipped = [], {}
    for requested in params.formats:
        if requested == "tflite":
            names += [f"tflite_{'float32' if q == 'none' else q}" for q in params.tflite_quantization]
        elif requested == "h5" and backbone in LEGACY_H5_UNSUPPORTED_BACKBONES:
            skipped["h5"] = f"Keras cannot reload {backbone} from legacy .h5 (use .keras or SavedModel)"
        else:
            names.append(requested)
    return names, skipped


def _convert_tflite(savedmodel: Path, quantize: bool) -> bytes:
    import tensorflow as tf

    converter = tf.lite.TFLiteConverter.from_saved_model(str(savedmodel))
    if quantize:
        converter.optimizations = [tf.lite.Optimize.DEFAULT]  # dynamic range: int8 weights, float activations
    with _quiet_output():
        return converter.convert()


def write_artifacts(model, folder: Path, formats: list[str]) -> dict[str, Path]:
    """Write each format into `folder`; returns format name -> path."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = {name: folder / ARTIFACT_NAMES[name] for name in formats}
    if "keras" in paths:
        model.save(paths["keras"])
    if "h5" in paths:
        model.save(paths["h5"])
    needs_savedmodel = "savedmodel" in paths or any(name.startswith("tflite") for name in paths)
    with tempfile.TemporaryDirectory() as scratch:
        savedmodel = paths.get("savedmodel", Path(scratch) / "savedmodel")
        if needs_savedmodel:
            with _quiet_output():
                model.export(str(savedmodel), format="tf_saved_model")
        for name in ("tflite_float32", "tflite_dynamic"):
            if name in paths:
                paths[name].write_bytes(_convert_tflite(savedmodel, quantize=name in QUANTIZED_FORMATS))
    return paths


def artifact_digest(path: Path) -> tuple[str, int]:
    """sha256 and size in bytes of a file, or of a folder's files in sorted order (for SavedModel)."""
    digest, size = hashlib.sha256(), 0
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for file in files:
        if path.is_dir():
            digest.update(file.relative_to(path).as_posix().encode())
        data = file.read_bytes()
        digest.update(data)
        size += len(data)
    return digest.hexdigest(), size


def write_metadata_files(folder: Path, params, threshold: dict, paths: dict[str, Path], skipped: dict[str, str],
                         image_size: int, eval_metrics: dict | None, data_metrics: dict | None) -> dict:
    """metadata.json (with every artifact's sha256) and MODEL_CARD.md in the export folder; returns the metadata."""
    import json

    from chestct.model_card import build_metadata, render_model_card

    artifacts = {}
    for name, path in paths.items():
        sha256, size = artifact_digest(path)
        artifacts[name] = {"file": path.name, "sha256": sha256, "bytes": size}
    metadata = build_metadata(params, threshold, artifacts, skipped, image_size, eval_metrics)
    (folder / "metadata.json").write_text(json.dumps(metadata, indent=2) + "\n")
    (folder / "MODEL_CARD.md").write_text(render_model_card(metadata, data_metrics))
    return metadata


def run_in_fresh_process(format_name: str, artifact: Path, images_file: Path, latency_runs: int) -> dict:
    """Predictions and single-image latencies of one artifact, computed by `python -m chestct.export_check`."""
    with tempfile.TemporaryDirectory() as scratch:
        out = Path(scratch) / "result.npz"
        command = [sys.executable, "-m", "chestct.export_check", format_name, str(artifact), str(images_file),
                   str(out), "--latency-runs", str(latency_runs)]
        result = subprocess.run(command, capture_output=True, text=True,
                                env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})
        if result.returncode != 0:
            tail = result.stderr.strip().splitlines()[-5:]
            raise ExportParityError(f"{format_name}: {artifact.name} failed to load or run in a fresh process:\n  "
                                    + "\n  ".join(tail))
        with np.load(out) as loaded:
            return {"scores": loaded["scores"], "latency_ms": loaded["latency_ms"]}


def parity_report(reference: np.ndarray, scores: np.ndarray, threshold: float, format_name: str,
                  params: ExportParams) -> dict:
    quantized = format_name in QUANTIZED_FORMATS
    tolerance = params.quantized_tolerance if quantized else params.float_tolerance
    max_diff = float(np.max(np.abs(scores - reference))) if len(reference) else 0.0
    agreement = float(np.mean((scores >= threshold) == (reference >= threshold))) if len(reference) else 1.0
    required_agreement = params.min_decision_agreement if quantized else 1.0
    return {"max_abs_diff": max_diff, "tolerance": tolerance, "decision_agreement": agreement,
            "required_agreement": required_agreement,
            "passed": bool(max_diff <= tolerance and agreement >= required_agreement)}


def check_parity(reports: dict[str, dict]) -> None:
    """Fail, naming every format out of tolerance."""
    failures = [f"{name}: max |p - p_keras| = {r['max_abs_diff']:.3g} (tolerance {r['tolerance']:.3g}), "
                f"decision agreement {r['decision_agreement']:.4f} (required {r['required_agreement']:.4f})"
                for name, r in reports.items() if not r["passed"]]
    if failures:
        raise ExportParityError("exported formats disagree with the Keras model:\n  " + "\n  ".join(failures)
                                + "\nNothing was exported. Loosen export.*_tolerance only if the difference is "
                                  "understood.")
