"""export stage: every format from models/phase2.keras, parity-checked in fresh processes, metadata, model card."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import numpy as np

from chestct.atomic_io import atomic_path, write_json
from chestct.input_pipeline import load_split
from chestct.params import load_params
from stages.errors import run_stage

MODEL = Path("models/phase2.keras")
THRESHOLD = Path("models/threshold.json")
TEST = Path("data/processed/test.npz")
EVAL_METRICS = Path("metrics/eval.json")
DATA_METRICS = Path("metrics/data.json")
EXPORT = Path("models/export")
METRICS = Path("metrics/export.json")


def _read_json(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.exists() else None


def main() -> None:
    from chestct.export import (
        artifact_digest,
        check_parity,
        parity_report,
        planned_formats,
        run_in_fresh_process,
        write_artifacts,
        write_metadata_files,
    )
    from chestct.training import load_trained_model

    params = load_params()
    threshold = json.loads(THRESHOLD.read_text())
    test = load_split(TEST)
    model = load_trained_model(MODEL)
    formats, skipped = planned_formats(params.export, params.model.backbone)

    with atomic_path(EXPORT) as folder, tempfile.TemporaryDirectory() as scratch:
        paths = write_artifacts(model, folder, formats)
        images_file = Path(scratch) / "test_images.npy"
        np.save(images_file, test.images)
        reference = run_in_fresh_process("keras", MODEL, images_file, params.export.latency_runs)["scores"]
        reports = {}
        for name, path in paths.items():
            run = run_in_fresh_process(name, path, images_file, params.export.latency_runs)
            _, size = artifact_digest(path)
            reports[name] = parity_report(reference, run["scores"], threshold["threshold"], name, params.export)
            reports[name] |= {"bytes": size, "latency_ms_median": float(np.median(run["latency_ms"]))}
            print(f"export: {name:<15} {size / 1e6:7.1f} MB  max|dp| {reports[name]['max_abs_diff']:.2e}  "
                  f"agreement {reports[name]['decision_agreement']:.4f}  "
                  f"latency {reports[name]['latency_ms_median']:.1f} ms", flush=True)
        check_parity(reports)  # raises before the folder is moved into place: nothing half-exported
        write_metadata_files(folder, params, threshold, paths, skipped, test.image_size,
                             _read_json(EVAL_METRICS), _read_json(DATA_METRICS))
    write_json(METRICS, {"test_images": len(test), "formats": reports, "skipped": skipped})
    print(f"export: {len(paths)} formats -> {EXPORT}; parity checked on {len(test)} test images")


if __name__ == "__main__":
    run_stage("export", main)
