"""`chestct serve` stopped with SIGTERM while it holds work: it finishes the requests in flight, refuses new ones,
exits 0 within serve.shutdown_grace_s, and leaves no temporary file (chestct.serving.shutdown)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import pytest

from tests.serving_support import free_port, phantom_images, png_bytes, read_until_closed

IN_FLIGHT = 8
GRACE_S = 20


def _export_with_grace(tiny_export, folder):
    """A copy of the tiny export whose serve params give the shutdown grace (the artifacts linked)."""
    metadata = json.loads((tiny_export / "metadata.json").read_text())
    folder.mkdir()
    for entry in tiny_export.iterdir():
        if entry.name != "metadata.json":
            (folder / entry.name).symlink_to(entry)
    metadata["serve"]["shutdown_grace_s"] = GRACE_S
    (folder / "metadata.json").write_text(json.dumps(metadata))
    return folder


def _upload(boundary: str, image: bytes) -> bytes:
    return (f"--{boundary}\r\nContent-Disposition: form-data; name=\"files\"; filename=\"scan.png\"\r\n"
            f"Content-Type: image/png\r\n\r\n").encode() + image + f"\r\n--{boundary}--\r\n".encode()


@pytest.mark.e2e
def test_sigterm_finishes_the_requests_in_flight_refuses_new_ones_and_exits_0(tiny_export, tmp_path):
    export = _export_with_grace(tiny_export, tmp_path / "export")
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "chestct.cli", "serve", "--export-dir", str(export),
                               "--port", str(port)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              env={**os.environ, "TMPDIR": str(scratch)})
    try:
        deadline = time.monotonic() + 180
        while True:
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(f"http://127.0.0.1:{port}/health/ready", timeout=5).status_code == 200:
                    break
            assert server.poll() is None and time.monotonic() < deadline, "chestct serve did not become ready"
            time.sleep(0.3)

        boundary = "chestct-test-boundary"
        body = _upload(boundary, png_bytes(phantom_images(count=1)[0][1]))
        head = (f"POST /predict HTTP/1.1\r\nHost: test\r\nConnection: close\r\nContent-Type: multipart/form-data; "
                f"boundary={boundary}\r\nContent-Length: {len(body)}\r\n\r\n").encode()
        started, finish, answers = threading.Barrier(IN_FLIGHT + 1), threading.Event(), [None] * IN_FLIGHT

        def request(index: int) -> None:
            with socket.create_connection(("127.0.0.1", port), timeout=60) as sock:
                sock.sendall(head + body[:100])  # headers and the start of the body: the request is in flight
                started.wait()
                finish.wait()
                sock.sendall(body[100:])
                answers[index] = read_until_closed(sock)

        threads = [threading.Thread(target=request, args=(index,)) for index in range(IN_FLIGHT)]
        for thread in threads:
            thread.start()
        started.wait()
        time.sleep(0.5)  # the server has read every request's headers
        stopped_at = time.monotonic()
        server.send_signal(signal.SIGTERM)
        time.sleep(1.0)  # uvicorn closes its listening socket on its next tick
        with pytest.raises(OSError):  # a new request is refused
            socket.create_connection(("127.0.0.1", port), timeout=5).close()
        finish.set()
        for thread in threads:
            thread.join(timeout=60)
        status = server.wait(timeout=GRACE_S + 10)
        elapsed = time.monotonic() - stopped_at
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
    log = server.stdout.read().decode(errors="replace")
    assert all(answer is not None and answer.startswith(b"HTTP/1.1 200") for answer in answers), answers
    assert all(b'"diagnosis"' in answer for answer in answers)
    assert status == 0, log[-2000:]
    assert elapsed < GRACE_S
    assert not list(scratch.iterdir())  # every spooled upload was removed
