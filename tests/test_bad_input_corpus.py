"""The bad-input corpus (tests/bad_input_corpus.py) through every entry point that reads images (issue 17, point 9).

(a) the service (POST /predict, one request per entry, and the request-level cases), (b) `chestct predict` on the
whole folder in one invocation, (c) `chestct evaluate-external` on a labelled copy, (d) the split stage with
`split.on_unreadable: skip`. Everywhere: no 5xx, no traceback, every refusal names its file, and the readable files
are still scored. The export is the session's tiny one with serve.max_upload_mb and serve.max_files made small.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml
from fastapi.testclient import TestClient

from chestct.serving.app import create_app
from tests.bad_input_corpus import (
    CORPUS,
    MAX_FILES,
    PATH_ONLY_NAMES,
    UPLOAD_LIMIT_MB,
    CorpusEntry,
    add_path_only_files,
    cli_only_paths,
    write_corpus,
)
from tests.conftest import PROJECT_ROOT, make_kaggle_layout
from tests.serving_support import phantom_images, png_bytes

IDS = [entry.name for entry in CORPUS]
# `chestct predict` and evaluate-external each start a process that loads TensorFlow and the model (about 25 s each
# on two cores): end-to-end runs, with the rest of the slow tests. The service and split parts stay in the fast run.
E2E = pytest.mark.e2e
COMMAND_TIMEOUT_S = 300  # far above a normal run: reached only when a read hangs (a FIFO), which is a failure


def _link_or_copy(source: str, destination: str) -> None:
    try:
        os.link(source, destination)
    except OSError:
        shutil.copy2(source, destination)


@pytest.fixture(scope="module")
def corpus_export(tiny_export, tmp_path_factory) -> Path:
    """The session's tiny export (model files hard-linked) with its own metadata.json: small serving limits."""
    folder = tmp_path_factory.mktemp("corpus_export") / "export"
    shutil.copytree(tiny_export, folder, copy_function=_link_or_copy, ignore=shutil.ignore_patterns("metadata.json"))
    metadata = json.loads((tiny_export / "metadata.json").read_text())
    metadata["serve"].update(max_upload_mb=UPLOAD_LIMIT_MB, max_files=MAX_FILES)
    (folder / "metadata.json").write_text(json.dumps(metadata, indent=2))
    return folder


def _run(command: list[str], cwd: Path) -> subprocess.CompletedProcess:
    """A chestct command in a child process (a hanging read fails the test instead of stalling the session)."""
    env = {**os.environ, "PYTHONPATH": str(PROJECT_ROOT), "PYTHONUTF8": "1", "TF_CPP_MIN_LOG_LEVEL": "2"}
    try:
        return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, encoding="utf-8",
                              timeout=COMMAND_TIMEOUT_S)
    except subprocess.TimeoutExpired as exc:
        def text(value) -> str:
            return value.decode("utf-8", "replace") if isinstance(value, bytes) else value or ""
        return subprocess.CompletedProcess(command, -9, text(exc.stdout),
                                           text(exc.stderr) + f"\n[killed after {COMMAND_TIMEOUT_S} s]")


def _no_traceback(*texts: str) -> None:
    for text in texts:
        assert "Traceback" not in text, text[-3000:]


# --- (a) the service --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def client(corpus_export):
    with TestClient(create_app(corpus_export), raise_server_exceptions=False) as client:
        yield client


def _sent_name(name: str) -> str:
    """The file name as a multipart upload carries it: browsers and httpx encode '"' as %22 (the HTML form
    encoding), and the service cannot tell that from a literal %22, so it names the file that way."""
    return name.replace('"', "%22")


def _post(client, files: list[tuple[str, bytes]]):
    return client.post("/predict", files=[("files", (name, data, "application/octet-stream")) for name, data in files])


def _assert_logs_clean(caplog) -> None:
    with_traceback = [record.getMessage() for record in caplog.records if record.exc_info]
    assert not with_traceback, with_traceback
    _no_traceback(caplog.text)


@pytest.fixture(scope="module")
def control() -> tuple[str, bytes]:
    return "control.png", png_bytes(phantom_images(count=1, seed=21)[0][1])


@pytest.mark.parametrize("entry", CORPUS, ids=IDS)
def test_service(client, control, entry: CorpusEntry, caplog):
    caplog.set_level(logging.INFO)
    response = _post(client, [(entry.name, entry.data())])
    assert response.status_code < 500, f"{entry.case}: {response.status_code} {response.text[:500]}"
    if entry.accepted("service"):
        assert response.status_code == 200, f"{entry.case}: {response.status_code} {response.text[:500]}"
        assert [result["filename"] for result in response.json()["results"]] == [_sent_name(entry.name)]
    else:
        assert 400 <= response.status_code < 500, f"{entry.case}: accepted"
        assert _sent_name(entry.name) in response.json()["detail"], response.json()["detail"]
        after = _post(client, [control])  # the service goes on
        assert after.status_code == 200, after.text[:500]
    _assert_logs_clean(caplog)


