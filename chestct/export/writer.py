"""The export folder's description: every artifact's digest, metadata.json and MODEL_CARD.md, written together."""

from __future__ import annotations

from pathlib import Path

from chestct.export.formats import FORMATS
from chestct.export.metadata import ExportMetadata, build_metadata, write_metadata
from chestct.export.model_card import write_model_card
from chestct.params import Params


def write_metadata_files(folder: Path, params: Params, threshold: dict, paths: dict[str, Path],
                         skipped: dict[str, str], image_size: int, eval_metrics: dict | None,
                         data_metrics: dict | None, left_out: dict[str, dict] | None = None,
                         source: dict | None = None) -> ExportMetadata:
    """Hash every artifact once (with its format's digest), then write metadata.json and MODEL_CARD.md.

    `threshold` is models/threshold.json as the evaluate stage wrote it (threshold, method, chosen_on, settings);
    `paths` holds only the artifacts kept, `left_out` the parity reports of those removed, `source` where the
    export came from (chestct.export.provenance.export_source; None: unknown).
    """
    artifacts = {}
    for name, path in paths.items():
        sha256, size = FORMATS[name].digest(path)
        artifacts[name] = {"file": path.name, "sha256": sha256, "bytes": size}
    metadata = build_metadata(params, threshold, artifacts, skipped, image_size, eval_metrics, left_out, source)
    write_metadata(folder, metadata)
    write_model_card(folder, metadata, data_metrics)
    return metadata
