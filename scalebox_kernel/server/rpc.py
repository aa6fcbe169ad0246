"""The agent plane under /sbx/<id>/: Connect dispatch to the sandbox's agent (PROTOCOL.md 2.2 and 8.2), plus
/health, /upload and /download.

Codec by Content-Type and replies in kind with exact Content-Types; unary errors are JSON with the mapped HTTP
status; stream errors travel in the end-of-stream frame inside HTTP 200; nothing is ever compressed.
"""

from __future__ import annotations

import asyncio
import hmac
import inspect
import logging
from collections.abc import AsyncIterator
from typing import Any

from google.protobuf.message import Message
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from ..protocol import connect
from ..protocol.connect import Codec, ConnectError
from ..protocol.signature import SIGNATURE, Operation
from .agent import RPCS, CallInfo, SandboxAgent
from .agent.transfer import signature_problem, signed_path
from .bodies import BodyTooLarge, error_response, read_limited
from .sandboxes import SandboxError, SandboxManager, SandboxNotFound, SandboxPaused
from .scrub import scrub
from .settings import ServerSettings
from .validation import MAX_JSON_DEPTH, json_depth_exceeds, path_problem, request_problem

log = logging.getLogger("scalebox_kernel.server")

#: The Python SDK polls and stops file watchers without any headers (PROTOCOL.md 2.3).
LENIENT_METHODS = {"sandboxagent.Filesystem/GetWatcherEvents", "sandboxagent.Filesystem/RemoveWatcher"}
#: Bytes of encoded frames a stream holds between its handler and the socket (the handler's own buffer, e.g. a
#: cell's `StreamBuffer`, holds the rest); also the most that goes out in one write.
_QUEUE_BYTES = 1024 * 1024


def _public(error: ConnectError) -> ConnectError:
    """The error as a client may read it: no host path of the server in its message."""
    return ConnectError(error.code, scrub(error.message))


def _unary_error(error: ConnectError, status: int | None = None) -> Response:
    return JSONResponse(_public(error).to_dict(), status or error.http_status)


def _stream_error(codec: Codec, error: ConnectError) -> Response:
    return Response(connect.end_stream(_public(error)), media_type=codec.stream_content_type)


def _decode(codec: Codec, data: bytes, request_type: type[Message]) -> Any:
    """The request message; JSON nested deeper than any request needs is refused before it is parsed."""
    if codec is connect.JSON and json_depth_exceeds(data):
        raise ConnectError("invalid_argument", f"{request_type.__name__} nests deeper than {MAX_JSON_DEPTH} levels")
    return codec.decode(data, request_type)


class _RpcStream(StreamingResponse):
    """A streaming reply whose frames come from the handler running in its own task.

    The handler is decoupled from the response so that a client disconnect cancels it exactly once (a plain
    asyncio cancel it can react to, e.g. by interrupting a kernel), rather than under anyio's cancel scope,
    which would cancel every await of its clean-up too. At most `_QUEUE_BYTES` of frames wait here: a client
    that reads slowly holds the handler back, and frames that are ready together go out in one write. The ASGI
    messages are sent here (not by StreamingResponse, whose task group per call costs more than a trivial cell's
    other work): a small task waits for the client's disconnect, and the last frames end the body in the same
    message.
    """

    def __init__(self, frames: AsyncIterator[Message], codec: Codec, method: str, tasks: set[asyncio.Task[Any]]):
        self._queue: asyncio.Queue[tuple[bytes, bool]] = asyncio.Queue()
        self._queued = 0  # bytes in the queue
        self._space = asyncio.Event()
        self._gone = False  # the response is over (sent, or the client left)
        self._frames = frames
        self._codec = codec
        self._method = method
        self._tasks = tasks
        self._producer: asyncio.Task[None] | None = None
        super().__init__(self._body(), media_type=codec.stream_content_type)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        producer = self._producer = asyncio.create_task(self._produce(), name=f"rpc {self._method}")
        self._tasks.add(producer)
        producer.add_done_callback(self._tasks.discard)
        watcher = asyncio.create_task(self._watch(receive), name=f"rpc {self._method} disconnect")
        try:
            await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
            async for data, last in self._batches():
                await send({"type": "http.response.body", "body": data, "more_body": not last})
        finally:
            watcher.cancel()
            self._leave()

    async def _watch(self, receive: Receive) -> None:
        while (await receive())["type"] != "http.disconnect":
            pass
        self._leave()

    def _leave(self) -> None:
        """The response is over: release the handler's waits, and stop it if it still runs (interrupts a cell)."""
        if self._gone:
            return
        self._gone = True
        self._space.set()
        self._queue.put_nowait((b"", True))  # wakes the sender, which sends nothing more
        if self._producer is not None and not self._producer.done():
            self._producer.cancel()

    async def _put(self, frame: bytes, last: bool) -> None:
        while self._queued >= _QUEUE_BYTES and not self._gone:
            self._space.clear()
            await self._space.wait()
        if self._gone:  # even if the handler swallowed its cancellation (asyncio.wait_for can, before 3.12)
            raise asyncio.CancelledError
        self._queued += len(frame)
        self._queue.put_nowait((frame, last))

    async def _produce(self) -> None:
        error: ConnectError | None = None
        try:
            async for message in self._frames:
                await self._put(connect.envelope(self._codec.encode(message)), False)
        except ConnectError as exc:
            error = exc
        except Exception as exc:
            log.exception("%s failed", self._method)
            error = ConnectError("internal", f"{self._method} failed: {type(exc).__name__}: {exc}")
        finally:
            aclose = getattr(self._frames, "aclose", None)
            if aclose is not None:
                await aclose()
        await self._put(connect.end_stream(_public(error) if error is not None else None), True)

    async def _batches(self) -> AsyncIterator[tuple[bytes, bool]]:
        """The queued frames, those ready together joined, and whether they end the stream."""
        while True:
            frame, last = await self._queue.get()
            if self._gone:
                return
            frames, size = [frame], len(frame)
            while not last and not self._queue.empty() and size < _QUEUE_BYTES:
                frame, last = self._queue.get_nowait()
                frames.append(frame)
                size += len(frame)
            self._queued -= size
            self._space.set()
            yield (frames[0] if len(frames) == 1 else b"".join(frames)), last
            if last:
                return

    async def _body(self) -> AsyncIterator[bytes]:
        """StreamingResponse's body iterator, for anything that reads the response that way."""
        async for data, _ in self._batches():
            yield data


