"""`POST /upload` and `GET /download/<path>`: files in and out of a sandbox over plain HTTP (PROTOCOL.md 4).

Uploads are parsed as they stream in and written to a staging file beside the sandbox's tree, then renamed into
place, so a failed or oversized upload never leaves a partial file behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import tempfile
from pathlib import Path
from typing import Any

from python_multipart import MultipartParser
from python_multipart.exceptions import FormParserError
from python_multipart.multipart import parse_options_header
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response

from ...protocol.connect import ConnectError
from ..bodies import error_response
from .filesystem import missing, os_error
from .paths import SandboxPaths

#: Bytes of non-file form fields (`path`) accepted in one upload.
MAX_FIELD_BYTES = 64 * 1024


class _UploadError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def _connect_error_response(exc: ConnectError) -> JSONResponse:
    status = 507 if exc.code == "resource_exhausted" else exc.http_status
    return error_response(status, exc.message)


class _MultipartUpload:
    """Callbacks for python-multipart: the `file` part goes to a staging file, small fields to memory."""

    def __init__(self, staging: Path, limit: int) -> None:
        self.limit = limit
        self.fields: dict[str, str] = {}
        self.filename: str | None = None
        self.size = 0
        self._staging_dir = staging
        self.staged: Path | None = None
        self._fd: int | None = None
        self._header_field = bytearray()
        self._header_value = bytearray()
        self._headers: dict[str, bytes] = {}
        self._part: str | None = None
        self._is_file = False
        self._value = bytearray()
        self._field_bytes = 0

    def callbacks(self) -> Any:
        return {
            "on_part_begin": self._part_begin,
            "on_header_field": lambda data, start, end: self._header_field.extend(data[start:end]),
            "on_header_value": lambda data, start, end: self._header_value.extend(data[start:end]),
            "on_header_end": self._header_end,
            "on_headers_finished": self._headers_finished,
            "on_part_data": self._part_data,
            "on_part_end": self._part_end,
        }

    def _part_begin(self) -> None:
        self._headers = {}
        self._part = None
        self._is_file = False
        self._value = bytearray()

    def _header_end(self) -> None:
        self._headers[self._header_field.decode("latin-1").lower()] = bytes(self._header_value)
        self._header_field.clear()
        self._header_value.clear()

    def _headers_finished(self) -> None:
        _, options = parse_options_header(self._headers.get("content-disposition", b""))
        self._part = options.get(b"name", b"").decode("utf-8", "replace")
        if self._part == "file":
            if self.staged is not None:
                raise _UploadError(400, "one file per upload request: the multipart body has two 'file' parts")
            self._is_file = True
            self.filename = options.get(b"filename", b"").decode("utf-8", "replace") or None
            self._fd, name = tempfile.mkstemp(dir=self._staging_dir, prefix="upload-")
            self.staged = Path(name)

    def _part_data(self, data: bytes, start: int, end: int) -> None:
        if self._is_file:
            assert self._fd is not None
            self.size += end - start
            if self.size > self.limit:
                raise _UploadError(413, f"the file is larger than this server's upload limit of {self.limit} bytes")
            view = memoryview(data)[start:end]
            while view:
                written = os.write(self._fd, view)
                view = view[written:]
        else:
            self._field_bytes += end - start
            if self._field_bytes > MAX_FIELD_BYTES:
                raise _UploadError(413, f"form fields larger than {MAX_FIELD_BYTES} bytes")
            self._value.extend(data[start:end])

    def _part_end(self) -> None:
        if self._is_file:
            self.close_file()
        elif self._part:
            self.fields[self._part] = self._value.decode("utf-8", "replace")

    def close_file(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def discard(self) -> None:
        self.close_file()
        if self.staged is not None:
            with contextlib.suppress(OSError):
                self.staged.unlink()
            self.staged = None


def _boundary(request: Request) -> bytes:
    content_type, options = parse_options_header(request.headers.get("content-type", ""))
    boundary = options.get(b"boundary")
    if content_type != b"multipart/form-data" or not boundary:
        raise _UploadError(400, "upload must be multipart/form-data with a 'file' part (and a 'path' part)")
    return boundary


async def upload(request: Request, paths: SandboxPaths, staging: Path, limit: int) -> Response:
    """Handle one multipart upload: `file` (its filename is the destination) and `path`, in either order."""
    try:
        declared = int(request.headers.get("content-length") or 0)
        if declared > limit + MAX_FIELD_BYTES:
            raise _UploadError(413, f"the upload of {declared} bytes is larger than this server's limit of {limit}")
        boundary = _boundary(request)
    except ValueError:
        return error_response(400, "malformed Content-Length header")
    except _UploadError as exc:
        return error_response(exc.status, exc.message)
    staging.mkdir(parents=True, exist_ok=True)
    form = _MultipartUpload(staging, limit)
    parser = MultipartParser(boundary, form.callbacks())
    try:
        async for chunk in request.stream():
            if chunk:
                await asyncio.to_thread(parser.write, chunk)
        await asyncio.to_thread(parser.finalize)
        form.close_file()
        return await asyncio.to_thread(_place, form, request.query_params.get("path"), paths)
    except _UploadError as exc:
        return error_response(exc.status, exc.message)
    except FormParserError as exc:
        return error_response(400, f"malformed multipart body: {exc}")
    except ConnectError as exc:
        return _connect_error_response(exc)
    finally:
        form.discard()


def _place(form: _MultipartUpload, query_path: str | None, paths: SandboxPaths) -> Response:
    """Move the staged file to its destination, creating parent directories."""
    if form.staged is None:
        raise _UploadError(400, "the multipart body has no 'file' part")
    target = query_path or form.fields.get("path") or form.filename
    if not target:
        raise _UploadError(400, "no destination: send a 'path' part (or the file's full path as its filename)")
    sandbox_path = paths.normalize(target)
    host = paths.to_host(sandbox_path)
    if host.is_dir():
        raise _UploadError(400, f"upload to {sandbox_path}: is a directory")
    try:
        host.parent.mkdir(parents=True, exist_ok=True)
        os.chmod(form.staged, 0o644)
        os.replace(form.staged, host)
        paths.own(host)
    except OSError as exc:
        raise os_error(exc, "upload to", sandbox_path) from None
    form.staged = None
    return JSONResponse({"path": sandbox_path, "name": host.name, "type": "file"})


async def download(request: Request, path: str, paths: SandboxPaths) -> Response:
    """The raw bytes of one file. The SDKs strip the leading slash, so `a.txt` is `/a.txt` first and, if that
    does not exist, `/home/user/a.txt` (where an upload of the relative path `a.txt` put it)."""
    query_path = request.query_params.get("path")
    try:
        if query_path:
            candidates = [query_path]
        elif path.startswith("/"):
            candidates = [path]
        else:
            candidates = ["/" + path, path] if path else ["/"]
        sandbox_path = paths.normalize(candidates[0])
        host = paths.to_host(sandbox_path)
        for other in candidates[1:]:
            if os.path.lexists(host):
                break
            other_host = paths.to_host(other)
            if os.path.lexists(other_host):
                sandbox_path, host = paths.normalize(other), other_host
        if not host.exists():
            raise missing(sandbox_path, "open")
        if host.is_dir():
            return error_response(400, f"download {sandbox_path}: is a directory, not a file")
        if not os.access(host, os.R_OK):
            return error_response(403, f"download {sandbox_path}: permission denied")
    except ConnectError as exc:
        return _connect_error_response(exc)
    return FileResponse(host, media_type="application/octet-stream")
