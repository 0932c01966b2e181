"""The service on loopback under load and against misbehaving clients: several concurrent clients, every answer
checked against the Predictor; a client that stalls or trickles its body, or disconnects mid-upload.

Latency figures are printed by benchmarks/serve_latency.py and memory by benchmarks/serve_memory.py, never
asserted here.
"""

from __future__ import annotations

import logging
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import urlsplit

import httpx
import pytest

from chestct.serving.predictor import Predictor
from tests.serving_support import phantom_images, png_bytes, running_server
from tests.test_app import export_copy

CLIENTS = 4
REQUESTS_PER_CLIENT = 8
BODY_TIMEOUT_S = 1.0


def test_concurrent_clients_all_get_correct_answers(live_server, tiny_export):
    scans = [(f"scan{index}.png", png_bytes(gray)) for index, (_, gray) in enumerate(phantom_images(count=4))]
    expected = {p.filename: p for p in Predictor(tiny_export).predict(scans)}

    def client_session(client_index: int) -> list[tuple[str, int, dict]]:
        answers = []
        with httpx.Client(base_url=live_server, timeout=120) as client:
            for request_index in range(REQUESTS_PER_CLIENT):
                name, data = scans[(client_index + request_index) % len(scans)]
                response = client.post("/predict", files=[("files", (name, data, "image/png"))])
                answers.append((name, response.status_code, response.json()))
        return answers

    with ThreadPoolExecutor(CLIENTS) as pool:
        answers = [answer for session in pool.map(client_session, range(CLIENTS)) for answer in session]

    assert len(answers) == CLIENTS * REQUESTS_PER_CLIENT
    for name, status, body in answers:
        assert status == 200, body
        (result,) = body["results"]
        assert result["filename"] == name
        assert result["diagnosis"] == expected[name].diagnosis
        assert result["cancer_probability"] == pytest.approx(expected[name].cancer_probability, abs=1e-6)


# --- clients that misbehave, over a raw socket ------------------------------------------------------------------


def upload_head(url: str, content_length: int) -> bytes:
    """The request line and headers of a multipart upload, then the start of its one file part."""
    host = urlsplit(url).netloc
    return (f"POST /predict HTTP/1.1\r\nHost: {host}\r\nContent-Type: multipart/form-data; boundary=cut\r\n"
            f"Content-Length: {content_length}\r\n\r\n--cut\r\nContent-Disposition: form-data; name=\"files\"; "
            f"filename=\"scan.png\"\r\nContent-Type: image/png\r\n\r\n").encode()


def connect(url: str) -> socket.socket:
    parts = urlsplit(url)
    return socket.create_connection((parts.hostname, parts.port), timeout=10)


def read_until_closed(sock: socket.socket, limit_s: float) -> bytes:
    """All the server sends until it closes the connection; socket.timeout if it keeps it open past limit_s."""
    sock.settimeout(limit_s)
    answer = b""
    while chunk := sock.recv(65536):
        answer += chunk
    return answer


@pytest.fixture(scope="module")
def impatient_server(tiny_export, tmp_path_factory):
    """The service with serve.body_timeout_s = 1 s in its export's metadata."""
    export = export_copy(tiny_export, tmp_path_factory.mktemp("impatient") / "export",
                         serve_changes={"body_timeout_s": BODY_TIMEOUT_S})
    with running_server(export, ("keras",)) as url:
        yield url


def test_headers_then_silence_get_408_and_the_connection_closed(impatient_server):
    with connect(impatient_server) as sock:
        sock.sendall(upload_head(impatient_server, 100_000))
        started = time.monotonic()
        answer = read_until_closed(sock, limit_s=10 * BODY_TIMEOUT_S)
        seconds = time.monotonic() - started
    assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
    assert b"no data for 1 s" in answer and b"serve.body_timeout_s" in answer
    assert BODY_TIMEOUT_S * 0.9 <= seconds < BODY_TIMEOUT_S + 3


def test_a_trickled_body_is_dropped_although_no_pause_reaches_the_timeout(impatient_server):
    answer = b""
    with connect(impatient_server) as sock:
        sock.sendall(upload_head(impatient_server, 100_000))
        sock.settimeout(BODY_TIMEOUT_S / 5)
        started = time.monotonic()
        while time.monotonic() - started < 10 * BODY_TIMEOUT_S:
            try:
                chunk = sock.recv(65536)
            except TimeoutError:
                sock.sendall(b"x")  # one byte per BODY_TIMEOUT_S / 5: never silent for the timeout
                continue
            except ConnectionResetError:
                break
            if not chunk:
                break
            answer += chunk
        seconds = time.monotonic() - started
    assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
    assert b"arrived too slowly" in answer
    assert seconds < BODY_TIMEOUT_S + 3


def test_a_client_gone_mid_upload_is_one_info_line(live_server, caplog):
    uvicorn_log = logging.getLogger("uvicorn.error")  # uvicorn's own loggers do not propagate to the root
    uvicorn_log.addHandler(caplog.handler)
    caplog.set_level(logging.INFO)
    try:
        with connect(live_server) as sock:
            sock.sendall(upload_head(live_server, 1_000_000) + b"\x89PNG" + b"x" * 5000)
        deadline = time.monotonic() + 30
        while not any("disconnected" in record.getMessage() for record in caplog.records):
            assert time.monotonic() < deadline, f"no log line about the disconnect:\n{caplog.text}"
            time.sleep(0.05)
        time.sleep(0.5)  # anything logged after the line would show here
    finally:
        uvicorn_log.removeHandler(caplog.handler)
    (line,) = [record for record in caplog.records if "disconnected" in record.getMessage()]
    assert line.levelno == logging.INFO and line.name == "chestct.serving.app" and line.exc_info is None
    assert not [record for record in caplog.records if record.levelno >= logging.WARNING], caplog.text
    assert "Traceback" not in caplog.text
