"""The `chestct` command: params check and the model's view of an image."""

from __future__ import annotations

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