def test_service_request_level_refusals(client, control, caplog):
    caplog.set_level(logging.INFO)
    name, data = control
    cases = {
        "too many files": (_post(client, [(f"{index}.png", data) for index in range(MAX_FILES + 1)]), 413,
                           f"more than {MAX_FILES} files"),
        "wrong field name": (client.post("/predict", files={"image": (name, data, "image/png")}), 400,
                             "no file in the multipart field 'files' (fields received: image)"),
        "a text field instead of a file": (client.post("/predict", data={"files": "scan.png"}), 415,
                                           "multipart/form-data"),
        "a text part in a multipart body": (client.post("/predict", data={"files": "scan.png"},
                                                        files={"other": ("x.png", data, "image/png")}), 400,
                                            "no file in the multipart field 'files'"),
        "not multipart": (client.post("/predict", json={"image": "base64..."}), 415, "multipart/form-data"),
        "no body": (client.post("/predict"), 415, "multipart/form-data"),
        "a multipart body without parts": (client.post("/predict", content=b"--b--\r\n",
                                                       headers={"content-type": "multipart/form-data; boundary=b"}),
                                           400, "no file in the multipart field 'files'"),
        "a broken multipart body": (client.post("/predict", content=b"not multipart at all",
                                                headers={"content-type": "multipart/form-data; boundary=b"}),
                                    400, ""),
        "a multipart type without a boundary": (client.post("/predict", content=b"x",
                                                            headers={"content-type": "multipart/form-data"}),
                                                400, ""),
        "a good and a bad file together": (_post(client, [(name, data), ("bad.png", b"\x89PNG garbage")]), None,
                                           "bad.png"),
    }
    problems = []
    for case, (response, status, message) in cases.items():
        detail = response.json().get("detail", "") if "json" in response.headers.get("content-type", "") else ""
        if response.status_code >= 500 or (status is not None and response.status_code != status) or \
                not 400 <= response.status_code < 500 or message not in str(detail):
            problems.append(f"{case}: {response.status_code} {response.text[:300]}")
    assert not problems, "\n".join(problems)
    assert _post(client, [control]).status_code == 200
    _assert_logs_clean(caplog)


# --- (a2) the service's connections: what reaches it below the HTTP request ----------------------------------


@contextlib.contextmanager
def _live(export: Path):
    """The app on loopback under uvicorn with the options `chestct serve` gives it (its guarded h11 protocol);
    uvicorn's loggers are left to propagate, so caplog sees every line."""
    import uvicorn

    from chestct.serving.limits import uvicorn_limits
    from tests.serving_support import free_port, serving_thread

    port = free_port()
    with serving_thread(uvicorn.Config(create_app(export), host="127.0.0.1", port=port, log_config=None,
                                       **uvicorn_limits(export))):
        yield port


