"""Stages stop with one clear line (no traceback) and leave nothing half-written."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import yaml
from PIL import Image

from tests.conftest import PROJECT_ROOT, make_kaggle_layout
from tests.pipeline_repo import run


def _workspace(tmp_path, on_unreadable: str):
    params = yaml.safe_load((PROJECT_ROOT / "params.yaml").read_text())
    params["split"]["on_unreadable"] = on_unreadable
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    for package in ("chestct", "stages"):
        shutil.copytree(PROJECT_ROOT / package, tmp_path / package,
                        ignore=shutil.ignore_patterns("__pycache__"))
    data = make_kaggle_layout(tmp_path / "data" / "raw", per_class=1)
    (data / "test/normal/broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    return tmp_path


def test_split_fails_naming_the_unreadable_file(tmp_path):
    workspace = _workspace(tmp_path, "fail")
    result = run([sys.executable, "-m", "stages.split"], workspace, check=False)
    assert result.returncode == 1
    assert "test/normal/broken.png" in result.stderr and "split.on_unreadable: skip" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (workspace / "data/split").exists() and not (workspace / "metrics").exists()


def test_split_names_every_kind_of_unreadable_file_without_a_traceback(tmp_path):
    workspace = _workspace(tmp_path, "fail")
    normal = workspace / "data/raw/Data/test/normal"
    Image.new("LAB", (16, 16), (128, 10, 200)).save(normal / "lab.tif")  # once a traceback naming no file
    os.mkfifo(normal / "pipe.png")  # once silently left out; reading it would wait forever
    (normal / "loop.png").symlink_to(normal / "loop.png")
    (normal / "dangling.png").symlink_to(normal / "gone.png")
    # a timeout, so a read that blocks fails the test instead of hanging it
    result = subprocess.run([sys.executable, "-m", "stages.split"], cwd=workspace, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "5 unreadable image(s)" in result.stderr  # the four above and broken.png
    for expected in ("test/normal/lab.tif: TIFF content is not accepted (only PNG, JPEG or DICOM)",
                     "test/normal/pipe.png: is a FIFO (named pipe), not a regular file",
                     "test/normal/loop.png: too many levels of symbolic links (a symlink loop)",
                     "test/normal/dangling.png: file not found",
                     "test/normal/broken.png: "):
        assert expected in result.stderr


def test_split_skips_and_counts_the_unreadable_file(tmp_path):
    workspace = _workspace(tmp_path, "skip")
    run([sys.executable, "-m", "stages.split"], workspace)
    metrics = json.loads((workspace / "metrics/data.json").read_text())
    assert metrics["unreadable"]["count"] == 1
    assert metrics["unreadable"]["files"][0]["id"] == "test/normal/broken.png"
    assert metrics["images_found"] == 13 and metrics["splits"]["test"]["total"] == 4


def test_bad_params_stop_the_stage_with_the_key(tmp_path):
    workspace = _workspace(tmp_path, "fail")
    params = yaml.safe_load((workspace / "params.yaml").read_text())
    params["split"]["dedupe"] = "keep"
    (workspace / "params.yaml").write_text(yaml.safe_dump(params))
    result = run([sys.executable, "-m", "stages.split"], workspace, check=False)
    assert result.returncode == 1 and "split.dedupe: unknown key" in result.stderr
