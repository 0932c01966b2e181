"""POST /predict/series through TestClient: a zipped DICOM series folder scored series by series, and a clear 4xx
(never a 500, never a file written outside the temporary folder) for every bad zip."""

from __future__ import annotations

import base64
import io
import random
import stat
import tempfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from chestct.decision import decide
from chestct.external.series_scoring import SERIES_RULE
from chestct.serving import series_upload
from chestct.serving.app import create_app
from tests.series_factory import SeriesSpec, write_annotated_series

ROUTE = "/predict/series"


@pytest.fixture()
def spool(tmp_path, monkeypatch) -> Path:
    """The temporary folder the service unpacks into, made observable: tempfile's root for this test."""
    folder = tmp_path / "spool"
    folder.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(folder))
    return folder


def zip_bytes(members: dict[str, bytes], symlinks: tuple[str, ...] = ()) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in members.items():
            info = zipfile.ZipInfo(name)
            info.compress_type = zipfile.ZIP_DEFLATED
            if name in symlinks:
                info.create_system, info.external_attr = 3, (stat.S_IFLNK | 0o777) << 16
            archive.writestr(info, data)
    return buffer.getvalue()


def zip_folder(root: Path) -> bytes:
    """`root` zipped as `zip -r` does: folders as entries, then files, names relative to root."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for path in sorted(root.rglob("*")):
            archive.write(path, path.relative_to(root).as_posix())
    return buffer.getvalue()


def post(client, data: bytes, name: str = "series.zip", field: str = "file"):
    return client.post(ROUTE, files={field: (name, data, "application/zip")})


def png_size(url: str) -> tuple[int, int]:
    assert url.startswith("data:image/png;base64,")
    return Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))).size


@pytest.fixture(scope="module")
def two_kernels(tmp_path_factory):
    root = tmp_path_factory.mktemp("tcia")
    written = write_annotated_series(root, SeriesSpec(slices=8, tumour_slices=(3, 4)))
    return root, written


@pytest.fixture(scope="module")
def two_kernels_answer(client, two_kernels):
    return post(client, zip_folder(two_kernels[0]))


@pytest.fixture(scope="module")
def one_slice(tmp_path_factory):
    """A DICOM slice (bytes) for the bad-zip cases."""
    root = tmp_path_factory.mktemp("one")
    write_annotated_series(root, SeriesSpec(slices=1, tumour_slices=(), kernels=("SHARP",)))
    return next(root.rglob("*.dcm")).read_bytes()


def test_a_zipped_series_with_two_kernels_gives_one_answer_per_series(client, two_kernels, two_kernels_answer):
    root, written = two_kernels
    assert two_kernels_answer.status_code == 200, two_kernels_answer.text
    body = two_kernels_answer.json()
    predictor = client.app.state.predictor
    assert [item["kernel"] for item in body["series"]] == ["SHARP", "SMOOTH"]
    assert {item["series_instance_uid"] for item in body["series"]} == set(written.series_uids.values())
    for item in body["series"]:
        assert item["slices"] == len(item["per_slice"]) == 8
        assert item["problems"] == [] and item["skipped"] == []
        probabilities = [slice_["probability"] for slice_ in item["per_slice"]]
        assert all(p is not None for p in probabilities)
        in_lungs = [slice_["probability"] for slice_ in item["per_slice"] if slice_["in_lungs"]]
        assert item["score"] == max(in_lungs or probabilities)
        assert item["top_slice"]["probability"] == item["score"]
        assert item["diagnosis"] == ("Cancer" if decide(item["score"], predictor.threshold) else "Normal")
        assert item["threshold"] == predictor.threshold and item["rule"] == SERIES_RULE
        zs = [slice_["z"] for slice_ in item["per_slice"]]
        assert zs == sorted(zs)
        # Files are named by their names in the zip, and the slice scores are /predict's for the same file.
        top = item["top_slice"]["file"]
        assert top.startswith("PHANTOM-1/01-01-2020-NA-Chest/") and top.endswith(".dcm")
        alone = predictor.predict([(top, (root / top).read_bytes())])[0].cancer_probability
        assert alone == pytest.approx(item["score"], abs=1e-5)
        assert png_size(item["z_profile_png"])[0] > 100
        assert png_size(item["top_slice_png"]) == (predictor.image_size, predictor.image_size)
    # The VOC box files of the folder are not slices: listed with the reason, under their names in the zip.
    assert body["not_dicom"] and all(item["file"].startswith("Annotation/PHANTOM-1/") and "not a DICOM file"
                                     in item["reason"] for item in body["not_dicom"])
    assert body["rule"] == SERIES_RULE
    assert body["model"] == {"format": predictor.format, "sha256": predictor.sha256}
    # Every key the library gives a series reaches the answer (the response model lets none drop).
    assert {"label", "note", "top_slice", "per_slice", "skipped"} <= set(body["series"][0])
    assert tempfile.gettempdir() not in two_kernels_answer.text and "chestct-series-" not in two_kernels_answer.text


def test_two_patients_in_one_flat_folder_are_split_per_series(client, tmp_path):
    members, patient_of = {}, {}
    for patient in ("PAT-A", "PAT-B"):
        root = tmp_path / patient
        write_annotated_series(root, SeriesSpec(patient_id=patient, slices=3, tumour_slices=(1,),
                                                kernels=("SHARP",), seed=len(members)))
        for path in sorted(root.rglob("*.dcm")):
            name = f"all/{len(members):03d}.dcm"
            members[name], patient_of[name] = path.read_bytes(), patient
    shuffled = dict(random.Random(0).sample(sorted(members.items()), len(members)))
    response = post(client, zip_bytes(shuffled))
    assert response.status_code == 200, response.text
    series = response.json()["series"]
    assert [item["patient_id"] for item in series] == ["PAT-A", "PAT-B"]
    for item in series:
        assert item["slices"] == 3 and item["score"] is not None
        assert {patient_of[slice_["file"]] for slice_ in item["per_slice"]} == {item["patient_id"]}


def test_a_single_slice_series_has_no_series_score_and_says_why(client, one_slice):
    response = post(client, zip_bytes({"scan/1.dcm": one_slice}))
    assert response.status_code == 200, response.text
    (item,) = response.json()["series"]
    assert item["score"] is None and item["diagnosis"] is None and item["top_slice_png"] is None
    assert any("single slice" in problem for problem in item["problems"])
    assert len(item["per_slice"]) == 1 and item["per_slice"][0]["probability"] is not None
    assert item["per_slice"][0]["file"] == "scan/1.dcm"
    assert png_size(item["z_profile_png"])[0] > 100


@pytest.mark.parametrize("member", ["../x.dcm", "scans/../../x.dcm", "/tmp/x.dcm", "..\\x.dcm", "C:/x.dcm"])
def test_a_member_that_points_outside_the_folder_is_refused_and_never_written(client, one_slice, spool, tmp_path,
                                                                             member):
    response = post(client, zip_bytes({"scans/1.dcm": one_slice, member: one_slice}))
    assert response.status_code == 400
    assert response.json()["detail"].startswith(f"series.zip: member {member!r} is a")
    assert not list(tmp_path.rglob("x.dcm")) and not Path("/tmp/x.dcm").exists()
    assert not list(spool.iterdir())  # the temporary folder is gone with the answer


def test_zip_slip_is_impossible_even_in_the_unpacker(tmp_path, one_slice, default_params):
    """Kept names are never used as paths: every file lands directly in the target folder."""
    target = tmp_path / "a" / "b"
    target.mkdir(parents=True)
    extracted = series_upload.extract_zip("s.zip", zip_bytes({"deep/dir/1.dcm": one_slice, ".hidden": b"x",
                                                              "__MACOSX/deep/._1.dcm": b"x", "folder/": b""}),
                                          target, default_params.serve)
    assert extracted.names == ["deep/dir/1.dcm"]
    assert [path.parent for path in extracted.files] == [target] and list(target.iterdir()) == extracted.files


def understated(data: bytes, member_size: int | None = None, entries: int | None = None) -> bytes:
    """A zip whose directory lies: a smaller uncompressed size for its members, or fewer entries."""
    data = bytearray(data)
    if member_size is not None:
        for signature, offset in ((b"PK\x03\x04", 22), (b"PK\x01\x02", 24)):
            at = data.find(signature)
            while at >= 0:
                data[at + offset:at + offset + 4] = member_size.to_bytes(4, "little")
                at = data.find(signature, at + 4)
    if entries is not None:
        end = data.rfind(b"PK\x05\x06")
        data[end + 8:end + 12] = entries.to_bytes(2, "little") * 2
    return bytes(data)


def encrypted(data: bytes) -> bytes:
    data = bytearray(data)
    for signature, offset in ((b"PK\x03\x04", 6), (b"PK\x01\x02", 8)):
        at = data.find(signature)
        data[at + offset] |= 0x1
    return bytes(data)


def many(count: int) -> dict[str, bytes]:
    return {f"slices/{index}.txt": b"x" for index in range(count)}


BAD_ZIPS = {
    # case: (serve changes, zip bytes, status, what the message says)
    "not a zip": ({}, b"just some text, no zip", 400, "series.zip: not a zip archive"),
    "too many members": ({"max_files": 1}, zip_bytes(many(65)), 413, "the zip declares 65 members; the limit is 64"),
    "understated member count": ({"max_files": 1}, understated(zip_bytes(many(65)), entries=1), 413,
                                 "the zip holds 65 members; the limit is 64"),
    "member over the size limit": ({"max_upload_mb": 0.01}, zip_bytes({"a/big.dcm": bytes(20_000)}), 413,
                                   "member 'a/big.dcm' is 20.0 kB uncompressed, over the limit of 0.01 MB per file"),
    "understated member size": ({}, understated(zip_bytes({"a/1.dcm": np.arange(5000).tobytes()}), member_size=100),
                                400, "member 'a/1.dcm' cannot be unpacked"),
    "encrypted member": ({}, encrypted(zip_bytes({"a/1.dcm": b"secret"})), 400, "member 'a/1.dcm' is encrypted"),
    "symbolic link": ({}, zip_bytes({"a/1.dcm": b"/etc/passwd"}, symlinks=("a/1.dcm",)), 400,
                      "member 'a/1.dcm' is a symbolic link"),
    "only a text file": ({}, zip_bytes({"notes.txt": b"not a slice"}), 400,
                         "series.zip: no DICOM slice found in the zip (1 file(s), none a DICOM slice: notes.txt: not "
                         "a DICOM file"),
    "only folders and dotfiles": ({}, zip_bytes({"a/": b"", "a/.DS_Store": b"x"}), 400,
                                  "no DICOM slice found in the zip (it holds no file besides folders and dotfiles)"),
    "zip over its own limit": ({"max_upload_mb": 0.001, "max_files": 2}, np.random.default_rng(0).bytes(5000), 413,
                               "over the limit of 0.002 MB for a zipped series"),
}


@pytest.mark.parametrize("case", BAD_ZIPS)
def test_bad_zips_get_a_4xx_naming_the_upload_and_what_is_wrong(client, limits, spool, case):
    changes, data, status, message = BAD_ZIPS[case]
    limits(**changes)
    response = post(client, data)
    assert response.status_code == status, response.text
    assert message in response.json()["detail"]
    assert not list(spool.iterdir())


def test_the_total_unpacked_size_is_bounded(client, spool, monkeypatch):
    monkeypatch.setattr(series_upload, "MAX_EXTRACTED_BYTES", 50_000)
    response = post(client, zip_bytes({f"a/{index}.dcm": bytes(9_000) for index in range(6)}))
    assert response.status_code == 413
    assert "series.zip: its members add up to more than 50.0 kB uncompressed" in response.json()["detail"]
    assert not list(spool.iterdir())


def test_wrong_field_and_no_model(client, tmp_path, one_slice):
    response = post(client, zip_bytes({"1.dcm": one_slice}), field="files")
    assert response.status_code == 400 and "no file in the multipart field 'file'" in response.json()["detail"]
    with TestClient(create_app(tmp_path / "no-export")) as no_model:
        response = post(no_model, zip_bytes({"1.dcm": one_slice}))
    assert response.status_code == 503 and "dvc repro" in response.json()["detail"]


def test_the_page_offers_a_zipped_series_upload_and_the_schema_documents_the_route(client):
    page = client.get("/").text
    assert 'id="series-input"' in page and "Upload a zipped DICOM series" in page
    assert "/predict/series" in client.get("/static/app.js").text
    route = client.get("/openapi.json").json()["paths"][ROUTE]["post"]
    assert route["responses"]["200"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/SeriesResponse"}
    assert "file" in route["requestBody"]["content"]["multipart/form-data"]["schema"]["properties"]
