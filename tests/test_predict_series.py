"""`chestct predict DIR --series`: one answer per DICOM series, with the rule, the slice that gave the score, what
was skipped, and each series' z-profile (--plot-dir)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from chestct.cli import main
from tests.conftest import save_image, textured_image
from tests.series_factory import SeriesSpec, phantom_hu, slice_dicom, write_annotated_series


@pytest.fixture(scope="module")
def mixed_folder(tmp_path_factory):
    """Two patients (two kernels each), a single-slice series, a PNG and a text file, in one folder."""
    root = tmp_path_factory.mktemp("series") / "scans"
    write_annotated_series(root / "first", SeriesSpec(patient_id="P1", slices=6, tumour_slices=(2, 3)))
    write_annotated_series(root / "second", SeriesSpec(patient_id="P2", slices=5, tumour_slices=(), seed=1))
    hu = phantom_hu(0, SeriesSpec(), np.random.default_rng(0))
    (root / "lone.dcm").write_bytes(slice_dicom(hu, patient_id="P3", study_uid="1.2", series_uid="1.2.3",
                                                series_number=7, kernel="B", z=0.0, instance=1))
    save_image(root / "photo.png", textured_image(1))
    return root


def _json_lines(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


def test_every_series_is_answered_on_its_own(mixed_folder, tiny_export, tmp_path, capsys):
    main(["predict", str(mixed_folder), "--series", "--json", "--export-dir", str(tiny_export),
          "--plot-dir", str(tmp_path / "plots")])
    captured = capsys.readouterr()
    answers = {answer["label"]: answer for answer in _json_lines(captured.out)}
    assert set(answers) == {"P1_s2_SHARP", "P1_s3_SMOOTH", "P2_s2_SHARP", "P2_s3_SMOOTH", "P3_s7_B"}
    for label, answer in answers.items():
        scored = [item for item in answer["per_slice"] if item["probability"] is not None]
        assert len(answer["per_slice"]) == answer["slices"] == len(scored)
        # Every slice carries the domain check; a synthetic chest slice with lungs passes it.
        assert all(item["in_domain"] == (item["domain_reason"] is None) for item in scored)
        assert all(item["in_domain"] for item in scored if item["in_lungs"])
        if label == "P3_s7_B":
            assert answer["score"] is None and "a single slice" in answer["note"]
            continue
        in_lungs = [item["probability"] for item in scored if item["in_lungs"]]
        assert answer["score"] == max(in_lungs or [item["probability"] for item in scored])
        assert answer["top_slice"]["probability"] == answer["score"]
        assert answer["diagnosis"] in ("Normal", "Cancer") and "highest slice probability" in answer["rule"]
        zs = [item["z"] for item in answer["per_slice"]]
        assert zs == sorted(zs)
        assert (tmp_path / "plots" / f"{label}_z_profile.png").stat().st_size > 5_000
    # the files that are not DICOM slices are named with the reason (the PNG, the VOC boxes)
    assert "photo.png: skipped: not a DICOM file" in captured.err and ".xml: skipped" in captured.err


def test_text_output_names_the_rule_and_the_slice(mixed_folder, tiny_export, capsys):
    main(["predict", str(mixed_folder / "first"), "--series", "--export-dir", str(tiny_export)])
    out = capsys.readouterr().out
    assert out.startswith("chestct predict --series: the series' score is the highest slice probability")
    assert "series P1_s2_SHARP (6 slices, kernel SHARP):" in out and "series score" in out
    assert "maximum over the" in out and "p(cancer)" in out


def test_only_unscorable_series_fail_and_images_without_series_are_refused(tmp_path, tiny_export, capsys):
    hu = phantom_hu(0, SeriesSpec(), np.random.default_rng(0))
    (tmp_path / "one").mkdir()
    (tmp_path / "one" / "a.dcm").write_bytes(slice_dicom(hu, patient_id="P", study_uid="1", series_uid="1.1",
                                                         series_number=1, kernel="B", z=0.0, instance=1))
    with pytest.raises(SystemExit) as stop:
        main(["predict", str(tmp_path / "one"), "--series", "--export-dir", str(tiny_export)])
    assert stop.value.code == 1
    assert "no series score: a single slice" in capsys.readouterr().out
    save_image(tmp_path / "pngs" / "x.png", textured_image(2))
    with pytest.raises(SystemExit):
        main(["predict", str(tmp_path / "pngs"), "--series", "--export-dir", str(tiny_export)])
    assert "no DICOM slice found under" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["predict", str(tmp_path / "pngs"), "--plot-dir", str(tmp_path / "p"), "--export-dir",
              str(tiny_export)])
    assert "--plot-dir saves series z-profiles: add --series" in capsys.readouterr().err
