"""A header deadline and a per-client connection cap, in the service itself: one client with idle sockets cannot
take the service down.

uvicorn closes idle keep-alive connections (`timeout_keep_alive`) and caps open connections in total
(`limit_concurrency`, then 503 for everyone), but it has no deadline for a request's headers and no cap per
client: 200 sockets that send one header line and wait hold the whole limit for as long as they like (docs/serving.md,
the slow-client probes). Hypercorn's `read_timeout` is an idle timeout (a byte every few seconds resets
it), and Granian has a header timeout but no per-client cap; none of the three caps connections per address. So
the service runs uvicorn with `guarded_protocol(...)` as its HTTP protocol: uvicorn's own h11 protocol, plus

- a header deadline: a connection whose request headers are not complete `header_timeout_s` after it opened, or
  after its previous response (keep-alive), gets 408 and is closed, however slowly it trickles bytes;
- a per-client cap: a connection from an address that already holds `max_per_client` open connections is
  answered 429 at once and closed, never queued, so one address cannot hold the connection limit;
- a request head over MAX_HEAD_BYTES gets 431 and is closed (h11 only bounds a head that arrives in pieces);
- a request with both Content-Length and Transfer-Encoding gets 400 and is closed: proxies and servers disagree
  on which one wins, which is how requests are smuggled past a proxy (RFC 9112 section 6.3 allows refusing it).

Request bodies keep their own pause limit (serve.body_timeout_s, chestct.serving.uploads). Behind a reverse proxy
every connection comes from the proxy's address: the proxy then enforces its own per-client limits, and the cap
here should be at least the proxy's connection pool.
"""

from __future__ import annotations

import asyncio
from collections import Counter

from uvicorn.protocols.http.h11_impl import H11Protocol

TOO_MANY = (b"HTTP/1.1 429 Too Many Requests\r\ncontent-type: text/plain; charset=utf-8\r\nconnection: close\r\n"
            b"content-length: %d\r\n\r\n%b")
TIMED_OUT = (b"HTTP/1.1 408 Request Timeout\r\ncontent-type: text/plain; charset=utf-8\r\nconnection: close\r\n"
             b"content-length: %d\r\n\r\n%b")
TOO_LARGE = (b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-type: text/plain; charset=utf-8\r\n"
             b"connection: close\r\ncontent-length: %d\r\n\r\n%b")
AMBIGUOUS = (b"HTTP/1.1 400 Bad Request\r\ncontent-type: text/plain; charset=utf-8\r\nconnection: close\r\n"
             b"content-length: %d\r\n\r\n%b")
MAX_HEAD_BYTES = 32 * 1024  # a request line and headers; nginx's default buffers hold the same (4 x 8 kB)
HEAD_END = b"\r\n\r\n"


def head_problem(head: bytes) -> tuple[bytes, str] | None:
    """What is wrong with a request head seen so far (the template and the text to answer), or None. `head` holds
    at most MAX_HEAD_BYTES + len(HEAD_END) bytes of it; complete when HEAD_END is in it."""
    end = head.find(HEAD_END)
    if (end == -1 and len(head) > MAX_HEAD_BYTES) or end > MAX_HEAD_BYTES:
        return TOO_LARGE, f"the request line and headers exceed {MAX_HEAD_BYTES // 1024} kB\n"
    if end == -1:
        return None
    names = {line.split(b":", 1)[0].strip().lower() for line in head[:end].split(b"\r\n")[1:] if b":" in line}
    if b"content-length" in names and b"transfer-encoding" in names:
        return AMBIGUOUS, "both Content-Length and Transfer-Encoding: send one of them\n"
    return None


def _response(template: bytes, text: str) -> bytes:
    body = text.encode()
    return template % (len(body), body)


def guarded_protocol(header_timeout_s: float, max_per_client: int) -> type[H11Protocol]:
    """uvicorn's h11 protocol with the header deadline and the per-client cap; pass it as uvicorn's `http`. The
    count of open connections per address is shared by the connections of one server (one class per call)."""
    open_by_client: Counter[str] = Counter()

    class GuardedH11Protocol(H11Protocol):
        _counted_client: str | None = None
        _header_deadline: asyncio.TimerHandle | None = None
        _waiting_since_cycle: object = None
        _head: bytes = b""  # the current request's head so far (bounded), while its headers are awaited

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            address = self.client[0] if self.client else None
            if address is not None and open_by_client[address] >= max_per_client:
                transport.write(_response(TOO_MANY, f"this address already holds {max_per_client} open connections "
                                                    f"(serve.max_connections_per_client); close one and retry\n"))
                transport.close()
                return
            if address is not None:
                open_by_client[address] += 1
                self._counted_client = address
            self._arm_header_deadline()

        def connection_lost(self, exc: Exception | None) -> None:
            self._cancel_header_deadline()
            if self._counted_client is not None:
                open_by_client[self._counted_client] -= 1
                if open_by_client[self._counted_client] <= 0:
                    del open_by_client[self._counted_client]
                self._counted_client = None
            super().connection_lost(exc)

        def data_received(self, data: bytes) -> None:
            if self._header_deadline is not None:  # a head is awaited: check it before h11 parses it
                self._head = (self._head + data)[:MAX_HEAD_BYTES + len(HEAD_END)]
                problem = head_problem(self._head)
                if problem is not None:
                    self._refuse(*problem)
                    return
            super().data_received(data)
            if self.cycle is not self._waiting_since_cycle:  # a new request's headers are complete
                self._cancel_header_deadline()

        def on_response_complete(self) -> None:
            finished = self.cycle
            super().on_response_complete()  # may start a pipelined request whose head had already arrived
            if not self.transport.is_closing() and self.cycle is finished:
                self._arm_header_deadline()  # keep-alive: the next request's headers have a deadline too

        def _refuse(self, template: bytes, text: str) -> None:
            self._cancel_header_deadline()
            if not self.transport.is_closing():
                self.transport.write(_response(template, text))
                self.transport.close()

        def _arm_header_deadline(self) -> None:
            self._cancel_header_deadline()
            self._head = b""
            self._waiting_since_cycle = self.cycle
            self._header_deadline = self.loop.call_later(header_timeout_s, self._headers_too_slow)

        def _cancel_header_deadline(self) -> None:
            if self._header_deadline is not None:
                self._header_deadline.cancel()
                self._header_deadline = None

        def _headers_too_slow(self) -> None:
            self._header_deadline = None
            if self.transport.is_closing() or self.cycle is not self._waiting_since_cycle:
                return
            self._refuse(TIMED_OUT, f"the request headers did not arrive within {header_timeout_s:g} s "
                                    f"(serve.header_timeout_s)\n")

    return GuardedH11Protocol
