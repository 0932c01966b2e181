"""Read a multipart upload within the service's limits, with a message that says what was wrong.

The body is counted while it streams in, so an oversized request is refused before it is stored anywhere,
whether or not the client sent a Content-Length. It is also timed: a client that stops sending for
serve.body_timeout_s, or trickles its body slower than MIN_BODY_RATE once that time has passed, gets 408 and its
connection closed, so a slow or stalled client cannot hold the connection and its buffers for as long as it likes.
A client that disconnects mid-upload surfaces as starlette's ClientDisconnect, which the caller logs.
"""

from __future__ import annotations

import time
from collections.abc import AsyncGenerator, AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import BinaryIO

import anyio
from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.requests import Request

from chestct.imaging.files import upload_limit_bytes
from chestct.params import ServeParams
from chestct.serving.schema import FIELD

MULTIPART_OVERHEAD = 64 * 1024  # headers and boundaries around the file parts
# Slowest average body rate accepted once serve.body_timeout_s has passed (Apache's mod_reqtimeout uses the same
# scheme with 500 bytes/s): each 1 kB received extends the deadline by 1 s, so a 20 MB scan on a 1 Mbit/s link
# passes and a client sending a byte a second is dropped after body_timeout_s.
MIN_BODY_RATE = 1000  # bytes per second
CLOSE_CONNECTION = {"Connection": "close"}  # uvicorn closes the connection after a response carrying it


@dataclass
class UploadError(Exception):
    status_code: int
    detail: str
    headers: dict[str, str] = field(default_factory=dict)


def _megabytes(limit: float) -> str:
    return f"{limit:g} MB"


def _limits_text(limits: ServeParams) -> str:
    return (f"the limits are {_megabytes(limits.max_upload_mb)} per file (serve.max_upload_mb) and "
            f"{limits.max_files} files per request (serve.max_files)")


class BodyClock:
    """The deadline for the next chunk of a request body: serve.body_timeout_s after the last one, and never
    later than body_timeout_s + received / MIN_BODY_RATE after the body started."""

    def __init__(self, limits: ServeParams):
        self.pause_s = limits.body_timeout_s
        self.started = time.monotonic()
        self.received = 0

    def wait_allowed(self) -> float:
        """Seconds to wait for the next chunk (<= 0: the body is already too slow)."""
        rate_deadline = self.started + self.pause_s + self.received / MIN_BODY_RATE
        return min(self.pause_s, rate_deadline - time.monotonic())

    def timeout_error(self) -> UploadError:
        elapsed = time.monotonic() - self.started
        if elapsed >= self.pause_s + self.received / MIN_BODY_RATE:
            why = (f"the request body arrived too slowly ({self.received} bytes in {elapsed:.0f} s; after the first "
                   f"{self.pause_s:g} s (serve.body_timeout_s) at least {MIN_BODY_RATE // 1000} kB/s on average "
                   f"is required)")
        else:
            why = f"no data for {self.pause_s:g} s while reading the request body (serve.body_timeout_s)"
        return UploadError(408, f"{why}; send the whole request without pausing", CLOSE_CONNECTION)


async def received_body(request: Request, limit: int, limits: ServeParams) -> AsyncGenerator[bytes, None]:
    """The body's chunks, refused past `limit` bytes (413) or when it stalls or trickles (408)."""
    clock = BodyClock(limits)
    chunks = request.stream()
    try:
        while True:
            wait_s = clock.wait_allowed()
            if wait_s <= 0:
                raise clock.timeout_error()
            with anyio.move_on_after(wait_s) as waited:
                try:
                    chunk = await anext(chunks)
                except StopAsyncIteration:
                    return
            if waited.cancelled_caught:
                raise clock.timeout_error()
            clock.received += len(chunk)
            if clock.received > limit:
                raise UploadError(413, f"the request is larger than {limit / 1e6:.1f} MB; {_limits_text(limits)}")
            yield chunk
    finally:
        await chunks.aclose()


@asynccontextmanager
async def received_uploads(request: Request, limits: ServeParams) -> AsyncIterator[list[tuple[str, BinaryIO]]]:
    """(filename, file) for each file in the multipart field `files`, open while the context lasts; UploadError
    otherwise, ClientDisconnect when the client goes away before its body is complete.

    The files are starlette's spooled temporary files (on disk beyond 1 MB): a request waiting for a prediction
    slot holds its upload there, not in memory; `read_files` reads them inside the slot."""
    content_type = request.headers.get("content-type", "")
    if not content_type.startswith("multipart/form-data"):
        raise UploadError(415, f"expected multipart/form-data with the image(s) in the field '{FIELD}', got "
                               f"{content_type or 'no Content-Type'}; e.g. curl -F {FIELD}=@scan.png .../predict")
    per_file = upload_limit_bytes(limits.max_upload_mb)
    request_limit = per_file * limits.max_files + MULTIPART_OVERHEAD
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > request_limit:
        raise UploadError(413, f"the request is {int(declared) / 1e6:.1f} MB; {_limits_text(limits)}")
    parser = MultiPartParser(request.headers, received_body(request, request_limit, limits), max_files=limits.max_files,
                             max_fields=limits.max_files + 8)
    try:
        form = await parser.parse()
    except MultiPartException as exc:
        if "Too many files" in str(exc):
            raise UploadError(413, f"more than {limits.max_files} files in one request; send at most "
                                   f"{limits.max_files} per request (serve.max_files)") from None
        raise UploadError(400, f"the multipart body cannot be read ({exc}); send the image(s) as "
                               f"multipart/form-data in the field '{FIELD}'") from None
    try:
        uploads = [item for item in form.getlist(FIELD) if isinstance(item, UploadFile)]
        if not uploads:
            fields = ", ".join(sorted(set(form.keys()))) or "none"
            raise UploadError(400, f"no file in the multipart field '{FIELD}' (fields received: {fields}); "
                                   f"send each image as '{FIELD}'")
        files = []
        for index, upload in enumerate(uploads):
            name = upload.filename or f"file {index + 1}"
            if upload.size is not None and upload.size > per_file:
                raise UploadError(413, f"{name}: {upload.size / 1e6:.1f} MB is over the limit of "
                                       f"{_megabytes(limits.max_upload_mb)} per file (serve.max_upload_mb)")
            files.append((name, upload.file))
        yield files
    finally:
        await form.close()


def read_files(uploads: list[tuple[str, BinaryIO]]) -> list[tuple[str, bytes]]:
    """The uploads' bytes (blocking reads: call it from a worker thread)."""
    return [(name, file.read()) for name, file in uploads]
