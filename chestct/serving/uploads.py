"""Read a multipart upload within the service's limits, with a message that says what was wrong.

The body is counted while it streams in, so an oversized request is refused before it is stored anywhere,
whether or not the client sent a Content-Length. It is also timed: a client that stops sending for
serve.body_timeout_s, or trickles its body slower than MIN_BODY_RATE once that time has passed, gets 408 and its
connection closed, so a slow or stalled client cannot hold the connection and its buffers for as long as it likes.
A client that disconnects mid-upload surfaces as starlette's ClientDisconnect, which the caller logs.

What a route reads is an UploadForm: /predict's images (image_form, the default) or /predict/series' one zip
(series_form), each with its own field, limits and wording.
"""

from __future__ import annotations

import time
from collections.abc import AsyncGenerator, AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import BinaryIO

import anyio
from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.requests import Request

from chestct.imaging.files import upload_limit_bytes
from chestct.params import ServeParams
from chestct.serving.schema import FIELD, SERIES_FIELD
from chestct.serving.upload_errors import UploadError

MULTIPART_OVERHEAD = 64 * 1024  # headers and boundaries around the file parts
# Slowest average body rate accepted once serve.body_timeout_s has passed (Apache's mod_reqtimeout uses the same
# scheme with 500 bytes/s): each 1 kB received extends the deadline by 1 s, so a 20 MB scan on a 1 Mbit/s link
# passes and a client sending a byte a second is dropped after body_timeout_s.
MIN_BODY_RATE = 1000  # bytes per second
CLOSE_CONNECTION = {"Connection": "close"}  # uvicorn closes the connection after a response carrying it


def _megabytes(limit: float) -> str:
    return f"{limit:g} MB"


def _limits_text(limits: ServeParams) -> str:
    return (f"the limits are {_megabytes(limits.max_upload_mb)} per file (serve.max_upload_mb) and "
            f"{limits.max_files} files per request (serve.max_files)")


@dataclass(frozen=True)
class UploadForm:
    """What one route reads from its multipart body (the field, how many files, how large each) and the words its
    refusals use."""

    field: str
    max_files: int
    per_file: int  # bytes
    content: str  # what the field holds: "the image(s)"
    each: str  # "send {each} as '{field}'"
    example: str  # a request that works
    limits_text: str  # the limits, for a request that is too large
    per_file_text: str  # "the limit of {per_file_text}"
    too_many_text: str  # a request with more than max_files files


def image_form(limits: ServeParams) -> UploadForm:
    """/predict: up to serve.max_files scans in the field 'files', each at most serve.max_upload_mb."""
    return UploadForm(
        field=FIELD, max_files=limits.max_files, per_file=upload_limit_bytes(limits.max_upload_mb),
        content="the image(s)", each="each image", example=f"curl -F {FIELD}=@scan.png .../predict",
        limits_text=_limits_text(limits),
        per_file_text=f"{_megabytes(limits.max_upload_mb)} per file (serve.max_upload_mb)",
        too_many_text=(f"more than {limits.max_files} files in one request; send at most {limits.max_files} per "
                       f"request (serve.max_files)"))


def series_zip_limit_bytes(limits: ServeParams) -> int:
    """The largest zipped series accepted: as large as a whole /predict request (serve.max_files files of
    serve.max_upload_mb each), since a series is many slices."""
    return upload_limit_bytes(limits.max_upload_mb) * limits.max_files


def series_form(limits: ServeParams) -> UploadForm:
    """/predict/series: one zip in the field 'file', at most series_zip_limit_bytes."""
    limit = series_zip_limit_bytes(limits)
    limit_text = (f"{_megabytes(limit / 1e6)} for a zipped series (serve.max_upload_mb x serve.max_files = "
                  f"{_megabytes(limits.max_upload_mb)} x {limits.max_files})")
    return UploadForm(
        field=SERIES_FIELD, max_files=1, per_file=limit, content="one zip of the series folder", each="the zip",
        example=f"curl -F {SERIES_FIELD}=@series.zip .../predict/series", limits_text=f"the limit is {limit_text}",
        per_file_text=limit_text,
        too_many_text=f"more than one file in one request; send one zip in the field '{SERIES_FIELD}'")


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


async def received_body(request: Request, limit: int, limits: ServeParams,
                        limits_text: str | None = None) -> AsyncGenerator[bytes, None]:
    """The body's chunks, refused past `limit` bytes (413, saying `limits_text`: by default the /predict limits)
    or when it stalls or trickles (408)."""
    limits_text = limits_text or _limits_text(limits)
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
                raise UploadError(413, f"the request is larger than {limit / 1e6:.1f} MB; {limits_text}")
            yield chunk
    finally:
        await chunks.aclose()


@asynccontextmanager
async def received_uploads(request: Request, limits: ServeParams, form: UploadForm | None = None
                           ) -> AsyncIterator[list[tuple[str, BinaryIO]]]:
    """(filename, file) for each file in the multipart field `form.field` (by default /predict's image_form),
    open while the context lasts; UploadError otherwise, ClientDisconnect when the client goes away before its body
    is complete.

    The files are starlette's spooled temporary files (on disk beyond 1 MB): a request waiting for a prediction
    slot holds its upload there, not in memory; `read_files` reads them inside the slot."""
    form = form or image_form(limits)
    content_type = request.headers.get("content-type", "")
    if not content_type.startswith("multipart/form-data"):
        raise UploadError(415, f"expected multipart/form-data with {form.content} in the field '{form.field}', got "
                               f"{content_type or 'no Content-Type'}; e.g. {form.example}")
    request_limit = form.per_file * form.max_files + MULTIPART_OVERHEAD
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > request_limit:
        raise UploadError(413, f"the request is {int(declared) / 1e6:.1f} MB; {form.limits_text}")
    parser = MultiPartParser(request.headers, received_body(request, request_limit, limits, form.limits_text),
                             max_files=form.max_files, max_fields=form.max_files + 8)
    try:
        multipart = await parser.parse()
    except MultiPartException as exc:
        if "Too many files" in str(exc):
            raise UploadError(413, form.too_many_text) from None
        raise UploadError(400, f"the multipart body cannot be read ({exc}); send {form.content} as "
                               f"multipart/form-data in the field '{form.field}'") from None
    try:
        uploads = [item for item in multipart.getlist(form.field) if isinstance(item, UploadFile)]
        if not uploads:
            fields = ", ".join(sorted(set(multipart.keys()))) or "none"
            raise UploadError(400, f"no file in the multipart field '{form.field}' (fields received: {fields}); "
                                   f"send {form.each} as '{form.field}'")
        files = []
        for index, upload in enumerate(uploads):
            name = upload.filename or f"file {index + 1}"
            if upload.size is not None and upload.size > form.per_file:
                raise UploadError(413, f"{name}: {upload.size / 1e6:.1f} MB is over the limit of "
                                       f"{form.per_file_text}")
            files.append((name, upload.file))
        yield files
    finally:
        await multipart.close()


def read_files(uploads: list[tuple[str, BinaryIO]]) -> list[tuple[str, bytes]]:
    """The uploads' bytes (blocking reads: call it from a worker thread)."""
    return [(name, file.read()) for name, file in uploads]
