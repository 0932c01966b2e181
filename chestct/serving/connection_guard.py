"""A header deadline and a per-client connection cap, in the service itself: one client with idle sockets cannot
take the service down.

uvicorn closes idle keep-alive connections (`timeout_keep_alive`) and caps open connections in total
(`limit_concurrency`, then 503 for everyone), but it has no deadline for a request's headers and no cap per
client: 200 sockets that send one header line and wait hold the whole limit for as long as they like (README
"Serving", the slow-client probes). Hypercorn's `read_timeout` is an idle timeout (a byte every few seconds resets
it), and Granian has a header timeout but no per-client cap; none of the three caps connections per address. So
the service runs uvicorn with `guarded_protocol(...)` as its HTTP protocol: uvicorn's own h11 protocol, plus

- a header deadline: a connection whose request headers are not complete `header_timeout_s` after it opened, or
  after its previous response (keep-alive), gets 408 and is closed, however slowly it trickles bytes;
- a per-client cap: a connection from an address that already holds `max_per_client` open connections is
  answered 429 at once and closed, never queued, so one address cannot hold the connection limit.

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
            super().data_received(data)
            if self.cycle is not self._waiting_since_cycle:  # a new request's headers are complete
                self._cancel_header_deadline()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing():  # keep-alive: the next request's headers have a deadline too
                self._arm_header_deadline()

        def _arm_header_deadline(self) -> None:
            self._cancel_header_deadline()
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
            self.transport.write(_response(TIMED_OUT, f"the request headers did not arrive within "
                                                      f"{header_timeout_s:g} s (serve.header_timeout_s)\n"))
            self.transport.close()

    return GuardedH11Protocol
