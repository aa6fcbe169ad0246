"""`AsyncFilesystem`: a sandbox's files through `/upload`, `/download/<path>` and the Filesystem service."""

from __future__ import annotations

import asyncio
import contextlib
import io
import time
from collections.abc import Callable
from typing import Any, Literal
from urllib.parse import quote, urlencode

import httpx

from ..errors import (
    AlreadyExists,
    InvalidArgument,
    NotFound,
    SandboxExpired,
    SandboxNotFound,
    SandboxPaused,
    ScaleboxError,
)
from ..protocol import pb
from ..protocol.signature import DEFAULT_USER, EXPIRATION, SIGNATURE, USERNAME, Operation, sign
from .callbacks import Callback, call_back
from .connect_client import ConnectClient
from .models import EntryInfo, FilesystemEvent, FileType
from .transport import error_body

#: On the file endpoints 502 means "sandbox not running", not a passing gateway hiccup: do not retry it.
FILE_RETRY_STATUSES = frozenset({503, 504})


def download_path(path: str) -> str:
    """`path` for the URL of `/download/<path>`, with `.` and `..` escaped so no HTTP layer resolves them."""
    segments = path.lstrip("/").split("/")
    return "/".join(seg.replace(".", "%2E") if seg in (".", "..") else quote(seg, safe="") for seg in segments)


def file_url(
    agent_url: str,
    path: str,
    operation: Operation,
    *,
    user: str = DEFAULT_USER,
    token: str | None = None,
    expires_in: int | None = None,
) -> str:
    """A URL that downloads (`read`: GET it) or uploads (`write`: POST a multipart `file` to it) one file with no
    headers (PROTOCOL.md 4): signed with the sandbox's access `token`, and valid for `expires_in` seconds when
    given. The signature covers the path as given, the operation, the user and the expiry."""
    if not isinstance(path, str) or not path:
        raise InvalidArgument("a file URL needs the file's path in the sandbox")
    if expires_in is not None and (isinstance(expires_in, bool) or not isinstance(expires_in, int) or expires_in <= 0):
        raise InvalidArgument(f"use_signature_expiration must be a positive number of seconds, not {expires_in!r}")
    query = {"path": path} if operation == "write" else {}
    url = agent_url + ("/upload" if operation == "write" else "/download/" + download_path(path))
    query[USERNAME] = user
    if token:
        expiration = int(time.time()) + expires_in if expires_in else None
        query[SIGNATURE] = sign(path, operation, user, token, expiration)
        if expiration is not None:
            query[EXPIRATION] = str(expiration)
    elif expires_in:
        raise InvalidArgument("this sandbox has no access token, so its file URLs cannot be signed or expire")
    return url + "?" + urlencode(query, quote_via=quote)


class WatchHandle:
    """A running watch of a directory; events go to the callback until `stop()`."""

    def __init__(self, task: asyncio.Task[None]) -> None:
        self._task = task

    @property
    def error(self) -> BaseException | None:
        """Why the watch ended early (the stream broke, or the callback raised), if it did."""
        if self._task.done() and not self._task.cancelled():
            return self._task.exception()
        return None

    async def stop(self) -> None:
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task


