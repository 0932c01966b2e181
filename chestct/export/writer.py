"""The export folder's description: every artifact's digest, metadata.json and MODEL_CARD.md, written together."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from chestct.export.formats import FORMATS, artifact_digest
from chestct.export.metadata import ExportMetadata, TensorContract, build_metadata, write_metadata
from chestct.export.model_card import write_model_card
from chestct.feature_domain import FeatureDomain
from chestct.params import Params


def write_metadata_files(folder: Path, params: Params, threshold: dict, paths: dict[str, Path],
                         skipped: dict[str, str], image_size: int, eval_metrics: dict | None,
                         data_metrics: dict | None, left_out: dict[str, dict] | None = None,
                         source: dict | None = None,
                         domain: tuple[Path, FeatureDomain] | None = None) -> ExportMetadata:
    """Hash every artifact once (with its format's digest), then write metadata.json and MODEL_CARD.md.

    `threshold` is models/threshold.json as the evaluate stage wrote it (threshold, method, chosen_on, settings);
    `paths` holds only the artifacts kept, `left_out` the parity reports of those removed, `source` where the
    export came from (chestct.export.provenance.export_source; None: unknown), `domain` the feature-domain file
    copied into the export and its fit (None: the export has no feature-distance check).
    """
    artifacts = {}
    for name, path in paths.items():
        sha256, size = FORMATS[name].digest(path)
        artifacts[name] = {"file": path.name, "sha256": sha256, "bytes": size}
    metadata = build_metadata(params, threshold, artifacts, skipped, image_size, eval_metrics, left_out, source,
                              None if domain is None else domain_record(*domain))
    write_metadata(folder, metadata)
    write_model_card(folder, metadata, data_metrics)
    return metadata

FLOAT32_MAX = float(np.finfo(np.float32).max)  # the features are unbounded; JSON has no infinity


def domain_record(path: Path, domain: FeatureDomain) -> dict:
    """metadata.json's `domain`: the file's digest, the feature output's contract and the cut."""
    sha256, size = artifact_digest(path)
    return {"file": path.name, "sha256": sha256, "bytes": size, "cut": domain.cut, "quantile": domain.quantile,
            "fitted_images": domain.fitted_images, "validation_images": domain.validation_images,
            "cut_basis": domain.cut_basis,
            "features": TensorContract(name="features", dtype="float32", shape=[domain.feature_dim],
                                       value_range=(-FLOAT32_MAX, FLOAT32_MAX),
                                       meaning="the pooled features the head reads (the models' last output); the "
                                               "domain check's Mahalanobis distance is measured on them")}
