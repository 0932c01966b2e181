"""Every data.source ends in the same Kaggle layout; bad sources fail naming the path and the way out."""

from __future__ import annotations

import shutil
import time
import zipfile

import pytest

from chestct.data.sources import SourceError, acquire_dataset
from tests.conftest import make_kaggle_layout


def _data_params(default_params, **update):
    return default_params.data.model_copy(update=update)


def _relative_files(folder):
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())


def test_local_folder_with_data_nested_anywhere(tmp_path, default_params):
    source = tmp_path / "download" / "versions" / "1"
    data = make_kaggle_layout(source, per_class=2)
    (data / "train" / "normal" / ".DS_Store").write_text("junk")
    params = _data_params(default_params, source="local", local_path=str(tmp_path / "download"))
    summary = acquire_dataset(params, tmp_path / "raw", progress=False)
    assert summary["files"] == 24
    expected = [f for f in _relative_files(data) if not f.endswith(".DS_Store")]
    assert _relative_files(tmp_path / "raw" / "Data") == expected


def test_local_zip(tmp_path, default_params):
    data = make_kaggle_layout(tmp_path / "src", per_class=1)
    archive = tmp_path / "chest.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for path in data.rglob("*"):
            zf.write(path, "chest-ctscan-images/" + path.relative_to(data.parent).as_posix())
        zf.writestr("__MACOSX/Data/train/._x.png", b"junk")
    params = _data_params(default_params, source="local", local_path=str(archive))
    acquire_dataset(params, tmp_path / "raw", progress=False)
    assert _relative_files(tmp_path / "raw" / "Data") == _relative_files(data)


def test_zip_without_data_folder(tmp_path, default_params):
    archive = tmp_path / "other.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("images/a.png", b"x")
    params = _data_params(default_params, source="local", local_path=str(archive))
    with pytest.raises(SourceError, match=r"other\.zip.*no 'Data/' folder"):
        acquire_dataset(params, tmp_path / "raw", progress=False)
    assert not (tmp_path / "raw").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["other.zip"]  # no temporary leftovers


@pytest.mark.parametrize(
    ("breakage", "message"),
    [
        ("missing_split", r"test: missing split folder"),
        ("unknown_class", r"benign.*unknown class folder"),
        ("bad_path", r"does not exist"),
        ("not_a_zip", r"must be a folder or a \.zip"),
    ],
)
def test_bad_local_sources(tmp_path, default_params, breakage, message):
    data = make_kaggle_layout(tmp_path / "src", per_class=1)
    local_path = tmp_path / "src"
    if breakage == "missing_split":
        shutil.rmtree(data / "test")
    elif breakage == "unknown_class":
        (data / "train" / "benign").mkdir()
    elif breakage == "bad_path":
        local_path = tmp_path / "nowhere"
    elif breakage == "not_a_zip":
        local_path = tmp_path / "notes.txt"
        local_path.write_text("hello")
    params = _data_params(default_params, source="local", local_path=str(local_path))
    with pytest.raises(SourceError, match=message):
        acquire_dataset(params, tmp_path / "raw", progress=False)
    assert not (tmp_path / "raw").exists()


def test_kaggle_offline_fails_fast_naming_the_alternatives(tmp_path, default_params, monkeypatch):
    import kagglehub

    def offline(handle, *args, **kwargs):
        raise ConnectionError("Failed to resolve 'api.kaggle.com'")

    monkeypatch.setattr(kagglehub, "dataset_download", offline)
    started = time.monotonic()
    with pytest.raises(SourceError) as error:
        acquire_dataset(default_params.data, tmp_path / "raw", progress=False)
    assert time.monotonic() - started < 10
    message = str(error.value)
    assert "mohamedhanyyy/chest-ctscan-images" in message
    assert "data.source: local" in message and "data.source: synthetic" in message
    assert not (tmp_path / "raw").exists()


def test_kaggle_download_is_copied_into_the_layout(tmp_path, default_params, monkeypatch):
    import kagglehub

    cache = tmp_path / "kagglehub" / "datasets" / "chest" / "versions" / "1"
    make_kaggle_layout(cache, per_class=1)
    monkeypatch.setattr(kagglehub, "dataset_download", lambda handle, *a, **k: str(cache))
    summary = acquire_dataset(default_params.data, tmp_path / "raw", progress=False)
    assert summary["files"] == 12 and summary["origin"] == "kaggle:mohamedhanyyy/chest-ctscan-images"
