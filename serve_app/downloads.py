"""Artifact downloads from either kind of storage root, with HTTP Range support.

A shared folder is served by Starlette's FileResponse (which handles Range itself).
On S3 the object is streamed in chunks with ranged reads; one `bytes=` range gives 206
with Content-Range, an unsatisfiable one 416, and anything else (several ranges, bad
syntax) the whole object with 200, as RFC 9110 allows a server to ignore Range.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Iterator
from pathlib import PurePosixPath
from urllib.parse import quote

from fastapi import HTTPException
from fastapi.responses import FileResponse, Response, StreamingResponse

from jobs.paths import JobPaths
from jobs.storage import Storage
from serve_app.security import safe_artifact, safe_artifact_key

CHUNK = 1 << 20
SINGLE_RANGE = re.compile(r"^\s*bytes\s*=\s*(\d*)\s*-\s*(\d*)\s*$", re.IGNORECASE)


def byte_range(header: str | None, size: int) -> tuple[int, int] | None:
    """(first, last) byte, inclusive, of a single `bytes=` range; None for the whole file.

    Raises HTTPException(416) when the range starts at or past the end.
    """
    m = SINGLE_RANGE.match(header or "")
    if not m or not (m[1] or m[2]):
        return None
    if not m[1]:  # "bytes=-N": the last N bytes
        n = int(m[2])
        if n == 0 or size == 0:
            raise _unsatisfiable(size)
        return max(size - n, 0), size - 1
    first = int(m[1])
    last = min(int(m[2]), size - 1) if m[2] else size - 1
    if m[2] and int(m[2]) < first:
        return None  # "bytes=9-3" is invalid: ignored
    if first >= size:
        raise _unsatisfiable(size)
    return first, last


def _unsatisfiable(size: int) -> HTTPException:
    return HTTPException(
        416,
        detail=f"range not satisfiable: the file has {size} bytes",
        headers={"content-range": f"bytes */{size}"},
    )


def _disposition(name: str) -> str:
    quoted = quote(name)
    if quoted != name:
        return f"attachment; filename*=utf-8''{quoted}"
    return f'attachment; filename="{name}"'


def _chunks(storage: Storage, key: str, first: int, last: int) -> Iterator[bytes]:
    """Bytes first..last of the object; Starlette runs this in a thread."""
    with storage.open_input(key) as f:
        pos = first
        while pos <= last:
            data = f.read_at(min(CHUNK, last - pos + 1), pos)
            if not data:
                raise OSError(f"{storage.uri(key)} ended at byte {pos}, expected {last + 1}")
            pos += len(data)
            yield data


async def artifact_response(paths: JobPaths, rel: str, range_header: str | None) -> Response:
    """The artifact `rel` of a job, or 404 (path checks in serve_app.security)."""
    if paths.storage.is_local:
        target = safe_artifact(paths, rel)
        return FileResponse(target, filename=target.name, media_type="application/octet-stream")
    key, size = await asyncio.to_thread(safe_artifact_key, paths, rel)
    headers = {
        "accept-ranges": "bytes",
        "content-disposition": _disposition(PurePosixPath(rel).name),
    }
    span = byte_range(range_header, size)
    first, last, status = (0, size - 1, 200) if span is None else (*span, 206)
    if span is not None:
        headers["content-range"] = f"bytes {first}-{last}/{size}"
    headers["content-length"] = str(last - first + 1)
    body = _chunks(paths.storage, key, first, last) if size else iter([b""])
    return StreamingResponse(
        body, status_code=status, headers=headers, media_type="application/octet-stream"
    )
