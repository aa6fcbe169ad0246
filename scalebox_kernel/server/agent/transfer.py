"""`POST /upload` and `GET /download/<path>`: files in and out of a sandbox over plain HTTP (PROTOCOL.md 4).

Both run as the sandbox's own uid, on its file threads (`..isolation.tree`), with paths resolved inside the
sandbox. An upload streams into an anonymous file (O_TMPFILE) on the sandbox's own disk, so it counts against the
sandbox's disk limit, and only a complete one gets its name, atomically (whatever had that name, a symlink
included, is replaced, never followed); a failed, oversized or truncated upload leaves nothing behind. A
download opens the file once (never blocking on a FIFO) and streams from that fd.

Either carries the sandbox's access token, or is a signed URL (`?username=&signature=[&signature_expiration=]`,
PROTOCOL.md 4) that `signature_problem` checks, so a browser can fetch or send one file without the token.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hmac
import os
import secrets
import stat
import time
from collections.abc import AsyncIterator, Callable, Mapping
from datetime import UTC, datetime
from typing import Any

from python_multipart import MultipartParser
from python_multipart.exceptions import FormParserError
from python_multipart.multipart import parse_options_header
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from ...protocol import signature
from ...protocol.connect import ConnectError
from ..bodies import error_response
from ..isolation.tree import OwnedFd, SandboxTree, split
from .filesystem import os_error
from .paths import SandboxPaths

#: Bytes of non-file form fields (`path`) accepted in one upload.
MAX_FIELD_BYTES = 64 * 1024
#: Where an upload is staged inside the sandbox (its own scratch space, on its own disk).
STAGING_DIR = "/tmp"
DOWNLOAD_CHUNK = 1024 * 1024


class _UploadError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def signed_path(query: Mapping[str, str], url_path: str | None) -> str | None:
    """The path a signed URL acts on, the one its signature must cover: the `path` query parameter (an upload's
    only way to name it; a download's override), else the path of `/download/<path>`."""
    return query.get("path") or url_path


def signature_problem(
    query: Mapping[str, str],
    path: str,
    operation: signature.Operation,
    token: str,
    from_url_path: bool = False,
) -> tuple[int, str] | None:
    """Why a signed URL may not do `operation` on `path` (HTTP status, message), or None if it may.

    The SDKs sign the path as the user gave it (Python) or with one leading slash (JS). A `?path=` is the
    spelling that was signed and must match it exactly; only a path taken from the URL of `/download/<path>`
    (`from_url_path`), which drops the leading slash, may also be the absolute path signed with one. A username
    with a `:` is refused: the signed `path:operation:user:token` would not say where the user begins. A wrong
    signature is 401, an expired one 403.
    """
    given = query.get(signature.SIGNATURE, "")
    if not given.startswith("v1_"):
        return 401, "unsupported URL signature: it must start with v1_ (see the SDK's upload_url/download_url)"
    user = query.get(signature.USERNAME) or signature.DEFAULT_USER
    if ":" in user:
        return 401, f"invalid {signature.USERNAME} {user[:40]!r}: a signed URL's username cannot contain ':'"
    raw_expiration = query.get(signature.EXPIRATION)
    expiration: int | None = None
    if raw_expiration is not None:
        if not (raw_expiration.isascii() and raw_expiration.isdigit() and len(raw_expiration) <= 12):
            return 401, f"{signature.EXPIRATION} must be unix seconds, not {raw_expiration[:40]!r}"
        expiration = int(raw_expiration)
    if not token:
        return 401, "this sandbox has no access token, so no signed URL can be valid for it"
    matched = False
    spellings = [path, "/" + path] if from_url_path and not path.startswith("/") else [path]
    for candidate in spellings:
        expected = signature.sign(candidate, operation, user, token, expiration)
        matched |= hmac.compare_digest(given.encode(), expected.encode())
    if not matched:
        verb = "download" if operation == "read" else "upload"
        return (
            401,
            f"invalid signature for a {verb} of {path!r} as {user!r}: the URL was altered or is not this sandbox's",
        )
    if expiration is not None and expiration <= time.time():
        when = datetime.fromtimestamp(expiration, UTC).isoformat(timespec="seconds")
        return 403, f"the signed URL expired at {when}; ask for a new one (upload_url/download_url)"
    return None


def _connect_error_response(exc: ConnectError) -> JSONResponse:
    status = 507 if exc.code == "resource_exhausted" else exc.http_status
    return error_response(status, exc.message)


class _MultipartUpload:
    """Callbacks for python-multipart: the `file` part goes to a staging file, small fields to memory."""

    def __init__(self, stage: Callable[[], int], limit: int) -> None:
        self.limit = limit
        self.fields: dict[str, str] = {}
        self.filename: str | None = None
        self.size = 0
        self._stage = stage
        self.staged: int | None = None  # fd of the anonymous file the `file` part goes to
        self._fd: int | None = None
        self._header_field = bytearray()
        self._header_value = bytearray()
        self._headers: dict[str, bytes] = {}
        self._part: str | None = None
        self._is_file = False
        self._value = bytearray()
        self._field_bytes = 0
        self.complete = False  # the closing boundary arrived

    def callbacks(self) -> Any:
        return {
            "on_end": self._end,
            "on_part_begin": self._part_begin,
            "on_header_field": lambda data, start, end: self._header_field.extend(data[start:end]),
            "on_header_value": lambda data, start, end: self._header_value.extend(data[start:end]),
            "on_header_end": self._header_end,
            "on_headers_finished": self._headers_finished,
            "on_part_data": self._part_data,
            "on_part_end": self._part_end,
        }

    def _end(self) -> None:
        self.complete = True

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
            self.staged = self._fd = self._stage()

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
        """The part is complete (the staged fd stays open until the file is placed)."""
        self._fd = None

    def discard(self) -> None:
        """Close the staged file; unless it was placed, it disappears with its last fd."""
        self._fd = None
        if self.staged is not None:
            os.close(self.staged)
            self.staged = None


def _boundary(request: Request) -> bytes:
    content_type, options = parse_options_header(request.headers.get("content-type", ""))
    boundary = options.get(b"boundary")
    if content_type != b"multipart/form-data" or not boundary:
        raise _UploadError(400, "upload must be multipart/form-data with a 'file' part (and a 'path' part)")
    return boundary


def _stage(tree: SandboxTree) -> int:
    """An anonymous file in the sandbox's scratch space, as the sandbox (blocking: on the tree's threads)."""
    return tree.open(STAGING_DIR, os.O_WRONLY | os.O_TMPFILE, 0o644)


async def upload(request: Request, paths: SandboxPaths, tree: SandboxTree, limit: int) -> Response:
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
    form = _MultipartUpload(lambda: tree.call(_stage, tree), limit)
    parser = MultipartParser(boundary, form.callbacks())
    try:
        async for chunk in request.stream():
            if chunk:
                await asyncio.to_thread(parser.write, chunk)
        await asyncio.to_thread(parser.finalize)
        if not form.complete:
            raise _UploadError(400, "truncated multipart body: its closing boundary is missing; nothing was written")
        form.close_file()
        return await tree.run(_place, form, request.query_params.get("path"), paths, tree)
    except _UploadError as exc:
        return error_response(exc.status, exc.message)
    except FormParserError as exc:
        return error_response(400, f"malformed multipart body: {exc}")
    except ConnectError as exc:
        return _connect_error_response(exc)
    except OSError as exc:  # staging or writing the file (a full disk, say)
        return _connect_error_response(os_error(exc, "upload", "the uploaded file"))
    finally:
        form.discard()


def _place(form: _MultipartUpload, query_path: str | None, paths: SandboxPaths, tree: SandboxTree) -> Response:
    """Give the staged file its name (creating parent directories), as the sandbox, on the tree's threads."""
    if form.staged is None:
        raise _UploadError(400, "the multipart body has no 'file' part")
    target = query_path or form.fields.get("path") or form.filename
    if not target:
        raise _UploadError(400, "no destination: send a 'path' part (or the file's full path as its filename)")
    sandbox_path = paths.normalize(target)
    if sandbox_path == "/":
        raise _UploadError(400, "upload to /: is a directory")
    parent, name = split(sandbox_path)
    try:
        if tree.is_dir(sandbox_path) and not stat.S_ISLNK(tree.lstat(sandbox_path).st_mode):
            raise _UploadError(400, f"upload to {sandbox_path}: is a directory")
        tree.makedirs(parent)
        with tree.parent(sandbox_path) as (dir_fd, _):
            temp = f".{name[:200]}.{secrets.token_hex(6)}.upload"
            try:
                os.link(f"/proc/self/fd/{form.staged}", temp, dst_dir_fd=dir_fd, follow_symlinks=True)
            except OSError as exc:
                if exc.errno != errno.EXDEV:
                    raise
                _copy_staged(form.staged, temp, dir_fd)  # another file system there (a bucket mount)
            try:
                os.rename(temp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(temp, dir_fd=dir_fd)
                raise
    except OSError as exc:
        if exc.errno == errno.EISDIR:
            raise _UploadError(400, f"upload to {sandbox_path}: is a directory") from None
        raise os_error(exc, "upload to", sandbox_path) from None
    return JSONResponse({"path": sandbox_path, "name": name, "type": "file"})


def _copy_staged(staged: int, temp: str, dir_fd: int) -> None:
    """Copy the staged file to a new `temp` in `dir_fd`, which is on another file system than the sandbox's scratch
    space (blocking: on the tree's threads, as the sandbox)."""
    source = os.open(f"/proc/self/fd/{staged}", os.O_RDONLY | os.O_CLOEXEC)  # the staged fd is write-only
    try:
        out = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644, dir_fd=dir_fd)
        try:
            size, offset = os.fstat(source).st_size, 0
            while offset < size:
                sent = os.sendfile(out, source, offset, min(size - offset, 1 << 24))
                if not sent:
                    break
                offset += sent
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(temp, dir_fd=dir_fd)
            raise
        finally:
            os.close(out)
    finally:
        os.close(source)


def _open_for_download(candidates: list[str], paths: SandboxPaths, tree: SandboxTree) -> tuple[str, int, int]:
    """(sandbox path, fd, size) of the first candidate that exists (blocking: on the tree's threads)."""
    sandbox_path = paths.normalize(candidates[0])
    try:
        for other in candidates[1:]:
            if tree.exists(sandbox_path):
                break
            if tree.exists(paths.normalize(other)):
                sandbox_path = paths.normalize(other)
        fd = tree.open(sandbox_path, os.O_RDONLY | os.O_NONBLOCK)
    except OSError as exc:
        raise os_error(exc, "open", sandbox_path) from None
    info = os.fstat(fd)
    if stat.S_ISREG(info.st_mode):
        os.set_blocking(fd, True)
        return sandbox_path, fd, info.st_size
    os.close(fd)
    what = "is a directory, not a file" if stat.S_ISDIR(info.st_mode) else "is not a regular file"
    raise _UploadError(400, f"download {sandbox_path}: {what}")


async def _read_fd(fd: int, size: int) -> AsyncIterator[bytes]:
    """The first `size` bytes of the file (what Content-Length promised, even if it grows meanwhile)."""
    owned = OwnedFd(fd)
    try:
        while size > 0 and (chunk := await owned.use(asyncio.to_thread, os.read, min(DOWNLOAD_CHUNK, size))):
            size -= len(chunk)
            yield chunk
    finally:
        owned.close()


async def download(request: Request, path: str, paths: SandboxPaths, tree: SandboxTree) -> Response:
    """The raw bytes of one file. The SDKs strip the leading slash, so `a.txt` is `/a.txt` first and, if that
    does not exist, `/home/user/a.txt` (where an upload of the relative path `a.txt` put it)."""
    query_path = request.query_params.get("path")
    if query_path:
        candidates = [query_path]
    elif path.startswith("/"):
        candidates = [path]
    else:
        candidates = ["/" + path, path] if path else ["/"]
    try:
        _, fd, size = await tree.run(_open_for_download, candidates, paths, tree)
    except ConnectError as exc:
        return _connect_error_response(exc)
    except _UploadError as exc:
        return error_response(exc.status, exc.message)
    return StreamingResponse(
        _read_fd(fd, size), media_type="application/octet-stream", headers={"Content-Length": str(size)}
    )
