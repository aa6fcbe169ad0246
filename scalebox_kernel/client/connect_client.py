"""Connect RPCs to a sandbox agent over httpx: unary calls and server streams, in the proto or JSON codec.

Streams are read frame by frame as the bytes arrive, so callers see each event (a line of stdout, a result)
while the cell or command is still running. Closing a stream early drops the connection, which the agent
treats as an interrupt.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any, Generic, TypeVar

import httpx
from google.protobuf.message import Message

from ..errors import ScaleboxError, ServerUnavailable
from ..protocol.connect import (
    FLAG_END_STREAM,
    PROTO,
    Codec,
    ConnectError,
    EnvelopeReader,
    envelope,
    parse_end_stream,
)
from .transport import Transport, error_body

M = TypeVar("M", bound=Message)

PACKAGE = "sandboxagent"
#: After a stream's end-of-stream frame, how long and how many bytes the rest of the HTTP body may take.
_FINISH_TIMEOUT = 1.0
_FINISH_BYTES = 64 * 1024


class MessageStream(Generic[M]):
    """The decoded messages of one server stream; ends at the end-of-stream frame, raising its error if any."""

    def __init__(self, client: ConnectClient, response: httpx.Response, response_type: type[M], what: str) -> None:
        self._client = client
        self._response = response
        self._type = response_type
        self._what = what
        self._chunks = response.aiter_raw()
        self._reader = EnvelopeReader()
        self._pending: deque[M] = deque()
        self._done = False
        self._error: ScaleboxError | None = None  # raised once the messages before it were delivered

    def __aiter__(self) -> MessageStream[M]:
        return self

    async def __anext__(self) -> M:
        while not self._pending:
            if self._error is not None:
                error, self._error = self._error, None
                raise error
            if self._done:
                raise StopAsyncIteration
            await self._read_more()
        return self._pending.popleft()

    async def _read_more(self) -> None:
        transport = self._client.transport
        try:
            chunk = await self._chunks.__anext__()
        except StopAsyncIteration:
            self._done = True
            raise transport.error(
                ServerUnavailable,
                f"{self._what}: the stream ended without its end-of-stream frame (the server or a proxy cut it off).",
            ) from None
        except httpx.ReadTimeout:
            self._done = True
            raise transport.silence_error(self._what) from None
        except httpx.TransportError as exc:
            self._done = True
            raise transport.broken_stream_error(exc, self._what) from None
        except httpx.HTTPError as exc:
            self._done = True
            raise transport.transport_error(exc, self._what) from None
        try:
            for flags, payload in self._reader.feed(chunk):
                if flags & FLAG_END_STREAM:
                    self._done = True
                    error = parse_end_stream(payload)
                    if error is not None:
                        self._error = self._client.error(error, self._what)
                    await self._finish_body()
                    return
                self._pending.append(self._client.codec.decode(payload, self._type))
        except ConnectError as exc:  # our own reading failed: the bytes are not a Connect stream of this type
            self._done = True
            if exc.code == "resource_exhausted":
                message = f"{self._what}: the server sent more than this client accepts at once ({exc.message})."
            else:
                message = (
                    f"{self._what}: the server sent a malformed stream ({exc.message}); the server, or a proxy in "
                    "between, is not speaking the Connect protocol as it should."
                )
            self._error = transport.error(ScaleboxError, message)

    async def _finish_body(self) -> None:
        """Read the HTTP body's end after the end-of-stream frame: a response closed unread drops its connection,
        and the next call would pay a new TCP (and TLS) handshake. Bounded: a server that sends on, or never
        ends the body, just loses the connection."""
        extra = 0
        with contextlib.suppress(httpx.HTTPError, TimeoutError):
            async with asyncio.timeout(_FINISH_TIMEOUT):
                async for chunk in self._chunks:
                    extra += len(chunk)
                    if extra > _FINISH_BYTES:
                        break

    async def aclose(self) -> None:
        self._done = True
        await self._chunks.aclose()  # type: ignore[attr-defined]


class ConnectClient:
    """Calls `sandboxagent` services on one agent (`base_url` may carry a path prefix such as `/sbx/<id>`)."""

    def __init__(
        self,
        transport: Transport,
        base_url: str,
        headers: dict[str, str],
        *,
        codec: Codec = PROTO,
        sandbox_id: str | None = None,
    ) -> None:
        self.transport = transport
        self.base_url = base_url.rstrip("/")
        self.headers = headers
        self.codec = codec
        self.sandbox_id = sandbox_id

    def url(self, method: str) -> str:
        return f"{self.base_url}/{PACKAGE}.{method}"

    def error(self, err: ConnectError, what: str) -> ScaleboxError:
        return self.transport.connect_error(err, what, self.sandbox_id)

    def _headers(self, content_type: str) -> dict[str, str]:
        return {**self.headers, "Content-Type": content_type, "Connect-Protocol-Version": "1"}

    async def unary(
        self, method: str, request: Message, response_type: type[M], *, what: str, idempotent: bool = False
    ) -> M:
        """One request, one answer (`method` is `Service/Method`, e.g. `Filesystem/Stat`)."""
        headers = self._headers(self.codec.unary_content_type)
        timeout = self.transport.connection.request_timeout
        if timeout:
            headers["Connect-Timeout-Ms"] = str(int(timeout * 1000))
        response = await self.transport.request(
            "POST",
            self.url(method),
            what=what,
            idempotent=idempotent,
            content=self.codec.encode(request),
            headers=headers,
        )
        media = response.headers.get("content-type", "").split(";", 1)[0].strip()
        if response.status_code == 200 and media == self.codec.unary_content_type:
            try:
                return self.codec.decode(response.content, response_type)
            except ConnectError as exc:
                raise self.error(exc, what) from None
        raise self.error_answer(response, what)

    @asynccontextmanager
    async def stream(
        self, method: str, request: Message, response_type: type[M], *, what: str
    ) -> AsyncIterator[MessageStream[M]]:
        """A server stream. Silence longer than the connection's `stream_idle_timeout` (no frame, not even a
        keepalive) ends it with ServerUnavailable; the agent is asked for keepalives four times as often."""
        body = envelope(self.codec.encode(request))
        headers = self._headers(self.codec.stream_content_type)
        headers["Accept-Encoding"] = "identity"
        idle = self.transport.connection.stream_idle_timeout
        if idle:
            headers["Keepalive-Ping-Interval"] = str(max(1, int(idle / 4)))  # whole seconds, as the SDKs send it
        async with self.transport.stream(
            "POST", self.url(method), what=what, content=body, headers=headers
        ) as response:
            media = response.headers.get("content-type", "").split(";", 1)[0].strip()
            if response.status_code != 200 or media != self.codec.stream_content_type:
                await response.aread()
                raise self.error_answer(response, what)
            messages = MessageStream(self, response, response_type, what)
            try:
                yield messages
            finally:
                await messages.aclose()

    def error_answer(self, response: httpx.Response, what: str) -> ScaleboxError:
        """An answer that is not a success: a Connect error body, or a plain HTTP error from something else."""
        try:
            body: Any = response.json()
        except ValueError:
            body = None
        if isinstance(body, dict) and isinstance(body.get("code"), str) and response.status_code != 200:
            return self.error(ConnectError.from_dict(body, response.status_code), what)
        if response.status_code == 200:
            media = response.headers.get("content-type", "")
            return self.transport.error(
                ScaleboxError, f"{what}: unexpected content type {media!r} from the sandbox agent", status_code=200
            )
        if response.status_code in (502, 503, 504):
            _, message = error_body(response)
            return self.transport.error(
                ServerUnavailable,
                f"{what}: the sandbox agent is unavailable ({message}, HTTP {response.status_code}); "
                "the sandbox may be paused, stopped, or still starting.",
                status_code=response.status_code,
            )
        return self.transport.rest_error(response, what, self.sandbox_id)
