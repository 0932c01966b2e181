"""The cross-source panel (chestct.external.panel) and its parts, on generated DICOM series and PNG folders.

The "models" here are rules (tests/series_factory.RulePredictor): one reads the tumour's place, one reads global
sharpness. The panel must tell them apart: within one series only the tumour differs, so the lesion rule ranks
tumour slices first and agrees with itself across kernels, and the sharpness rule does neither.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from chestct.external.boxes import BoxFileError, read_box_files, read_voc_boxes
from chestct.external.panel import PanelError, PanelSettings, run_panel
from chestct.external.records import walk_files
from chestct.external.series import list_series
from chestct.external.series_scoring import score_series
from chestct.params import ExternalSetParams, ParamsError, parse_params
from tests.conftest import PROJECT_ROOT, save_image, textured_image
from tests.series_factory import (
    RulePredictor,
    SeriesSpec,
    phantom_hu,
    slice_dicom,
    voc_xml,
    write_annotated_series,
)

SETTINGS = PanelSettings(confidence_level=0.95, bootstrap_resamples=200, seed=0, gradcam_images=4,
                         params_file=PROJECT_ROOT / "params.yaml", progress=False)


@pytest.fixture(scope="module")
def series_set(tmp_path_factory):
    return write_annotated_series(tmp_path_factory.mktemp("panel") / "hospital")


def _annotated(path: Path, name: str = "hospital") -> ExternalSetParams:
    return ExternalSetParams(name=name, path=str(path), kind="annotated_series")


def _run(sets, predictor, tmp_path) -> tuple[dict, dict]:
    return run_panel(sets, predictor, tmp_path / "plots", SETTINGS)


# --- series and boxes ----------------------------------------------------------------------------------------


def test_slices_are_grouped_by_series_and_ordered_along_z(series_set):
    found = list_series(walk_files(series_set.root).files, series_set.root, 1 << 24)
    assert [item.label for item in found.series] == ["PHANTOM-1_s2_SHARP", "PHANTOM-1_s3_SMOOTH"]
    for item in found.series:
        assert item.profiled and len(item.slices) == 16
        assert [header.z for header in item.slices] == sorted(header.z for header in item.slices)
    # the XML boxes are not slices: listed with the reason
    assert len(found.not_dicom) == 8 and all("not a DICOM file" in reason for _, reason in found.not_dicom)


def _write_slices(folder: Path, count: int, **changes) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    spec = SeriesSpec(slices=count)
    for index in range(count):
        options = {"patient_id": "P", "study_uid": "1.2.3", "series_uid": "1.2.3.4", "series_number": 2,
                   "kernel": "B", "z": 5.0 * index, "instance": index + 1}
        options.update({key: value(index) if callable(value) else value for key, value in changes.items()})
        hu = phantom_hu(index, spec, rng)
        if options.pop("small", False):
            hu = hu[:96, :96]
        (folder / f"{index}.dcm").write_bytes(slice_dicom(hu, **options))


@pytest.mark.parametrize(("changes", "problem"), [
    ({}, None),
    ({"z": None}, "without ImagePositionPatient"),
    ({"z": 10.0}, "table position(s) repeated"),
    ({"orientation": [1, 0, 0, 0, 0, -1]}, "not axial"),
    ({"orientation": None}, "without ImageOrientationPatient"),
    ({"small": lambda index: index == 1}, "mixed image sizes"),
])
def test_a_series_that_cannot_be_ordered_says_why(tmp_path, changes, problem):
    _write_slices(tmp_path / "s", 3, **changes)
    (series,) = list_series(walk_files(tmp_path / "s").files, tmp_path / "s", 1 << 24).series
    if problem is None:
        assert series.problems == []
    else:
        assert len(series.problems) == 1 and problem in series.problems[0]


def test_a_single_slice_is_not_a_series_and_gets_no_series_score(tmp_path, default_params):
    _write_slices(tmp_path / "s", 1)
    found = list_series(walk_files(tmp_path / "s").files, tmp_path / "s", 1 << 24)
    (result,) = score_series(RulePredictor("lesion", default_params), found.series, progress=False)
    assert "a single slice" in result.series.problems[0]
    assert result.score is None and result.note.startswith("no series score: a single slice")
    assert result.slices[0].probability is not None  # the slice itself is still scored, on its own


def test_series_score_is_the_highest_slice_with_lung_fields(series_set, default_params):
    found = list_series(walk_files(series_set.root).files, series_set.root, 1 << 24)
    results = score_series(RulePredictor("lesion", default_params), found.series, batch_size=5, progress=False)
    for result in results:
        in_lungs = [item.probability for item in result.slices if item.in_lungs]
        assert in_lungs and result.score == max(in_lungs) and result.top.probability == result.score
        assert result.top.header.sop_uid in series_set.tumour_uids[result.series.first.kernel]
        assert result.decision == 1 and "maximum over the" in result.note
        answer = result.to_dict(0.5)
        assert answer["diagnosis"] == "Cancer" and len(answer["per_slice"]) == 16 and answer["threshold_note"]


def test_voc_boxes_are_read_and_bad_files_are_named(tmp_path):
    good = tmp_path / "1.2.3.xml"
    good.write_text(voc_xml((10, 20, 30, 40)))
    (box,) = read_voc_boxes(good, "a/1.2.3.xml")
    assert (box.x0, box.y0, box.x1, box.y1) == (10, 20, 30, 40) and box.mask((64, 64)).sum() == 21 * 21
    cases = {"broken.xml": ("<annotation><object>", "not well-formed XML"),
             "other.xml": ("<svg></svg>", "not a Pascal VOC annotation"),
             "empty.xml": ("<annotation><object><name>A</name></object></annotation>", "no <object> with a <bndbox>"),
             "flipped.xml": (voc_xml((30, 20, 10, 40)), "xmax < xmin"),
             "words.xml": (voc_xml((10, 20, 30, 40)).replace("<xmin>10", "<xmin>ten"), "no numeric <xmin>")}
    for name, (text, message) in cases.items():
        (tmp_path / name).write_text(text)
        with pytest.raises(BoxFileError, match=message) as error:
            read_voc_boxes(tmp_path / name, f"shown/{name}")
        assert f"shown/{name}" in str(error.value)
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "1.2.3.xml").write_text(voc_xml((1, 1, 2, 2)))
    with pytest.raises(BoxFileError, match="two annotation files for the slice 1.2.3"):
        read_box_files([(good, "1.2.3.xml"), (tmp_path / "b" / "1.2.3.xml", "b/1.2.3.xml")])


# --- the panel: a model that reads the lesion against one that reads sharpness ----------------------------------


def test_the_lesion_reader_follows_the_tumour_and_the_sharpness_reader_does_not(series_set, default_params,
                                                                                 tmp_path):
    lesion, _ = _run([_annotated(series_set.root)], RulePredictor("lesion", default_params), tmp_path / "lesion")
    sharp, details = _run([_annotated(series_set.root)], RulePredictor("sharpness", default_params),
                          tmp_path / "sharp")
    lesion, sharp = lesion["hospital"], sharp["hospital"]
    for figures in (lesion, sharp):
        assert (figures["n"], figures["series"], figures["boxed_slices"], figures["kernel_pairs"]) == (32, 2, 8, 1)
        assert figures["kernel_paired_slices"] == 16 and figures["skipped"] == 0  # the XML files are the boxes
        assert figures["in_box_gradcam_share"] is None  # a rule has no Grad-CAM: said, not invented
        assert figures["in_box_lesion_map_share"] is None  # nor a lesion map
        assert figures["out_of_domain_share"] == 0.0  # synthetic chest slices with lungs: axial chest CT
    assert lesion["within_series_auc"] >= 0.95 and lesion["kernel_agreement"] >= 0.95
    assert lesion["lesion_sensitivity"] == 1.0 and lesion["other_slices_positive_rate"] == 0.0
    assert lesion["kernel_mean_abs_diff"] < 0.05
    assert sharp["within_series_auc"] <= 0.8 and sharp["kernel_agreement"] <= 0.5
    assert sharp["kernel_mean_abs_diff"] > 0.5
    assert set(lesion["within_series_auc_per_series"]) == {"PHANTOM-1_s2_SHARP", "PHANTOM-1_s3_SMOOTH"}
    folder = tmp_path / "sharp" / "plots" / "hospital"
    assert {"report.json", "slices.csv", "z_profile.png"} <= {path.name for path in folder.iterdir()}
    report = json.loads((folder / "report.json").read_text())
    assert report["figures"] == sharp and report["kernel_pairs"] == details["hospital"]["kernel_pairs"]


def test_normal_only_gives_specificity_with_its_interval_and_lists_what_it_skipped(tmp_path, default_params):
    folder = tmp_path / "normals"
    for index in range(6):
        save_image(folder / "scan" / f"{index}.png", textured_image(index))
    (folder / "slices.csv").write_text("file,patient\n")
    (folder / "scan" / "link.png").symlink_to(folder / "scan" / "0.png")  # never followed
    predictor = RulePredictor("lesion", default_params)
    metrics, details = _run([ExternalSetParams(name="normals", path=str(folder), kind="normal_only")], predictor,
                            tmp_path)
    figures = metrics["normals"]
    scores = predictor.probabilities(np.stack([predictor.prepare(folder / "scan" / f"{i}.png") for i in range(6)]))
    assert figures["n"] == 6 and figures["specificity"] == pytest.approx(np.mean(scores < 0.5), abs=1e-6)
    low, high = figures["specificity_ci"]
    assert 0.0 <= low <= figures["specificity"] <= high <= 1.0
    assert figures["skipped"] == 2
    reasons = {item["file"]: item["reason"] for item in details["normals"]["skipped"]}
    assert "not a recognised image" in reasons["slices.csv"] and "symbolic link" in reasons["scan/link.png"]
    assert figures["score_p05"] <= figures["score_p50"] <= figures["score_p95"]
    # The domain check's first layer on each scored image: the share it flags, and specificity on the rest.
    from chestct.imaging.domain import check_chest_ct

    passed = np.array([check_chest_ct(predictor.decode(folder / "scan" / f"{i}.png")).passed for i in range(6)])
    assert figures["out_of_domain_share"] == pytest.approx(1 - passed.mean(), abs=1e-4)
    if passed.any():
        assert figures["specificity_in_domain"] == pytest.approx(np.mean(scores[passed] < 0.5), abs=1e-4)
    else:
        assert figures["specificity_in_domain"] is None


# --- bad input -----------------------------------------------------------------------------------------------------


def test_a_missing_set_path_stops_before_any_scoring(tmp_path, default_params):
    with pytest.raises(PanelError, match="external set 'gone': path .*missing.* does not exist"):
        _run([ExternalSetParams(name="gone", path=str(tmp_path / "missing"), kind="normal_only")],
             RulePredictor("lesion", default_params), tmp_path)
    (tmp_path / "file").write_text("x")
    with pytest.raises(PanelError, match="'file_set': path .* is a file"):
        _run([ExternalSetParams(name="file_set", path=str(tmp_path / "file"), kind="normal_only")],
             RulePredictor("lesion", default_params), tmp_path)


def test_a_set_without_images_stops_naming_the_set(tmp_path, default_params):
    (tmp_path / "empty").mkdir()
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "readme.txt").write_text("nothing here")
    predictor = RulePredictor("lesion", default_params)
    with pytest.raises(PanelError, match="'empty': no image under .* could be scored .the folder is empty"):
        _run([ExternalSetParams(name="empty", path=str(tmp_path / "empty"), kind="normal_only")], predictor, tmp_path)
    with pytest.raises(PanelError, match=r"'notes': no image .*1 files left out: readme.txt"):
        _run([ExternalSetParams(name="notes", path=str(tmp_path / "notes"), kind="normal_only")], predictor, tmp_path)
    with pytest.raises(PanelError, match="'notes': no DICOM slice under"):
        _run([_annotated(tmp_path / "notes", "notes")], predictor, tmp_path)


def test_boxes_that_match_no_slice_are_listed_or_stop_the_set(series_set, tmp_path, default_params):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(series_set.root, copy)
    (copy / "Annotation" / "PHANTOM-1" / "9.9.9.xml").write_text(voc_xml((1, 1, 5, 5)))
    predictor = RulePredictor("lesion", default_params)
    metrics, details = _run([_annotated(copy)], predictor, tmp_path / "a")
    orphan = [item for item in details["hospital"]["skipped"] if item["file"].endswith("9.9.9.xml")]
    assert orphan and "names the slice 9.9.9, which is not in the set" in orphan[0]["reason"]
    assert metrics["hospital"]["boxed_slices"] == 8
    for path in (copy / "Annotation" / "PHANTOM-1").glob("*.xml"):  # every box misnamed: nothing to measure
        path.rename(path.with_name(f"x{path.name}"))
    with pytest.raises(PanelError, match=r"'hospital': no box matches a slice \(9 XML files, e.g. .* each must be "
                                         r"named <SOPInstanceUID>.xml\)"):
        _run([_annotated(copy)], predictor, tmp_path / "b")
    (copy / "Annotation" / "PHANTOM-1" / "x9.9.9.xml").write_text("<annotation>")
    with pytest.raises(PanelError, match="'hospital': .*x9.9.9.xml: not well-formed XML"):
        _run([_annotated(copy)], predictor, tmp_path / "c")


def test_a_labelled_set_with_one_class_stops_naming_the_set(tmp_path, tiny_export):
    from chestct.serving.predictor import Predictor

    folder = tmp_path / "clinic"
    for index in range(3):
        save_image(folder / "Normal" / f"{index}.png", textured_image(index))
    (folder / "Tumour").mkdir()
    entry = ExternalSetParams(name="clinic", path=str(folder), kind="labelled", label_map=["Normal=0", "Tumour=1"])
    with pytest.raises(PanelError, match="external set 'clinic' .*: .*Cancer"):
        _run([entry], Predictor(tiny_export), tmp_path)


def test_a_labelled_set_is_scored_by_evaluate_external_itself(tmp_path, tiny_export):
    from chestct.serving.predictor import Predictor
    from tests.serving_support import phantom_images

    folder = tmp_path / "clinic"
    for index, (label, gray) in enumerate(phantom_images(count=8, seed=5)):
        save_image(folder / ("Tumour" if label else "Benign") / f"{index}.png", gray)
    entry = ExternalSetParams(name="clinic", path=str(folder), kind="labelled", label_map=["Benign=0", "Tumour=1"])
    metrics, _ = _run([entry], Predictor(tiny_export), tmp_path)
    figures = metrics["clinic"]
    report = json.loads((tmp_path / "plots" / "clinic" / "metrics.json").read_text())  # evaluate-external's folder
    assert figures["n"] == 8 == report["metrics"]["n"]
    for key in ("auc", "sensitivity", "specificity"):
        assert figures[key] == pytest.approx(report["metrics"][key], abs=1e-6), key
    assert figures["auc_ci"] == report["metrics"]["auc_ci"] and report["threshold"]["value"] == pytest.approx(
        Predictor(tiny_export).threshold)


def test_the_params_refuse_repeated_names_and_misplaced_label_maps(default_params):
    raw = default_params.model_dump(mode="json")

    def with_sets(sets):
        return parse_params({**raw, "external": {"sets": sets}})

    one = {"name": "a", "path": "x", "kind": "normal_only"}
    assert with_sets([one]).external.sets[0].name == "a"
    with pytest.raises(ParamsError, match="set names repeat \\(a\\)"):
        with_sets([one, one])
    with pytest.raises(ParamsError, match="is labelled: give its label_map"):
        with_sets([{**one, "kind": "labelled"}])
    with pytest.raises(ParamsError, match="label_map is for labelled sets only"):
        with_sets([{**one, "label_map": ["N=0", "C=1"]}])
    with pytest.raises(ParamsError, match="external.sets.0.name"):
        with_sets([{**one, "name": "has.dot"}])  # a dot would split the key in metrics/external.json
    with pytest.raises(ParamsError, match="external.sets.0.kind"):
        with_sets([{**one, "kind": "folders"}])


def test_the_export_does_not_depend_on_the_external_sets(default_params):
    from chestct.export.metadata import params_digest

    raw = default_params.model_dump(mode="json")
    declared = parse_params({**raw, "external": {"sets": [{"name": "a", "path": "x", "kind": "normal_only"}]}})
    assert params_digest(declared) == params_digest(default_params)
    assert params_digest(default_params.model_copy(update={"seed": 7})) != params_digest(default_params)


# --- the stage with no set -------------------------------------------------------------------------------------------


def test_the_stage_with_no_set_writes_an_empty_report_at_once(tmp_path):
    (tmp_path / "params.yaml").write_text((PROJECT_ROOT / "params.yaml").read_text())
    env = {**os.environ, "PYTHONPATH": str(PROJECT_ROOT)}
    started = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "stages.external"], cwd=tmp_path, env=env, capture_output=True,
                            text=True, timeout=120)
    elapsed = time.perf_counter() - started
    assert result.returncode == 0, result.stderr
    assert json.loads((tmp_path / "metrics/external.json").read_text()) == {}
    assert json.loads((tmp_path / "plots/external/index.json").read_text())["sets"] == []
    assert "no set declared" in result.stdout
    assert "tensorflow" not in result.stderr.lower()  # the model and TensorFlow were never loaded
    assert elapsed < 10, f"{elapsed:.1f} s (a whole interpreter start included; the stage itself is well under 1 s)"