class AgentPlane:
    """Routes of one server for every sandbox: `/sbx/{sandbox_id}/...`."""

    def __init__(self, manager: SandboxManager, settings: ServerSettings) -> None:
        self.manager = manager
        self.settings = settings
        self._tasks: set[asyncio.Task[Any]] = set()

    def routes(self) -> list[Route]:
        return [
            Route("/sbx/{sandbox_id}/health", self.health, methods=["GET", "HEAD"]),
            Route("/sbx/{sandbox_id}/upload", self.upload, methods=["POST"]),
            Route("/sbx/{sandbox_id}/download/{path:path}", self.download, methods=["GET"]),
            Route("/sbx/{sandbox_id}/{service}/{method}", self.call, methods=["POST"]),
        ]

    # ---- authentication -------------------------------------------------------------------------------------------

    def _authorize(self, request: Request, lenient: bool = False) -> str:
        """The sandbox id, once its X-Access-Token checks out; raises SandboxError or ConnectError."""
        sandbox_id = request.path_params["sandbox_id"]
        self.manager.get(sandbox_id)  # unknown / expired first: there is no token to compare with
        token = self.manager.token_of(sandbox_id) or ""
        given = request.headers.get("x-access-token")
        if given is None and lenient:
            return sandbox_id
        if not given:
            raise ConnectError("unauthenticated", "missing X-Access-Token header (the sandbox's envd_access_token)")
        if not hmac.compare_digest(given.encode(), token.encode()):
            raise ConnectError("unauthenticated", f"invalid access token for sandbox {sandbox_id}")
        return sandbox_id

    # ---- plain HTTP endpoints -------------------------------------------------------------------------------------

    async def _file_endpoint_agent(
        self, request: Request, operation: Operation | None = None, path: str | None = None
    ) -> SandboxAgent | Response:
        """The agent for /health, /upload, /download, or the error response (502 = sandbox not running). An upload
        or download without X-Access-Token may instead be a signed URL for `operation` on `path`."""
        try:
            signed = SIGNATURE in request.query_params and "x-access-token" not in request.headers
            if operation is not None and signed:
                sandbox_id = request.path_params["sandbox_id"]
                self.manager.get(sandbox_id)
                if not path:
                    return error_response(400, "a signed upload URL must name the file in its ?path= parameter")
                token = self.manager.token_of(sandbox_id) or ""
                from_url = not request.query_params.get("path")
                problem = signature_problem(request.query_params, path, operation, token, from_url)
                if problem:
                    return error_response(*problem)
            else:
                sandbox_id = self._authorize(request)
            return self.manager.agent(sandbox_id)
        except ConnectError as exc:
            return error_response(exc.http_status, exc.message)
        except SandboxError as exc:
            return error_response(502, exc.message)

    async def health(self, request: Request) -> Response:
        agent = await self._file_endpoint_agent(request)
        return agent if isinstance(agent, Response) else Response(status_code=204)

    async def upload(self, request: Request) -> Response:
        agent = await self._file_endpoint_agent(request, "write", signed_path(request.query_params, None))
        return agent if isinstance(agent, Response) else await agent.upload(request)

    async def download(self, request: Request) -> Response:
        path = signed_path(request.query_params, request.path_params["path"])
        agent = await self._file_endpoint_agent(request, "read", path)
        if isinstance(agent, Response):
            return agent
        problem = path_problem(request.query_params.get("path") or request.path_params["path"])
        if problem:
            return error_response(400, f"download: {problem}")
        return await agent.download(request, request.path_params["path"])

    # ---- Connect --------------------------------------------------------------------------------------------------

    async def call(self, request: Request) -> Response:
        key = f"{request.path_params['service']}/{request.path_params['method']}"
        negotiated = connect.codec_for(request.headers.get("content-type"))
        if negotiated is None:
            content_type = request.headers.get("content-type", "")
            message = (
                f"unsupported Content-Type {content_type!r}; use application/proto, application/json, "
                "application/connect+proto or application/connect+json"
            )
            return JSONResponse({"code": "unimplemented", "message": message}, 415)
        codec, streaming = negotiated
        reply_error = (lambda e: _stream_error(codec, e)) if streaming else _unary_error
        try:
            sandbox_id = self._authorize(request, lenient=key in LENIENT_METHODS)
            rpc = RPCS.get(key)
            if rpc is None:
                raise ConnectError("unimplemented", f"{key} is not implemented by scalebox-local")
            if rpc.streaming != streaming:
                kind = "a server-streaming" if rpc.streaming else "a unary"
                wanted = codec.stream_content_type if rpc.streaming else codec.unary_content_type
                raise ConnectError("invalid_argument", f"{key} is {kind} RPC; send it with Content-Type {wanted}")
            agent = self.manager.agent(sandbox_id)
            message = await self._read_message(request, codec, rpc.request_type, streaming)
            problem = request_problem(message)
            if problem:
                raise ConnectError("invalid_argument", problem)
        except SandboxError as exc:
            code = exc.connect_code if isinstance(exc, SandboxNotFound | SandboxPaused) else "failed_precondition"
            return reply_error(ConnectError(code, exc.message))
        except BodyTooLarge as exc:
            error = ConnectError("resource_exhausted", str(exc))
            return _stream_error(codec, error) if streaming else _unary_error(error, 413)
        except ConnectError as exc:
            return reply_error(exc)
        except Exception as exc:  # a request no check foresaw: still a Connect error, and logged
            log.exception("%s: reading the request failed", key)
            return reply_error(ConnectError("internal", f"{key} failed: {type(exc).__name__}"))
        info = self._call_info(request, codec)
        if streaming:
            return _RpcStream(self._open_stream(rpc.handler, agent, message, info), codec, key, self._tasks)
        try:
            pending: Any = rpc.handler(agent, message, info)
            result: Message = await pending if inspect.isawaitable(pending) else pending
        except ConnectError as exc:
            return _unary_error(exc)
        except Exception as exc:
            log.exception("%s failed", key)
            return _unary_error(ConnectError("internal", f"{key} failed: {type(exc).__name__}: {exc}"))
        return Response(codec.encode(result), media_type=codec.unary_content_type)

    @staticmethod
    async def _open_stream(
        handler: Any, agent: SandboxAgent, message: Message, info: CallInfo
    ) -> AsyncIterator[Message]:
        """The handler's messages, whether it is an async generator or a coroutine returning one."""
        stream = handler(agent, message, info)
        if inspect.isawaitable(stream):
            stream = await stream
        try:
            async for item in stream:
                yield item
        finally:
            aclose = getattr(stream, "aclose", None)
            if aclose is not None:
                await aclose()

    async def _read_message(self, request: Request, codec: Codec, request_type: type[Message], streaming: bool) -> Any:
        limit = self.settings.max_request_bytes
        if not streaming:
            return _decode(codec, await read_limited(request, limit), request_type)
        body = await read_limited(request, limit + connect.PREFIX_SIZE)
        reader = connect.EnvelopeReader(max_message_bytes=limit)
        frames = list(reader.feed(body))
        if reader.pending:
            raise ConnectError("invalid_argument", f"truncated envelope: {reader.pending} bytes of a frame are missing")
        data = [payload for flags, payload in frames if not flags & connect.FLAG_END_STREAM]
        if len(data) != 1 or len(frames) != 1:
            raise ConnectError(
                "invalid_argument",
                f"a server-streaming request must be exactly one enveloped message, got {len(frames)} frames",
            )
        return _decode(codec, data[0], request_type)

    def _call_info(self, request: Request, codec: Codec) -> CallInfo:
        """Connect-Timeout-Ms is ignored on purpose: the SDKs send their request timeout there, and a long command
        must not be killed on it."""
        interval = self.settings.keepalive_interval
        ping = request.headers.get("keepalive-ping-interval", "")
        if ping.isascii() and ping.isdigit() and len(ping) <= 9 and int(ping) > 0:
            interval = min(interval, float(ping))
        return CallInfo(codec=codec, keepalive_interval=interval)