def _exchange(port: int, data: bytes, then_close: bool = False) -> bytes:
    """Send raw bytes; everything the server answers until it closes (or 5 s of silence)."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(data)
        if then_close:
            return b""
        chunks = []
        with contextlib.suppress(TimeoutError, ConnectionResetError):
            while chunk := sock.recv(65536):
                chunks.append(chunk)
        return b"".join(chunks)


def _statuses(answer: bytes) -> list[int]:
    """The status of every response in the answer (a pipelined one follows the previous body directly)."""
    return [int(status) for status in re.findall(rb"HTTP/1\.1 (\d{3}) ", answer)]


def test_service_connection_level_bad_input(corpus_export, control, caplog):
    """Half-open sockets, a client that vanishes mid-body, pipelined requests, oversized headers, a header line
    without a colon, and request smuggling with both Content-Length and Transfer-Encoding: each gets a 4xx or a
    closed connection, never a 5xx or a traceback, and a normal upload still works after them."""
    caplog.set_level(logging.INFO)
    name, data = control
    boundary = "corpus-boundary"
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"files\"; filename=\"{name}\"\r\n"
            f"Content-Type: image/png\r\n\r\n").encode() + data + f"\r\n--{boundary}--\r\n".encode()
    upload = (f"POST /predict HTTP/1.1\r\nHost: t\r\nContent-Type: multipart/form-data; boundary={boundary}\r\n"
              f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode()
    cases = {
        "a half-open socket (nothing sent, then closed)": (b"", True, ()),
        "a client that vanishes mid-body": (upload + body[:len(body) // 3], True, ()),
        "oversized headers (a 100 kB header line)": (
            b"GET /health HTTP/1.1\r\nHost: t\r\nX-Big: " + b"a" * 100_000 + b"\r\n\r\n", False, (431,)),
        "a header line without a colon": (b"GET /health HTTP/1.1\r\nHost: t\r\nno colon here\r\n\r\n", False, (400,)),
        "smuggling: Content-Length and Transfer-Encoding together": (
            b"POST /predict HTTP/1.1\r\nHost: t\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"0\r\n\r\nGET /health HTTP/1.1\r\nHost: t\r\n\r\n", False, (400,)),
        "a request line that is not HTTP": (b"HELLO\r\n\r\n", False, (400,)),
    }
    problems = []
    with _live(corpus_export) as port:
        for case, (raw, then_close, expected) in cases.items():
            statuses = _statuses(_exchange(port, raw, then_close))
            if any(status >= 500 for status in statuses) or (expected and statuses and statuses[0] not in expected):
                problems.append(f"{case}: answered {statuses}")
        pipelined = _statuses(_exchange(port, b"GET /health/live HTTP/1.1\r\nHost: t\r\n\r\n"
                                              b"GET /health/live HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n"))
        if pipelined != [200, 200]:
            problems.append(f"two pipelined requests: answered {pipelined}")
        after = _statuses(_exchange(port, upload + body))
        if after != [200]:
            problems.append(f"a normal upload after them: answered {after}")
    assert not problems, "\n".join(problems)
    _assert_logs_clean(caplog)


# --- (b) chestct predict on the whole folder -------------------------------------------------------------------


@pytest.fixture(scope="module")
def predict_run(corpus_export, tmp_path_factory):
    """`chestct predict --json` once over every corpus file, the FIFO, the link loop and the paths that name no
    file; returns the process, the corpus paths and the other paths."""
    folder = tmp_path_factory.mktemp("predict") / "corpus"
    paths = write_corpus(folder)
    paths.update(add_path_only_files(folder))
    others = cli_only_paths(folder, paths["valid.png"])
    arguments = [str(path) for path in [*paths.values(), *others.values()]]
    process = _run([sys.executable, "-m", "chestct.cli", "predict", "--json", "--export-dir", str(corpus_export),
                    *arguments], folder.parent)
    return process, paths, others


def _predicted(process) -> dict[str, dict]:
    results = {}
    for line in process.stdout.splitlines():
        result = json.loads(line)
        results[result["filename"]] = result
    return results


def _error_lines(process, path: Path) -> list[str]:
    return [line for line in process.stderr.splitlines() if line.startswith(f"{path}: error: ")]


@E2E
def test_predict_runs_once_over_the_folder_without_a_traceback(predict_run):
    process, paths, others = predict_run
    _no_traceback(process.stdout, process.stderr)
    assert process.returncode == 1, process.stderr[-2000:]  # some files failed, the run finished
    assert len(_predicted(process)) == sum(entry.accepted("predict") for entry in CORPUS)



@E2E
@pytest.mark.parametrize("entry", CORPUS, ids=IDS)
def test_predict(predict_run, entry: CorpusEntry):
    process, paths, _ = predict_run
    path = paths[entry.name]
    errors = _error_lines(process, path)
    if entry.accepted("predict"):
        assert str(path) in _predicted(process), f"{entry.case}: {errors or process.stderr[-1500:]}"
        assert not errors
    else:
        assert len(errors) == 1, f"{entry.case}: no single error line for {path}\n{process.stderr[-1500:]}"
        assert str(path) not in _predicted(process)


@E2E
@pytest.mark.parametrize("name", PATH_ONLY_NAMES)
def test_predict_refuses_what_is_not_a_regular_file(predict_run, name):
    process, paths, _ = predict_run
    assert len(_error_lines(process, paths[name])) == 1, process.stderr[-1500:]


@E2E
@pytest.mark.parametrize("case", ["missing file", "a path under a file", "a 300-character name"])
def test_predict_refuses_paths_that_name_no_file(predict_run, case):
    process, _, others = predict_run
    assert len(_error_lines(process, others[case])) == 1, process.stderr[-1500:]


# --- (c) chestct evaluate-external on a labelled copy ----------------------------------------------------------


@pytest.fixture(scope="module")
def external_run(corpus_export, tmp_path_factory):
    """evaluate-external over Normal/ = the corpus, the FIFO and the link loop, Cancer/ = a few phantoms."""
    work = tmp_path_factory.mktemp("external_corpus")
    data = work / "hospital"
    write_corpus(data / "Normal")
    add_path_only_files(data / "Normal")
    (data / "Cancer").mkdir()
    for index, (_, gray) in enumerate(phantom_images(count=4, seed=31)):
        (data / "Cancer" / f"c{index}.png").write_bytes(png_bytes(gray))
    process = _run([sys.executable, "-m", "chestct.cli", "evaluate-external", str(data), "--label-map", "Normal=0",
                    "Cancer=1", "--export-dir", str(corpus_export), "--params", str(PROJECT_ROOT / "params.yaml"),
                    "--out", str(work / "report"), "--resamples", "20"], work)
    report_file = work / "report" / "metrics.json"
    report = json.loads(report_file.read_text()) if report_file.exists() else None
    table = pd.read_csv(work / "report" / "predictions.csv") if report is not None else None
    return process, report, table


@E2E
def test_external_finishes_without_a_traceback(external_run):
    process, report, _ = external_run
    _no_traceback(process.stdout, process.stderr)
    assert process.returncode == 0 and report is not None, process.stderr[-2000:]
    assert report["counts"]["scored_by_class"]["Cancer"] == 4


@E2E
@pytest.mark.parametrize("entry", CORPUS, ids=IDS)
def test_external(external_run, entry: CorpusEntry):
    process, report, table = external_run
    assert report is not None, process.stderr[-2000:]
    relative = f"Normal/{entry.name}"
    unreadable = {item["file"]: item["reason"] for item in report["unreadable"]}
    if entry.accepted("external"):
        assert relative in set(table["file"]), f"{entry.case}: {unreadable.get(relative)}"
    else:
        assert relative in unreadable, f"{entry.case}: scored"
        assert unreadable[relative] and relative not in set(table["file"])


@E2E
def test_external_lists_the_fifo_and_the_loop_as_skipped(external_run):
    _, report, _ = external_run
    assert report is not None
    assert {item["file"] for item in report["skipped"]} == {f"Normal/{name}" for name in PATH_ONLY_NAMES}


# --- (d) the split stage --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def split_run(tmp_path_factory):
    """The split stage over a Kaggle layout whose test/normal folder also holds the corpus."""
    workspace = tmp_path_factory.mktemp("split_corpus")
    params = yaml.safe_load((PROJECT_ROOT / "params.yaml").read_text())
    params["split"]["on_unreadable"] = "skip"
    (workspace / "params.yaml").write_text(yaml.safe_dump(params))
    for package in ("chestct", "stages"):
        shutil.copytree(PROJECT_ROOT / package, workspace / package, ignore=shutil.ignore_patterns("__pycache__"))
    data = make_kaggle_layout(workspace / "data" / "raw", per_class=1)
    write_corpus(data / "test" / "normal")
    add_path_only_files(data / "test" / "normal")
    process = _run([sys.executable, "-m", "stages.split"], workspace)
    metrics_file = workspace / "metrics" / "data.json"
    metrics = json.loads(metrics_file.read_text()) if metrics_file.exists() else None
    manifest_file = workspace / "data" / "split" / "manifest.csv"
    manifest = pd.read_csv(manifest_file) if manifest_file.exists() else None
    return process, metrics, manifest


def test_split_finishes_without_a_traceback(split_run):
    process, metrics, manifest = split_run
    _no_traceback(process.stdout, process.stderr)
    assert process.returncode == 0 and metrics is not None and manifest is not None, process.stderr[-2000:]


@pytest.mark.parametrize("entry", CORPUS, ids=IDS)
def test_split(split_run, entry: CorpusEntry):
    process, metrics, manifest = split_run
    assert metrics is not None and manifest is not None, process.stderr[-2000:]
    image_id = f"test/normal/{entry.name}"
    unreadable = {item["id"]: item["reason"] for item in metrics["unreadable"]["files"]}
    if entry.accepted("split"):
        assert image_id in set(manifest["id"]), f"{entry.case}: {unreadable.get(image_id)}"
    else:
        assert image_id in unreadable, f"{entry.case}: read as an image"
        assert image_id in unreadable[image_id], unreadable[image_id]  # the reason names the file


@pytest.mark.parametrize("name", PATH_ONLY_NAMES)
def test_split_counts_what_is_not_a_regular_file_as_unreadable(split_run, name):
    process, metrics, _ = split_run
    assert metrics is not None, process.stderr[-2000:]
    reasons = {item["id"]: item["reason"] for item in metrics["unreadable"]["files"]}
    assert f"test/normal/{name}" in reasons and f"test/normal/{name}" in reasons[f"test/normal/{name}"]
