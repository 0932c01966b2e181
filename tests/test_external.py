"""`chestct evaluate-external` on a generated phantom folder with custom class-folder names.

The folder: "Benign scans" (Normal: 5 PNG + 1 DICOM, a corrupt PNG, a .DS_Store, a FIFO and a link to itself),
"Tumour scans" (Cancer: 6 PNG, a byte copy of one of them in a sub-folder, a byte copy of a Benign scan, i.e. one
content under both labels, and links to the Benign folder and to a Benign file, which are skipped, not followed)
and an unmapped "Other" folder. The command runs once per configuration (default, --dedup, swapped map).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from chestct.cli import main
from chestct.evaluation.metrics import binary_metrics
from chestct.external.records import ExternalDataError, discover_files, parse_label_map
from tests.conftest import PROJECT_ROOT
from tests.dicom_factory import phantom_to_dicom
from tests.serving_support import phantom_images, png_bytes

PARAMS = PROJECT_ROOT / "params.yaml"
MAP = ["Benign scans=0", "Tumour scans=Cancer"]
OUTPUTS = {"metrics.json", "predictions.csv", "roc.png", "scores.png", "gradcam_errors.png"}


def make_phantom_folder(root: Path) -> Path:
    data = root / "hospital"
    benign, tumour, other = data / "Benign scans", data / "Tumour scans", data / "Other"
    for folder in (benign, tumour / "sub", other):
        folder.mkdir(parents=True)
    phantoms = phantom_images(count=12, seed=7)
    normals = [gray for label, gray in phantoms if label == 0]
    cancers = [gray for label, gray in phantoms if label == 1]
    for index, gray in enumerate(normals[:5]):
        (benign / f"b{index}.png").write_bytes(png_bytes(gray))
    (benign / "slice.dcm").write_bytes(phantom_to_dicom(normals[5]))
    (benign / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)
    (benign / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    for index, gray in enumerate(cancers):
        fmt = "JPEG" if index == 5 else "PNG"
        (tumour / f"t{index}.{fmt.lower()}").write_bytes(png_bytes(gray, fmt=fmt))
    shutil.copyfile(tumour / "t0.png", tumour / "sub" / "copy.png")  # same label duplicate
    shutil.copyfile(benign / "b1.png", tumour / "mislabelled.png")  # one content under both labels
    (other / "x.png").write_bytes(png_bytes(normals[0]))
    (data / "notes.txt").write_text("loose file beside the class folders")
    for name, points_to in SKIPPED_LINKS.items():
        (data / name).symlink_to(points_to)
    os.mkfifo(benign / "fifo.png")  # reading it would wait forever for a writer
    return data


# Followed, these would file Benign images under Cancer too (and the loop would never resolve).
SKIPPED_LINKS = {"Tumour scans/linked_benign": "../Benign scans", "Tumour scans/link.png": "../Benign scans/b0.png",
                 "Benign scans/loop.png": "loop.png"}
SKIPPED_REASONS = {"Benign scans/fifo.png": "not a regular file (a FIFO)",
                   "Benign scans/loop.png": "a broken symbolic link or a link loop",
                   "Tumour scans/link.png": "a symbolic link to a file, not followed",
                   "Tumour scans/linked_benign": "a symbolic link to a folder, not followed"}


@pytest.fixture(scope="module")
def phantom_dir(tmp_path_factory) -> Path:
    return make_phantom_folder(tmp_path_factory.mktemp("external"))


@pytest.fixture(scope="module")
def runs(phantom_dir, tiny_export, tmp_path_factory):
    """The command once per configuration; returns {name: (out folder, stdout)}."""
    work = tmp_path_factory.mktemp("external_runs")
    results = {}
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(work)  # the default --out is relative to the working folder
        capture = _Capture(patch)
        common = ["--export-dir", str(tiny_export), "--params", str(PARAMS)]
        main(["evaluate-external", str(phantom_dir), "--label-map", *MAP, *common])
        results["default"] = (work / "reports" / "external" / "hospital", capture.take())
        main(["evaluate-external", str(phantom_dir), "--label-map", *MAP, "--dedup", "--out", "dedup", *common])
        results["dedup"] = (work / "dedup", capture.take())
        main(["evaluate-external", str(phantom_dir), "--label-map", "Benign scans=1", "Tumour scans=normal",
              "--out", "swapped", *common])
        results["swapped"] = (work / "swapped", capture.take())
    return results


class _Capture:
    """stdout of the in-process command for a module-scoped fixture (capsys is function-scoped)."""

    def __init__(self, patch: pytest.MonkeyPatch):
        import io
        import sys

        self.buffer = io.StringIO()
        patch.setattr(sys, "stdout", self.buffer)

    def take(self) -> str:
        text = self.buffer.getvalue()
        self.buffer.seek(0)
        self.buffer.truncate()
        return text


def load(run) -> tuple[dict, pd.DataFrame]:
    folder, _ = run
    report = json.loads((folder / "metrics.json").read_text())
    table = pd.read_csv(folder / "predictions.csv", float_precision="round_trip")
    return report, table


def test_every_output_is_written_with_the_right_counts(runs):
    folder, stdout = runs["default"]
    assert {path.name for path in folder.iterdir()} == OUTPUTS
    assert not [path for path in folder.parent.iterdir() if path.name.startswith(".")]  # no temporary left over
    report, table = load(runs["default"])
    counts = report["counts"]
    assert counts["files"] == 15 and counts["hidden_skipped"] == 1 and counts["unreadable"] == 1
    assert counts["scored"] == 14 and counts["scored_by_class"] == {"Normal": 6, "Cancer": 8}
    assert report["label_map"]["Benign scans"] == {"label": 0, "class": "Normal", "files": 7, "unreadable": 1,
                                                   "scored": 6}
    assert report["label_map"]["Tumour scans"]["scored"] == 8
    assert len(table) == 14 and set(table.columns) >= {"file", "label", "probability", "decision"}
    assert "Tumour scans/sub/copy.png" in set(table["file"]) and "Benign scans/slice.dcm" in set(table["file"])
    assert report["ignored"]["folders"] == [{"folder": "Other", "files": 1}]
    assert report["ignored"]["loose_files"] == 1
    assert report["model"]["format"] == "keras" and report["threshold"]["chosen_on"] == "valid"
    assert report["limits"] and "patient" in report["limits"][0]
    assert counts["skipped"] == len(SKIPPED_REASONS)
    for text in ("AUC", "sensitivity", "specificity", "intensity shortcut AUC", "unreadable: Benign scans/broken.png",
                 "duplicates: 2 exact groups (4 files), 1 across labels", "report: reports/external/hospital/"):
        assert text in stdout, text


def test_links_and_non_regular_files_are_listed_as_skipped_with_the_reason(runs):
    report, table = load(runs["default"])
    skipped = {entry["file"]: entry for entry in report["skipped"]}
    assert set(skipped) == set(SKIPPED_REASONS)
    for name, reason in SKIPPED_REASONS.items():
        assert reason in skipped[name]["reason"], name
        assert f"skipped: {name}: {reason}" in runs["default"][1]
    assert skipped["Tumour scans/linked_benign"]["folder"] == "Tumour scans"
    assert set(skipped).isdisjoint(set(table["file"]))
    assert not table["file"].str.startswith("Tumour scans/linked_benign/").any()
    assert "4 skipped (links, non-regular files)" in runs["default"][1]


def test_the_corrupt_file_is_reported_and_skipped(runs):
    report, table = load(runs["default"])
    (entry,) = report["unreadable"]
    assert entry["file"] == "Benign scans/broken.png" and entry["label"] == 0
    assert "truncated" in entry["reason"] or "not a recognised image" in entry["reason"]  # the decoder's words
    assert "Benign scans/broken.png" not in set(table["file"])


def test_duplicates_are_reported_and_dedup_scores_each_content_once(runs):
    report, _ = load(runs["default"])
    duplicates = report["duplicates"]
    assert (duplicates["groups"], duplicates["files_in_groups"], duplicates["cross_label_groups"]) == (2, 4, 1)
    cross = [group for group in duplicates["group_list"] if group["cross_label"]]
    assert cross[0]["files"] == ["Benign scans/b1.png", "Tumour scans/mislabelled.png"]

    dedup_report, dedup_table = load(runs["dedup"])
    counts = dedup_report["counts"]
    assert counts["scored"] == 11 and counts["scored_by_class"] == {"Normal": 5, "Cancer": 6}
    assert counts["duplicate_copies_left_out"] == 1 and counts["conflicting_files_left_out"] == 2
    # The first path in sorted order is kept ("sub/copy.png" sorts before "t0.png").
    assert {"Tumour scans/t0.png", "Benign scans/b1.png", "Tumour scans/mislabelled.png"}.isdisjoint(
        set(dedup_table["file"]))
    assert "Tumour scans/sub/copy.png" in set(dedup_table["file"])
    assert "--dedup left out 1 copies and 2 conflicting files" in runs["dedup"][1]


def test_the_label_map_is_honoured(runs):
    _, table = load(runs["default"])
    swapped_report, swapped = load(runs["swapped"])
    merged = table.merge(swapped, on="file", suffixes=("", "_swapped"))
    assert len(merged) == len(table) == len(swapped)
    assert (merged["label"] == np.where(merged["folder"] == "Benign scans", 0, 1)).all()
    assert (merged["label_swapped"] == 1 - merged["label"]).all()
    np.testing.assert_array_equal(merged["probability"], merged["probability_swapped"])
    assert swapped_report["counts"]["scored_by_class"] == {"Normal": 8, "Cancer": 6}


def test_metrics_match_the_evaluate_stage_functions_on_the_same_predictions(runs, default_params):
    for name in ("default", "dedup"):
        report, table = load(runs[name])
        settings = default_params.evaluate
        expected = binary_metrics(table["label"].to_numpy(), table["probability"].to_numpy(),
                                  report["threshold"]["value"], level=settings.confidence_level,
                                  resamples=settings.bootstrap_resamples, seed=default_params.seed)
        assert report["metrics"] == json.loads(json.dumps(expected))
        assert (table["decision"] == (table["probability"] >= report["threshold"]["value"])).all()
        shortcut = report["shortcut"]
        assert shortcut["folds"] == 5 and 0.0 <= shortcut["intensity_std_auc"] <= 1.0
        assert "out-of-fold" in shortcut["method"]


def test_probabilities_equal_the_predictor_on_the_same_files(runs, phantom_dir, tiny_export):
    from chestct.serving.predictor import Predictor

    _, table = load(runs["default"])
    predictor = Predictor(tiny_export)
    images = np.stack([predictor.prepare(phantom_dir / name, name) for name in table["file"]])
    np.testing.assert_allclose(table["probability"], predictor.probabilities(images), rtol=0, atol=1e-6)
    assert predictor.threshold == json.loads((runs["default"][0] / "metrics.json").read_text())["threshold"]["value"]


def test_gradcam_grid_shows_errors_or_says_why(runs):
    report, table = load(runs["default"])
    gradcam = report["gradcam"]
    errors = int(((table["outcome"] == "FP") | (table["outcome"] == "FN")).sum())
    assert gradcam["tiles"] == min(8, errors)
    assert {tile["outcome"] for tile in gradcam["shown"]} <= {"FP", "FN"}
    assert (gradcam["reason"] is None) == (errors > 0)


def test_label_map_parsing_accepts_names_and_nested_folders(tmp_path):
    for folder in ("test/Normal", "test/Cancer", "test/Unknown", "extra"):
        (tmp_path / folder).mkdir(parents=True)
    (tmp_path / "test" / "Normal" / "a.png").write_bytes(b"x")
    mapping = parse_label_map(["test/Normal=NORMAL", "test/Cancer/=1"], tmp_path)
    assert mapping == {"test/Normal": 0, "test/Cancer": 1}
    found = discover_files(tmp_path, mapping)
    assert [item.relative for item in found.files] == ["test/Normal/a.png"]
    assert found.ignored_folders == [{"folder": "extra", "files": 0}, {"folder": "test/Unknown", "files": 0}]


@pytest.mark.parametrize(("label_map", "message"), [
    (["Benign scans", "Tumour scans=1"], "has no '='"),
    (["Benign scans=0", "Tumour scans=maybe"], "unknown label 'maybe'"),
    (["benign scans=0", "Tumour scans=1"], "'benign scans' is not a folder"),
    (["Benign scans=0", "Other=0"], "names no Cancer folder"),
    (["Benign scans=0", "../hospital=1"], "must be a sub-folder"),
    (["Benign scans=0", "Benign scans=1"], "entries 'Benign scans=0' and 'Benign scans=1' name the same folder: "
                                           "one folder cannot hold both Normal and Cancer"),
    (["Benign scans=0", "Tumour scans/linked_benign=1"],
     "entries 'Benign scans=0' and 'Tumour scans/linked_benign=1' name the same folder (both resolve to "
     "'Benign scans', through a link)"),
    (["Benign scans=0", "Tumour scans=1", "Tumour scans/linked_benign/=normal"], "'Benign scans=0' and "
     "'Tumour scans/linked_benign/=normal' name the same folder (both resolve to 'Benign scans', through a link): "
     "its files would be counted twice"),
])
def test_label_map_errors_name_the_problem(phantom_dir, tmp_path, capsys, label_map, message):
    with pytest.raises(SystemExit) as exit_info:
        main(["evaluate-external", str(phantom_dir), "--label-map", *label_map, "--out", str(tmp_path / "out"),
              "--export-dir", str(tmp_path / "no-export"), "--params", str(PARAMS)])
    assert exit_info.value.code == 1
    err = capsys.readouterr().err
    assert err.startswith("chestct evaluate-external: ") and message in err and "Traceback" not in err


def test_refusals_come_before_any_model_work(phantom_dir, tmp_path, capsys):
    one_class = tmp_path / "one_class"
    for folder in ("Normal", "Cancer"):
        (one_class / folder).mkdir(parents=True)
    (one_class / "Normal" / "a.png").write_bytes(b"x")
    not_a_report = tmp_path / "results"
    not_a_report.mkdir()
    (not_a_report / "keep.txt").write_text("not a report")
    cases = [
        ([str(tmp_path / "missing"), "--label-map", *MAP], "folder not found"),
        ([str(one_class), "--label-map", "Normal=0", "Cancer=1"], "no files under 'Cancer' (mapped to Cancer)"),
        ([str(phantom_dir), "--label-map", *MAP, "--out", str(not_a_report)], "not an earlier external-validation"),
        ([str(phantom_dir), "--label-map", *MAP, "--out", str(phantom_dir / "Benign scans" / "r")],
         "inside the mapped folder"),
    ]
    for args, message in cases:
        with pytest.raises(SystemExit):  # the export folder does not exist: every refusal comes before loading it
            main(["evaluate-external", *args, "--export-dir", str(tmp_path / "no-export"), "--params", str(PARAMS)])
        assert message in capsys.readouterr().err
    assert (not_a_report / "keep.txt").exists()


def test_a_class_left_without_readable_images_is_an_error_naming_the_files(tiny_export, tmp_path, capsys):
    data = tmp_path / "scans"
    for folder in ("N", "C"):
        (data / folder).mkdir(parents=True)
    (data / "N" / "a.png").write_bytes(png_bytes(phantom_images(count=1)[0][1]))
    (data / "C" / "empty.png").write_bytes(b"")
    with pytest.raises(SystemExit):
        main(["evaluate-external", str(data), "--label-map", "N=0", "C=1", "--out", str(tmp_path / "out"),
              "--export-dir", str(tiny_export), "--params", str(PARAMS)])
    err = capsys.readouterr().err
    assert "no readable images under 'C' (mapped to Cancer)" in err and "C/empty.png: the file is empty" in err
    assert not (tmp_path / "out").exists()


def test_parse_label_map_refuses_overlapping_folders(phantom_dir):
    (phantom_dir / "Tumour scans" / "sub").mkdir(exist_ok=True)
    with pytest.raises(ExternalDataError, match="overlap"):
        parse_label_map(["Tumour scans=1", "Tumour scans/sub=0"], phantom_dir)


def test_overlap_is_judged_on_resolved_folders(tmp_path):
    """The issue's map: normal/loop_up points at the data folder itself, so it holds cancer/ as well."""
    data = tmp_path / "scans"
    for folder in ("normal", "cancer"):
        (data / folder).mkdir(parents=True)
    (data / "normal" / "loop_up").symlink_to("..")
    with pytest.raises(ExternalDataError) as same:
        parse_label_map(["normal/loop_up/cancer=0", "cancer=1"], data)
    assert str(same.value).startswith("label map entries 'normal/loop_up/cancer=0' and 'cancer=1' name the same "
                                      "folder (both resolve to 'cancer', through a link)")
    with pytest.raises(ExternalDataError) as nested:
        parse_label_map(["normal/loop_up=0", "cancer=1"], data)
    assert ("label map entries 'normal/loop_up=0' and 'cancer=1' overlap: 'cancer' resolves to 'cancer', inside "
            "'normal/loop_up' (" in str(nested.value))
    assert parse_label_map(["normal=0", "cancer=1"], data) == {"normal": 0, "cancer": 1}
    listed = discover_files(data, {"normal": 0, "cancer": 1})
    assert listed.skipped == [{"file": "normal/loop_up", "folder": "normal",
                               "reason": listed.skipped[0]["reason"]}]
    assert "a symbolic link to a folder, not followed" in listed.skipped[0]["reason"]
