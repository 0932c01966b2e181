"""The service's header deadline and per-client cap (chestct.serving.connection_guard), on a real uvicorn over
loopback with raw sockets: the slow-header flood that used to take the service down, and normal traffic beside it.

The app is a plain ASGI callable, not the model service: what is under test is the connection handling that
`chestct serve` gives uvicorn (the service's own routes are tested in test_app.py). A second loopback address
(127.0.0.2) stands for another client.
"""

from __future__ import annotations

import contextlib
import socket
import time

import pytest
import uvicorn

from chestct.serving.connection_guard import guarded_protocol
from tests.serving_support import free_port, read_until_closed, serving_thread

HEADER_TIMEOUT_S = 0.6
PER_CLIENT = 3
OTHER_CLIENT = "127.0.0.2"


async def hello(scope, receive, send):
    if scope["type"] != "http":
        return
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain"),
                                                                        (b"content-length", b"2")]})
    await send({"type": "http.response.body", "body": b"ok"})


@pytest.fixture(scope="module")
def server():
    port = free_port()
    config = uvicorn.Config(hello, host="127.0.0.1", port=port, log_level="warning", lifespan="off",
                            limit_concurrency=64, timeout_keep_alive=5,
                            http=guarded_protocol(HEADER_TIMEOUT_S, PER_CLIENT))
    with serving_thread(config):
        yield port


def connect(port: int, source: str = "127.0.0.1") -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=5, source_address=(source, 0))


def get(port: int, source: str = "127.0.0.1") -> bytes:
    with connect(port, source) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n")
        return read_until_closed(sock)


def wait_until_released(port: int) -> None:
    """Until the test's own address may open a connection again (the previous test's sockets closed)."""
    deadline = time.monotonic() + 5
    while not get(port).startswith(b"HTTP/1.1 200"):
        assert time.monotonic() < deadline
        time.sleep(0.05)


def test_headers_that_do_not_arrive_in_time_get_408_and_the_connection_closed(server):
    wait_until_released(server)
    with connect(server) as sock:
        started = time.monotonic()
        sock.sendall(b"POST /predict HTTP/1.1\r\nHost: test\r\n")
        for _ in range(10):  # trickling a byte now and then does not reset the deadline
            time.sleep(0.1)
            with contextlib.suppress(OSError):
                sock.sendall(b"X")
        answer = read_until_closed(sock)
        elapsed = time.monotonic() - started
    assert answer.startswith(b"HTTP/1.1 408 Request Timeout")
    assert b"serve.header_timeout_s" in answer
    assert HEADER_TIMEOUT_S <= elapsed < HEADER_TIMEOUT_S + 2


def test_a_keep_alive_connection_gets_a_deadline_for_its_next_request_too(server):
    wait_until_released(server)
    with connect(server) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: test\r\n\r\n")
        first = b""
        while not first.endswith(b"ok"):
            first += sock.recv(4096)
        assert first.startswith(b"HTTP/1.1 200")
        sock.sendall(b"GET / HTTP/1.1\r\nHost: te")  # the second request's headers stall
        assert read_until_closed(sock).startswith(b"HTTP/1.1 408")


def test_a_client_beyond_its_cap_is_refused_at_once_and_others_are_served(server):
    wait_until_released(server)
    held = [connect(server) for _ in range(PER_CLIENT)]
    try:
        for sock in held:
            sock.sendall(b"GET / HTTP/1.1\r\n")  # open and slow: each counts against the address
        time.sleep(0.1)
        started = time.monotonic()
        refused = get(server)
        assert refused.startswith(b"HTTP/1.1 429 Too Many Requests")
        assert b"serve.max_connections_per_client" in refused
        assert time.monotonic() - started < 0.5  # refused at once, not queued
        assert get(server, OTHER_CLIENT).startswith(b"HTTP/1.1 200")
    finally:
        for sock in held:
            sock.close()
    wait_until_released(server)  # closing them frees the address


def test_a_slow_header_flood_from_one_client_leaves_the_service_to_everyone_else(server):
    """The issue's probe: many connections that send a request line and one header, then nothing. Before, 200 of
    them filled the connection limit and every client got 503; now the flood's address holds PER_CLIENT of them
    until the header deadline, the rest are refused, and another client is served throughout."""
    wait_until_released(server)
    flood = []
    try:
        for _ in range(100):
            sock = connect(server)
            with contextlib.suppress(OSError):
                sock.sendall(b"POST /predict HTTP/1.1\r\nHost: test\r\n")
            flood.append(sock)
        for _ in range(5):
            assert get(server, OTHER_CLIENT).startswith(b"HTTP/1.1 200")
        answers = [read_until_closed(sock) for sock in flood]  # every one ends: 429 at once, or 408 at the deadline
    finally:
        for sock in flood:
            sock.close()
    assert sum(answer.startswith(b"HTTP/1.1 408") for answer in answers) <= PER_CLIENT
    assert sum(answer.startswith(b"HTTP/1.1 429") for answer in answers) >= 100 - PER_CLIENT
    wait_until_released(server)


def test_pipelined_requests_are_answered_and_the_next_head_still_has_its_deadline(server):
    wait_until_released(server)
    with connect(server) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: test\r\n\r\nGET / HTTP/1.1\r\nHost: test\r\n\r\nGET / HTTP/1.1\r\n")
        answer = read_until_closed(sock)  # two answers, then the stalled third head meets its deadline
    assert answer.count(b"HTTP/1.1 200") == 2 and b"HTTP/1.1 408" in answer


def test_an_oversized_head_or_content_length_with_transfer_encoding_is_refused(server):
    wait_until_released(server)
    with connect(server) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: test\r\nX-Big: " + b"a" * 40_000 + b"\r\n\r\n")
        assert read_until_closed(sock).startswith(b"HTTP/1.1 431")
    with connect(server) as sock:
        sock.sendall(b"POST / HTTP/1.1\r\nHost: test\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n"
                     b"0\r\n\r\n")
        answer = read_until_closed(sock)
    assert answer.startswith(b"HTTP/1.1 400") and b"Content-Length and Transfer-Encoding" in answer