class AsyncFilesystem:
    """Read, write and manage files inside the sandbox (paths are the sandbox's own)."""

    def __init__(self, rpc: ConnectClient) -> None:
        self._rpc = rpc

    def _file_error(self, response: httpx.Response, what: str) -> ScaleboxError:
        transport = self._rpc.transport
        if response.status_code == 502:  # the agent's way of saying the sandbox is not running (PROTOCOL.md 4)
            _, message = error_body(response)
            lower = message.lower()
            cls: type[ScaleboxError] = SandboxNotFound
            if "paused" in lower:
                cls = SandboxPaused
            elif "expired" in lower:
                cls = SandboxExpired
            return transport.error(cls, f"{what}: {message} (HTTP 502)", status_code=502)
        if response.status_code == 403:  # a path the sandbox may not touch (outside it, say): not a key problem
            _, message = error_body(response)
            return transport.error(InvalidArgument, f"{what}: {message} (HTTP 403)", status_code=403)
        return transport.rest_error(response, what)  # a 404 here is the file, not the sandbox

    async def read(
        self, path: str, format: Literal["text", "bytes"] = "text", *, on_bytes: Callable[[int], None] | None = None
    ) -> str | bytes:
        """The content of a file, decoded as UTF-8 text or as raw bytes. `on_bytes` is told how many bytes came so
        far, as they come."""
        what = f"Reading {path}"
        url = self._rpc.base_url + "/download/" + download_path(path)
        if on_bytes is None:
            response = await self._rpc.transport.request("GET", url, what=what, headers=self._rpc.headers)
            if response.status_code >= 300:
                raise self._file_error(response, what)
            content = response.content
        else:
            async with self._rpc.transport.stream("GET", url, what=what, headers=self._rpc.headers) as response:
                if response.status_code >= 300:
                    await response.aread()
                    raise self._file_error(response, what)
                body = io.BytesIO()  # its getvalue() hands over its buffer: the file is held once, not twice
                try:
                    async for chunk in response.aiter_bytes():
                        body.write(chunk)
                        on_bytes(body.tell())
                except httpx.ReadTimeout:
                    raise self._rpc.transport.silence_error(what) from None
                except httpx.HTTPError as exc:  # the body broke off: a typed error, as for the request itself
                    raise self._rpc.transport.transport_error(exc, what) from None
                content = body.getvalue()
        return content if format == "bytes" else content.decode("utf-8", errors="replace")

    async def write(
        self, path: str, data: str | bytes, *, on_bytes: Callable[[int], None] | None = None
    ) -> EntryInfo | None:
        """Write a file (parent directories are created); returns its entry when the server says. `on_bytes` is
        told how many of its bytes went out so far, as they go (from the start again if the request is retried)."""
        what = f"Writing {path}"
        content = data.encode() if isinstance(data, str) else bytes(data)
        body: bytes | _Counted = _Counted(content, on_bytes) if on_bytes is not None else content
        response = await self._rpc.transport.request(
            "POST",
            self._rpc.base_url + "/upload",
            what=what,
            idempotent=True,
            retry_statuses=FILE_RETRY_STATUSES,
            headers=self._rpc.headers,
            data={"path": path},
            files={"file": (path, body, "application/octet-stream")},
        )
        if response.status_code >= 300:
            raise self._file_error(response, what)
        return _upload_entry(response, path)

    async def list(self, path: str, depth: int = 1) -> list[EntryInfo]:
        """The entries of a directory, `depth` levels down."""
        if depth < 1:
            raise InvalidArgument(f"depth must be at least 1, not {depth}")
        reply = await self._rpc.unary(
            "Filesystem/ListDir",
            pb.ListDirRequest(path=path, depth=depth),
            pb.ListDirResponse,
            what=f"Listing {path}",
            idempotent=True,
        )
        return [EntryInfo.from_pb(entry) for entry in reply.entries]

    async def get_info(self, path: str) -> EntryInfo:
        reply = await self._rpc.unary(
            "Filesystem/Stat", pb.StatRequest(path=path), pb.StatResponse, what=f"Stat {path}", idempotent=True
        )
        return EntryInfo.from_pb(reply.entry)

    async def exists(self, path: str) -> bool:
        try:
            await self.get_info(path)
        except SandboxNotFound:
            raise
        except NotFound:
            return False
        return True

    async def make_dir(self, path: str) -> bool:
        """Create a directory and its parents; False if it already existed."""
        try:
            await self._rpc.unary(
                "Filesystem/MakeDir", pb.MakeDirRequest(path=path), pb.MakeDirResponse, what=f"Creating {path}"
            )
        except AlreadyExists:
            return False
        except ScaleboxError as exc:
            if "already exists" in str(exc):
                return False
            raise
        return True

    async def move(self, source: str, destination: str) -> EntryInfo:
        reply = await self._rpc.unary(
            "Filesystem/Move",
            pb.MoveRequest(source=source, destination=destination),
            pb.MoveResponse,
            what=f"Moving {source} to {destination}",
        )
        return EntryInfo.from_pb(reply.entry)

    rename = move

    async def remove(self, path: str) -> None:
        """Remove a file or a directory with everything in it."""
        await self._rpc.unary(
            "Filesystem/Remove", pb.RemoveRequest(path=path), pb.RemoveResponse, what=f"Removing {path}"
        )

    async def watch_dir(self, path: str, on_event: Callback, *, recursive: bool = False) -> WatchHandle:
        """Call `on_event(FilesystemEvent)` for every change under `path` until the handle is stopped."""
        started: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        task = asyncio.create_task(self._watch(path, recursive, on_event, started))
        try:
            await started
        except BaseException:
            task.cancel()
            raise
        return WatchHandle(task)

    async def _watch(self, path: str, recursive: bool, on_event: Callback, started: asyncio.Future[None]) -> None:
        try:
            async with self._rpc.stream(
                "Filesystem/WatchDir",
                pb.WatchDirRequest(path=path, recursive=recursive),
                pb.WatchDirResponse,
                what=f"Watching {path}",
            ) as messages:
                async for message in messages:
                    kind = message.WhichOneof("event")
                    if kind == "start" and not started.done():
                        started.set_result(None)
                    elif kind == "filesystem":
                        await call_back(on_event, FilesystemEvent.from_pb(message.filesystem))
        except Exception as exc:
            if not started.done():
                started.set_exception(exc)
                return
            raise
        finally:
            if not started.done():
                started.cancel()


def _upload_entry(response: httpx.Response, path: str) -> EntryInfo | None:
    """The entry an upload answer describes, if it is JSON (one object or a list of one, maybe inside `data`)."""
    try:
        body: Any = response.json()
    except ValueError:
        return None
    body = _first(body)
    if isinstance(body, dict) and isinstance(body.get("data"), dict | list):
        body = _first(body["data"])
    if not isinstance(body, dict) or not (body.get("path") or body.get("name")):
        return None
    kind = str(body.get("type", "file")).lower()
    return EntryInfo(
        name=str(body.get("name") or path.rsplit("/", 1)[-1]),
        type=FileType.DIR if kind in ("dir", "directory") else FileType.FILE,
        path=str(body.get("path") or path),
        size=int(body.get("size") or 0),
    )


def _first(body: Any) -> Any:
    """The first item of a JSON list (None if empty); anything else as it is."""
    if isinstance(body, list):
        return body[0] if body else None
    return body


class _Counted(io.BytesIO):
    """An upload's content that says how far it has been read (httpx reads a file part in chunks as it sends)."""

    def __init__(self, content: bytes, on_bytes: Callable[[int], None]) -> None:
        super().__init__(content)
        self._on_bytes = on_bytes

    def read(self, size: int | None = -1, /) -> bytes:
        chunk = super().read(size)
        if chunk:
            self._on_bytes(self.tell())
        return chunk
