"""The refusal of an upload, as the routes answer it: an HTTP status, a message naming the upload, headers.

Apart from the multipart reading (uploads.py, which needs the web framework) so that framework-free checks of an
upload's content, such as the zip unpacking of series_upload.py, can raise it too.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class UploadError(Exception):
    status_code: int
    detail: str
    headers: dict[str, str] = field(default_factory=dict)
