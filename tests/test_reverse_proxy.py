"""The shipped reverse proxy (deploy/nginx.conf) in front of `chestct serve` on loopback: the slow-client floods
that once took the service down, and normal traffic through it (a scan, a v2 infer, /metrics).

nginx serves the shipped file itself, with only its listen port and upstream address changed, inside a minimal
main configuration of the test's own (pid, logs and temporary paths in a temporary folder). The tests skip,
saying why, where nginx is not installed; .ci/run installs Debian's. 127.0.0.2 stands for another client.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from tests.conftest import PROJECT_ROOT
from tests.serving_support import SIZE, free_port, phantom_images, png_bytes

NGINX = shutil.which("nginx") or next((path for path in ("/usr/sbin/nginx",) if os.access(path, os.X_OK)), None)
pytestmark = [pytest.mark.e2e,
              pytest.mark.skipif(NGINX is None, reason="nginx is not installed (.ci/run installs Debian's nginx)")]
OTHER_CLIENT = "127.0.0.2"


def _wait_for(url: str, process: subprocess.Popen, what: str) -> None:
    deadline = time.monotonic() + 180
    while True:
        with contextlib.suppress(httpx.TransportError):
            if httpx.get(url, timeout=5).status_code == 200:
                return
        assert process.poll() is None and time.monotonic() < deadline, f"{what} did not start"
        time.sleep(0.3)


def proxy_configuration(folder: Path, proxy_port: int, service_port: int) -> Path:
    """deploy/nginx.conf with the test's ports, inside a main configuration that keeps everything in `folder`."""
    site = (PROJECT_ROOT / "deploy" / "nginx.conf").read_text()
    for shipped, used in (("listen 80;", f"listen 127.0.0.1:{proxy_port};"),
                          ("server 127.0.0.1:8000;", f"server 127.0.0.1:{service_port};")):
        assert shipped in site, f"deploy/nginx.conf no longer holds {shipped!r}: update this test"
        site = site.replace(shipped, used)
    (folder / "chestct.conf").write_text(site)
    temporary = "\n".join(f"    {kind}_temp_path {folder / kind};" for kind in ("client_body", "proxy", "fastcgi",
                                                                             "uwsgi", "scgi"))
    user = "user root root;\n" if os.geteuid() == 0 else ""  # workers as root: the temporary folder is root's
    main = (f"{user}pid {folder / 'nginx.pid'};\nerror_log {folder / 'error.log'} warn;\nworker_processes 1;\n"
            f"events {{ worker_connections 4096; }}\n"
            f"http {{\n    access_log off;\n{temporary}\n    include {folder / 'chestct.conf'};\n}}\n")
    (folder / "nginx.conf").write_text(main)
    return folder / "nginx.conf"


