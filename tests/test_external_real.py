"""The external stage on the real cross-source panel (skipped unless CHESTCT_REAL_DATA points at the Kaggle
dataset, with ../shared/data/cross-source beside it): a small random model at 64 px, keys and counts only.

The counts come from cross-source/PROVENANCE.txt: Lung-PET-CT-Dx holds 188 slices in 4 series (2 patients, each
reconstructed with a sharp and a smooth kernel), 38 of them boxed; LUNA16 holds 184 normal slices.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import PROJECT_ROOT

REAL_DATA = os.environ.get("CHESTCT_REAL_DATA")
CROSS_SOURCE = Path(REAL_DATA).parent / "cross-source" if REAL_DATA else None
pytestmark = [
    pytest.mark.real_data,
    pytest.mark.skipif(not REAL_DATA, reason="set CHESTCT_REAL_DATA to the chest-ctscan-images folder"),
    pytest.mark.skipif(bool(REAL_DATA) and not (CROSS_SOURCE and CROSS_SOURCE.is_dir()),
                       reason="no cross-source folder beside CHESTCT_REAL_DATA"),
]


def test_the_external_stage_scores_the_cross_source_panel(tmp_path, tiny_export):
    shutil.copytree(tiny_export, tmp_path / "models" / "export")
    params = yaml.safe_load((PROJECT_ROOT / "params.yaml").read_text())
    params["evaluate"]["bootstrap_resamples"] = 200
    params["external"] = {"sets": [
        {"name": "lung_pet_ct_dx", "path": str(CROSS_SOURCE / "lung-pet-ct-dx"), "kind": "annotated_series"},
        {"name": "luna16_normal", "path": str(CROSS_SOURCE / "luna16-normal"), "kind": "normal_only"}]}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = {**os.environ, "PYTHONPATH": str(PROJECT_ROOT), "TF_CPP_MIN_LOG_LEVEL": "2"}
    result = subprocess.run([sys.executable, "-m", "stages.external"], cwd=tmp_path, env=env, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((tmp_path / "metrics/external.json").read_text())
    panel = metrics["lung_pet_ct_dx"]
    assert (panel["n"], panel["boxed_slices"], panel["series"], panel["kernel_pairs"]) == (188, 38, 4, 2)
    assert panel["kernel_paired_slices"] == 64 + 30
    assert sorted(panel["within_series_auc_per_series"]) == ["Lung_Dx-A0001_s2_L", "Lung_Dx-A0001_s3_B",
                                                             "Lung_Dx-A0002_s2_B70f", "Lung_Dx-A0002_s3_B40f"]
    for key in ("within_series_auc", "lesion_sensitivity", "other_slices_positive_rate", "kernel_mean_abs_diff",
                "kernel_agreement", "in_box_gradcam_share", "in_box_area_share"):
        assert panel[key] is not None, key
    assert panel["skipped"] == 1  # LICENSE.txt
    normals = metrics["luna16_normal"]
    assert normals["n"] == 184 and normals["skipped"] == 1  # slices.csv
    assert 0.0 <= normals["specificity"] <= 1.0
    assert (tmp_path / "plots/external/lung_pet_ct_dx/z_profile.png").stat().st_size > 10_000
