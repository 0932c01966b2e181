"""The `chestct` command: params check and the model's view of an image."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from chestct.cli import main
from tests.conftest import PROJECT_ROOT, save_image, textured_image


def test_check_params_prints_resolved_values(capsys):
    main(["check-params", "--params", str(PROJECT_ROOT / "params.yaml")])
    out = capsys.readouterr().out
    assert "valid" in out and "backbone: densenet121" in out


def test_check_params_names_the_bad_key(tmp_path, capsys):
    bad = tmp_path / "params.yaml"
    bad.write_text((PROJECT_ROOT / "params.yaml").read_text().replace("image_size: 256", "image_size: 3"))
    with pytest.raises(SystemExit) as exit_info:
        main(["check-params", "--params", str(bad)])
    assert exit_info.value.code == 1
    assert "preprocess.image_size" in capsys.readouterr().err


def test_preprocess_saves_the_model_view_and_reports_bad_files(tmp_path, capsys):
    good = save_image(tmp_path / "scan.png", textured_image(3), "PNG", "RGBA")
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"")
    with pytest.raises(SystemExit):
        main(["preprocess", str(good), str(broken), "--out-dir", str(tmp_path / "out"),
              "--params", str(PROJECT_ROOT / "params.yaml")])
    saved = np.asarray(Image.open(tmp_path / "out" / "scan.png"))
    assert saved.shape == (256, 256) and saved.std() > 5
    assert "broken.png: skipped" in capsys.readouterr().err


def bad_inputs(folder: Path) -> dict[Path, str]:
    """Paths the CLI must refuse one line each, without a traceback or a hang: path -> the reason expected."""
    lab = folder / "lab.tif"
    Image.new("LAB", (16, 16), (128, 10, 200)).save(lab)
    fifo = folder / "pipe.png"
    os.mkfifo(fifo)
    loop = folder / "loop.png"
    loop.symlink_to(loop)
    return {lab: "TIFF content is not accepted (only PNG, JPEG or DICOM)",
            fifo: "is a FIFO (named pipe), not a regular file",
            loop: "too many levels of symbolic links (a symlink loop)",
            lab / "inner.png": "a part of the path is a file, not a folder",
            folder / ("n" * 300 + ".png"): "the file name or path is too long"}


def assert_one_line_per_bad_file(err: str, bad: dict[Path, str], tag: str) -> None:
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == len(bad)
    for path, reason in bad.items():
        assert sum(line.startswith(f"{path}: {tag}: ") and reason in line for line in lines) == 1, (path, err)


def test_preprocess_reports_every_bad_path_and_saves_the_good_files(tmp_path, capsys):
    good = save_image(tmp_path / "scan.png", textured_image(3))
    bad = bad_inputs(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        main(["preprocess", *map(str, bad), str(good), "--out-dir", str(tmp_path / "out"),
              "--params", str(PROJECT_ROOT / "params.yaml")])
    assert exit_info.value.code == 1
    captured = capsys.readouterr()
    assert_one_line_per_bad_file(captured.err, bad, "skipped")
    assert captured.out.startswith(f"{good} -> ") and (tmp_path / "out" / "scan.png").is_file()


def test_preprocess_of_a_dicom_uses_the_serve_dicom_window_from_params(tmp_path, capsys):
    import yaml

    from chestct.imaging.preprocess import preprocess_gray
    from chestct.imaging.transforms import apply_window
    from chestct.params import load_params
    from tests.dicom_factory import make_ct_dicom

    hu = np.round(np.tile(np.linspace(-1200, 400, 64), (48, 1)))  # a left-to-right Hounsfield ramp, whole HU
    scan = tmp_path / "slice.dcm"
    scan.write_bytes(make_ct_dicom(hu))
    raw = yaml.safe_load((PROJECT_ROOT / "params.yaml").read_text())
    outputs = {}
    for center, width in ((-600, 1500), (40, 400)):  # lung and soft-tissue windows give different images
        raw["serve"]["dicom_window"] = {"center": center, "width": width}
        params_file = tmp_path / f"params_{center}.yaml"
        params_file.write_text(yaml.safe_dump(raw))
        main(["preprocess", str(scan), "--out-dir", str(tmp_path / str(center)), "--params", str(params_file)])
        outputs[center] = np.asarray(Image.open(tmp_path / str(center) / "slice.png"))
        expected = preprocess_gray(apply_window(hu, center, width), load_params(params_file).preprocess)
        np.testing.assert_array_equal(outputs[center], expected[:, :, 0])
    assert not np.array_equal(outputs[-600], outputs[40])


def test_predict_prints_one_line_per_file_and_reports_bad_ones(tiny_export, tmp_path, capsys):
    from tests.serving_support import phantom_images, png_bytes

    scans = []
    for index, (_, gray) in enumerate(phantom_images(count=2)):
        scans.append(tmp_path / f"scan{index}.png")
        scans[-1].write_bytes(png_bytes(gray))
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n")
    with pytest.raises(SystemExit) as exit_info:
        main(["predict", str(scans[0]), str(broken), str(scans[1]), "--export-dir", str(tiny_export),
              "--gradcam-dir", str(tmp_path / "cams")])
    assert exit_info.value.code == 1
    captured = capsys.readouterr()
    lines = captured.out.strip().splitlines()
    assert len(lines) == 2 and all("p(cancer)" in line and "[keras " in line for line in lines)
    assert lines[0].startswith(f"{scans[0]}: ") and lines[1].startswith(f"{scans[1]}: ")
    assert f"{broken}: error:" in captured.err
    assert sorted(p.name for p in (tmp_path / "cams").iterdir()) == ["scan0_gradcam.png", "scan1_gradcam.png"]


def test_predict_reports_every_bad_path_in_one_line_and_predicts_the_others(tiny_export, tmp_path, capsys):
    from tests.serving_support import phantom_images, png_bytes

    bad = bad_inputs(tmp_path)
    scans = []
    for index, (_, gray) in enumerate(phantom_images(count=2)):
        scans.append(tmp_path / f"scan{index}.png")
        scans[-1].write_bytes(png_bytes(gray))
    paths = [scans[0], *bad, scans[1]]
    with pytest.raises(SystemExit) as exit_info:
        main(["predict", *map(str, paths), "--export-dir", str(tiny_export)])
    assert exit_info.value.code == 1
    captured = capsys.readouterr()
    assert_one_line_per_bad_file(captured.err, bad, "error")
    lines = captured.out.strip().splitlines()
    assert len(lines) == 2 and lines[0].startswith(f"{scans[0]}: ") and lines[1].startswith(f"{scans[1]}: ")


def test_predict_json_matches_the_predictor(tiny_export, tmp_path, capsys):
    import json

    from chestct.serving.predictor import Predictor
    from tests.serving_support import phantom_images, png_bytes

    scan = tmp_path / "scan.png"
    scan.write_bytes(png_bytes(phantom_images(count=1)[0][1]))
    main(["predict", str(scan), "--json", "--export-dir", str(tiny_export), "--formats", "savedmodel"])
    printed = json.loads(capsys.readouterr().out)
    expected = Predictor(tiny_export, formats=("savedmodel",)).predict_file(scan).to_dict()
    assert printed == expected and printed["model"]["format"] == "savedmodel"


def test_predict_without_a_model_says_how_to_get_one(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["predict", str(tmp_path / "x.png"), "--export-dir", str(tmp_path / "none")])
    assert "dvc repro" in capsys.readouterr().err


def test_serve_starts_the_service(tiny_export):
    import subprocess
    import sys
    import time

    import httpx

    from tests.serving_support import free_port

    port = free_port()
    command = [sys.executable, "-c", "from chestct.cli import main; main()", "serve", "--port", str(port),
               "--export-dir", str(tiny_export), "--formats", "tflite_float32"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                health = httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).json()
                break
            except httpx.TransportError:
                assert process.poll() is None, process.stdout.read()
                assert time.monotonic() < deadline, "chestct serve did not answer within 90 s"
                time.sleep(0.5)
        assert health == {"status": "ok", "model_loaded": True, "format": "tflite_float32"}
        assert httpx.get(f"http://127.0.0.1:{port}/").status_code == 200
    finally:
        process.terminate()
        process.wait(timeout=30)


# --- chestct predict DIR --csv: a folder scored in batches ------------------------------------------------------


def _scan_folder(root: Path) -> dict[str, Path]:
    """Three phantom scans (one two folders down), a broken file, a dotfile and a link: name -> path."""
    from tests.serving_support import phantom_images, png_bytes

    images = [gray for _, gray in phantom_images(count=3)]
    paths = {"a.png": root / "a.png", "b.png": root / "sub" / "b.png", "c.png": root / "sub" / "deeper" / "c.png",
             "broken.png": root / "sub" / "broken.png"}
    for path in paths.values():
        path.parent.mkdir(parents=True, exist_ok=True)
    for name, gray in zip(("a.png", "b.png", "c.png"), images, strict=True):
        paths[name].write_bytes(png_bytes(gray))
    paths["broken.png"].write_bytes(b"\x89PNG\r\n")
    (root / ".hidden.png").write_bytes(png_bytes(images[0]))
    paths["link.png"] = root / "link.png"
    paths["link.png"].symlink_to(paths["a.png"])
    return paths


def test_predict_csv_scores_a_folder_recursively_one_row_per_file(tiny_export, tmp_path, capsys):
    import csv

    from chestct.external.batch import CSV_COLUMNS
    from chestct.serving.predictor import Predictor

    paths = _scan_folder(tmp_path / "scans")
    out = tmp_path / "reports" / "predictions.csv"
    main(["predict", str(tmp_path / "scans"), "--csv", str(out), "--export-dir", str(tiny_export),
          "--batch-size", "2"])  # two batches: a full one and a partial one
    captured = capsys.readouterr()
    assert "3 files scored, 2 not (the reason is in the error column); 1 hidden entries" in captured.out
    assert "scoring" in captured.err  # the progress bar
    with open(out, newline="") as handle:
        reader = csv.DictReader(handle)
        rows = {Path(row["file"]).name: row for row in reader}
        assert tuple(reader.fieldnames) == CSV_COLUMNS
    assert set(rows) == {"a.png", "b.png", "c.png", "broken.png", "link.png"}  # the dotfile is not read
    predictor = Predictor(tiny_export)
    for name in ("a.png", "b.png", "c.png"):
        expected = predictor.predict_file(paths[name])
        row = rows[name]
        assert row["file"] == str(paths[name]) and row["error"] == ""
        assert float(row["probability"]) == expected.cancer_probability  # every digit kept
        assert float(row["probability_calibrated"]) == expected.cancer_probability_calibrated
        assert row["in_domain"] == "True" and row["domain_reason"] == ""
        assert row["diagnosis"] == expected.diagnosis and float(row["threshold"]) == expected.threshold
        assert (row["model_format"], row["model_sha256"]) == ("keras", expected.model_sha256)
    assert rows["broken.png"]["error"] == "not a recognised image (expected PNG, JPEG or DICOM content)"
    assert rows["broken.png"]["probability"] == rows["broken.png"]["probability_calibrated"] == ""
    assert rows["broken.png"]["diagnosis"] == ""
    assert "symbolic link" in rows["link.png"]["error"]


def test_predict_csv_exits_1_when_nothing_could_be_scored_and_still_writes_the_reasons(tiny_export, tmp_path):
    folder = tmp_path / "junk"
    folder.mkdir()
    (folder / "notes.txt").write_text("not an image")
    out = tmp_path / "out.csv"
    with pytest.raises(SystemExit) as exit_info:
        main(["predict", str(folder), "--csv", str(out), "--export-dir", str(tiny_export)])
    assert exit_info.value.code == 1
    lines = out.read_text().splitlines()
    assert len(lines) == 2 and lines[1].startswith(f"{folder / 'notes.txt'},") and "not a recognised image" in lines[1]


@pytest.mark.parametrize(("extra", "message"), [
    (["--json"], "drop --json, --gradcam-dir and --lesion-map-dir"),
    (["--lesion-map-dir", "maps"], "drop --json, --gradcam-dir and --lesion-map-dir"),
    (["--batch-size", "0"], "--batch-size must be at least 1, got 0"),
])
def test_predict_csv_refuses_options_it_cannot_honour_before_loading_a_model(tmp_path, capsys, extra, message):
    with pytest.raises(SystemExit) as exit_info:  # no export folder exists: the model is never reached
        main(["predict", str(tmp_path), "--csv", str(tmp_path / "out.csv"), "--export-dir", str(tmp_path / "none"),
              *extra])
    assert exit_info.value.code == 1 and message in capsys.readouterr().err


def test_predict_csv_refuses_a_folder_as_the_csv_before_loading_a_model(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["predict", str(tmp_path), "--csv", str(tmp_path), "--export-dir", str(tmp_path / "none")])
    assert f"--csv {tmp_path} is a folder; give a file name" in capsys.readouterr().err


def test_predict_without_csv_prints_a_line_for_every_file_of_a_folder(tiny_export, tmp_path, capsys):
    paths = _scan_folder(tmp_path / "scans")
    with pytest.raises(SystemExit) as exit_info:  # the broken file and the link fail the run, as named files do
        main(["predict", str(tmp_path / "scans"), "--export-dir", str(tiny_export)])
    assert exit_info.value.code == 1
    captured = capsys.readouterr()
    printed = [line.split(": ")[0] for line in captured.out.strip().splitlines()]
    assert printed == [str(paths[name]) for name in ("a.png", "b.png", "c.png")]  # sorted within each folder
    assert f"{paths['broken.png']}: error:" in captured.err and f"{paths['link.png']}: skipped:" in captured.err


def test_predict_flags_or_refuses_an_image_that_is_not_a_chest_ct(tiny_export, tmp_path, capsys):
    from tests.serving_support import png_bytes
    from tests.test_domain import _document

    page = tmp_path / "page.png"
    page.write_bytes(png_bytes(_document(np.random.default_rng(0))))
    main(["predict", str(page), "--export-dir", str(tiny_export)])
    captured = capsys.readouterr()
    assert "p(cancer)" in captured.out and "page.png: warning: no lung fields found" in captured.err
    with pytest.raises(SystemExit):
        main(["predict", str(page), "--export-dir", str(tiny_export), "--refuse-out-of-domain"])
    captured = capsys.readouterr()
    assert captured.out == "" and "error: " in captured.err and "not scored, no lung fields found" in captured.err