@pytest.fixture(scope="module")
def proxied(tiny_export, tmp_path_factory):
    """(proxy URL, proxy port, service port): chestct serve on one port, nginx with deploy/nginx.conf in front."""
    folder = tmp_path_factory.mktemp("nginx")
    service_port, proxy_port = free_port(), free_port()
    service = subprocess.Popen([sys.executable, "-m", "chestct.cli", "serve", "--export-dir", str(tiny_export),
                                "--port", str(service_port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    configuration = proxy_configuration(folder, proxy_port, service_port)
    proxy = None
    try:
        _wait_for(f"http://127.0.0.1:{service_port}/health/ready", service, "chestct serve")
        checked = subprocess.run([NGINX, "-t", "-p", str(folder), "-c", str(configuration)], capture_output=True,
                                 text=True)
        assert checked.returncode == 0, checked.stderr
        proxy = subprocess.Popen([NGINX, "-p", str(folder), "-c", str(configuration), "-g", "daemon off;"],
                                 stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        _wait_for(f"http://127.0.0.1:{proxy_port}/health/ready", proxy, "nginx")
        yield f"http://127.0.0.1:{proxy_port}", proxy_port, service_port
    finally:
        for process in (proxy, service):
            if process is not None and process.poll() is None:
                process.terminate()
                process.wait(timeout=30)


def health_from(port: int, source: str) -> int:
    with httpx.Client(transport=httpx.HTTPTransport(local_address=source), timeout=10) as client:
        return client.get(f"http://127.0.0.1:{port}/health").status_code


def test_a_scan_a_v2_infer_and_metrics_go_through_the_proxy(proxied):
    url, _, _ = proxied
    scan = png_bytes(phantom_images(count=1)[0][1])
    answer = httpx.post(f"{url}/predict", files=[("files", ("scan.png", scan, "image/png"))], timeout=60)
    assert answer.status_code == 200 and answer.json()["results"][0]["diagnosis"] in ("Normal", "Cancer")
    image = np.zeros((1, SIZE, SIZE, 1), np.uint8)
    body = {"inputs": [{"name": "image", "datatype": "UINT8", "shape": list(image.shape),
                        "data": image.ravel().tolist()}]}
    inferred = httpx.post(f"{url}/v2/models/chestct/infer", json=body, timeout=60)
    assert inferred.status_code == 200 and inferred.json()["outputs"][0]["name"] == "probability"
    metrics = httpx.get(f"{url}/metrics", timeout=10)
    assert metrics.status_code == 200 and "chestct" in metrics.text


def test_slow_headers_and_trickling_bodies_leave_the_service_to_everyone_else(proxied):
    """The probes that took `chestct serve` alone down: 500 connections that send a request line and one header,
    then nothing, and 100 whose bodies trickle. Behind the proxy, slow headers cost nginx a socket each and the
    service nothing: /health stays 200 for every client. Trickling bodies are requests in progress, so the flooding
    address meets its cap (limit_conn: 429) while another client is still served."""
    _, port, _ = proxied
    held = []
    try:
        for _ in range(500):
            sock = socket.create_connection(("127.0.0.1", port), timeout=10)
            sock.sendall(b"POST /predict HTTP/1.1\r\nHost: test\r\n")
            held.append(sock)
        assert health_from(port, OTHER_CLIENT) == 200
        assert health_from(port, "127.0.0.1") == 200
        for _ in range(100):
            sock = socket.create_connection(("127.0.0.1", port), timeout=10)
            sock.sendall(b"POST /predict HTTP/1.1\r\nHost: test\r\nContent-Type: multipart/form-data; boundary=b\r\n"
                         b"Content-Length: 100000\r\n\r\n--b\r\n")
            held.append(sock)
        time.sleep(1.0)
        for sock in held[-100:]:  # the bodies trickle on
            with contextlib.suppress(OSError):
                sock.sendall(b"x")
        assert health_from(port, OTHER_CLIENT) == 200
        assert health_from(port, "127.0.0.1") == 429
    finally:
        for sock in held:
            sock.close()


HEADER_TIMEOUT_S = 10  # serve.header_timeout_s of the tiny export (the default) and deploy/nginx.conf's


@pytest.mark.parametrize("through", ["chestct serve alone", "nginx"])
def test_1000_half_open_header_connections_neither_block_another_client_nor_stay_open(proxied, through):
    """The issue's acceptance: 1000 connections from one client that send a request line and one header, held
    open; a second client's /health answers 200 within 1 s, and every half-open connection is closed within the
    header timeout + 2 s (the service refuses all but serve.max_connections_per_client at once, and closes those at
    its deadline; nginx holds them all and closes them at client_header_timeout)."""
    _, proxy_port, service_port = proxied
    port = service_port if through == "chestct serve alone" else proxy_port
    held, opened = [], time.monotonic()
    try:
        for _ in range(1000):
            sock = socket.create_connection(("127.0.0.1", port), timeout=10)
            with contextlib.suppress(OSError):  # the service may already have refused it
                sock.sendall(b"POST /predict HTTP/1.1\r\nHost: test\r\n")
            held.append(sock)
        asked = time.monotonic()
        assert health_from(port, OTHER_CLIENT) == 200
        assert time.monotonic() - asked < 1.0
        deadline = opened + HEADER_TIMEOUT_S + 2
        still_open = 0
        for sock in held:
            sock.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                while sock.recv(4096):  # a 429 or 408 first, or nothing: then the end of the stream
                    pass
            except TimeoutError:
                still_open += 1
            except OSError:  # reset by the peer: closed
                pass
        assert still_open == 0, f"{still_open} of 1000 half-open connections still open after the header timeout"
    finally:
        for sock in held:
            sock.close()
