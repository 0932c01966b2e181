"""The service's own limits on concurrent work and connections (the export's serve params).

Decoding and prediction run in at most serve.max_concurrent requests at once (PredictionSlots); a request waits up
to serve.queue_timeout_s for a slot, then ServerBusyError (503 with Retry-After). `chestct serve` passes
uvicorn_limits() to uvicorn: at most serve.max_connections open connections, idle keep-alive closed quickly, and
its HTTP protocol with a header deadline and a per-client cap (chestct.serving.connection_guard).
"""

from __future__ import annotations

import math
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import anyio

from chestct.export.metadata import SERVE_DEFAULTS
from chestct.serving.connection_guard import guarded_protocol
from chestct.serving.predictor import ModelUnavailableError, load_export_metadata, resolve_export_dir

KEEP_ALIVE_S = 5  # an idle keep-alive connection is closed after this long (uvicorn's default, set explicitly)


class ServerBusyError(Exception):
    def __init__(self, slots: PredictionSlots):
        self.retry_after_s = max(1, math.ceil(slots.wait_s))
        super().__init__(
            f"the server is busy: all {slots.count} prediction slots (serve.max_concurrent) stayed taken for "
            f"{slots.wait_s:g} s (serve.queue_timeout_s); retry after {self.retry_after_s} s")


class PredictionSlots:
    """At most `count` requests decode and predict at once; another waits up to `wait_s` for a slot, first come
    first served, then ServerBusyError."""

    def __init__(self, count: int, wait_s: float):
        self.count, self.wait_s = count, wait_s
        self._semaphore = anyio.Semaphore(count)

    async def _acquired(self) -> bool:
        try:
            self._semaphore.acquire_nowait()  # a free slot is taken even when wait_s is 0
            return True
        except anyio.WouldBlock:
            pass
        with anyio.move_on_after(self.wait_s):
            await self._semaphore.acquire()
            return True
        return False

    @asynccontextmanager
    async def hold(self) -> AsyncIterator[None]:
        if not await self._acquired():
            raise ServerBusyError(self)
        try:
            yield
        finally:
            self._semaphore.release()


def uvicorn_limits(export_dir: str | Path | None = None) -> dict:
    """uvicorn's connection options from the export's serve params (what `chestct serve` passes): at most
    serve.max_connections open connections (uvicorn answers 503 beyond), idle keep-alive closed after
    KEEP_ALIVE_S, as `http` its h11 protocol with serve.header_timeout_s and serve.max_connections_per_client, and
    serve.shutdown_grace_s for the requests in flight at a stop (chestct.serving.shutdown). Without a readable
    export the service only answers 503s: the defaults then apply."""
    try:
        serve = load_export_metadata(resolve_export_dir(export_dir)).serve.model_dump()
    except ModelUnavailableError:
        serve = SERVE_DEFAULTS
    return {"limit_concurrency": serve["max_connections"], "timeout_keep_alive": KEEP_ALIVE_S,
            "http": guarded_protocol(serve["header_timeout_s"], serve["max_connections_per_client"]),
            "timeout_graceful_shutdown": serve["shutdown_grace_s"]}
