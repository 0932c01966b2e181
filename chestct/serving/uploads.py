"""Read a multipart upload within the service's limits, with a message that says what was wrong.

The body is counted while it streams in, so an oversized request is refused before it is stored anywhere,
whether or not the client sent a Content-Length.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator
from dataclasses import dataclass

from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.requests import Request

from chestct.params import ServeParams

FIELD = "files"
MULTIPART_OVERHEAD = 64 * 1024  # headers and boundaries around the file parts


@dataclass
class UploadError(Exception):
    status_code: int
    detail: str


def _megabytes(limit: float) -> str:
    return f"{limit:g} MB"


def _limits_text(limits: ServeParams) -> str:
    return (f"the limits are {_megabytes(limits.max_upload_mb)} per file (serve.max_upload_mb) and "
            f"{limits.max_files} files per request (serve.max_files)")


async def _counted(request: Request, limit: int, limits: ServeParams) -> AsyncGenerator[bytes, None]:
    received = 0
    async for chunk in request.stream():
        received += len(chunk)
        if received > limit:
            raise UploadError(413, f"the request is larger than {limit / 1e6:.1f} MB; {_limits_text(limits)}")
        yield chunk


async def read_uploads(request: Request, limits: ServeParams) -> list[tuple[str, bytes]]:
    """(filename, bytes) for each file in the multipart field `files`; UploadError otherwise."""
    content_type = request.headers.get("content-type", "")
    if not content_type.startswith("multipart/form-data"):
        raise UploadError(415, f"expected multipart/form-data with the image(s) in the field '{FIELD}', got "
                               f"{content_type or 'no Content-Type'}; e.g. curl -F {FIELD}=@scan.png .../predict")
    per_file = int(limits.max_upload_mb * 1e6)
    request_limit = per_file * limits.max_files + MULTIPART_OVERHEAD
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > request_limit:
        raise UploadError(413, f"the request is {int(declared) / 1e6:.1f} MB; {_limits_text(limits)}")
    parser = MultiPartParser(request.headers, _counted(request, request_limit, limits), max_files=limits.max_files,
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
            files.append((name, await upload.read()))
        return files
    finally:
        await form.close()
