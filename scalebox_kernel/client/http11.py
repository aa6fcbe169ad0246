"""The client's own HTTP/1.1 connections: an httpx transport on asyncio, for direct (non-proxied) connections.

httpx's default transport (httpcore on anyio) costs more CPU per request than the rest of a trivial `run_code`,
and the official SDK's blocking urllib3 far less. This transport keeps h11 for HTTP/1.1 itself (the messages,
their framing and the keep-alive rules, RFC 9112) and drops the layers between it and asyncio: one
`asyncio.Protocol` per connection, its received bytes fed to h11 as the caller reads, one timer per wait, and the
request's head and a small body in one write. httpx still builds the requests and reads the responses. A
connection whose response was not read to its end is dropped, which the agent takes as an interrupt.
"""

from __future__ import annotations

import asyncio
import contextlib
import select
import ssl
import time
from collections.abc import AsyncIterator, Iterator

import h11
import httpx

#: The most a response head may take, received bytes a connection holds before it stops reading, and buffered
#: request bytes that trigger a write.
MAX_HEAD = 100 * 1024
MAX_BUFFERED = 256 * 1024
WRITE_BATCH = 64 * 1024
#: Idle connections kept per origin, and for how long: below uvicorn's 5 s keep-alive, so the server never closes
#: one under a request we are sending.
MAX_IDLE = 20
KEEPALIVE_EXPIRY = 4.0

Origin = tuple[str, str, int]


class ProtocolError(Exception):
    """The server's bytes are not an HTTP/1.1 response this client can read."""


def _timeout(request: httpx.Request, phase: str) -> float | None:
    value = request.extensions.get("timeout", {}).get(phase)
    return float(value) if value is not None else None


class _Connection(asyncio.Protocol):
    """One HTTP/1.1 connection: received bytes in a buffer (reading paused while too many wait), handed to h11
    when the caller needs the next event."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.idle_since = 0.0
        self.h11 = h11.Connection(h11.CLIENT, max_incomplete_event_size=MAX_HEAD)
        self._buffer = bytearray()
        self._reading_paused = False
        self._closed = False  # the server closed (or the connection broke): no more bytes will come
        self._eof_fed = False
        self._received = 0  # bytes of the current response given to h11
        self._lost: Exception | None = None
        self._writing_paused = False
        self._waiter: asyncio.Future[None] | None = None  # wakes the reader (bytes, EOF) or the writer (room)

    # ---- asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        if len(self._buffer) > MAX_BUFFERED and not self._reading_paused and self.transport is not None:
            self._reading_paused = True
            self.transport.pause_reading()
        self._wake()

    def eof_received(self) -> bool:
        self._closed = True
        self._wake()
        return False  # the transport closes itself

    def connection_lost(self, exc: Exception | None) -> None:
        self._closed = True
        self._lost = exc
        self._wake()

    def pause_writing(self) -> None:
        self._writing_paused = True

    def resume_writing(self) -> None:
        self._writing_paused = False
        self._wake()

    def _wake(self) -> None:
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def _wait(self, timeout: float | None) -> None:
        """Until the protocol wakes us, or `timeout` s pass (TimeoutError): one timer, no task."""
        loop = asyncio.get_running_loop()
        waiter = self._waiter = loop.create_future()
        timer = loop.call_later(timeout, _expire, waiter) if timeout is not None else None
        try:
            await waiter
        finally:
            if timer is not None:
                timer.cancel()

    # ---- the connection

    def usable(self) -> bool:
        """Ready for a request: idle in h11's terms, not closed or written to by the server while idle (even if
        the loop has not seen it yet: the socket itself is asked), and not idle too long."""
        if (
            self._closed
            or self._buffer
            or self.h11.our_state is not h11.IDLE
            or self.transport is None
            or self.transport.is_closing()
            or time.monotonic() - self.idle_since >= KEEPALIVE_EXPIRY
        ):
            return False
        sock = self.transport.get_extra_info("socket")
        if sock is None:
            return True
        poller = select.poll()
        poller.register(sock.fileno(), select.POLLIN)
        return not poller.poll(0)  # readable while idle: the server closed it, or sent what it should not have

    def close(self) -> None:
        """Drop the connection at once (no TLS close_notify exchange to wait for)."""
        if self.transport is not None:
            self.transport.abort()

    async def send(self, request: httpx.Request) -> None:
        """The request's head and body, batched into as few writes as the body allows. h11 frames the body as
        the request's headers say (a length, or chunked) and refuses a header that would split the message."""
        timeout = _timeout(request, "write")
        head = h11.Request(method=request.method, target=request.url.raw_path, headers=request.headers.raw)
        pending: list[bytes] = [self._frame(head)]
        size = 0
        assert isinstance(request.stream, httpx.AsyncByteStream)
        async for chunk in request.stream:
            if chunk:
                pending.append(self._frame(h11.Data(data=chunk)))
                size += len(chunk)
                if size >= WRITE_BATCH:
                    await self._write(pending, timeout)
                    pending, size = [], 0
        pending.append(self._frame(h11.EndOfMessage()))
        await self._write(pending, timeout)

    def _frame(self, event: h11.Event) -> bytes:
        data = self.h11.send(event)
        assert data is not None  # only ConnectionClosed gives None
        return data

    async def _write(self, parts: list[bytes], timeout: float | None) -> None:
        if self._closed or self.transport is None or self.transport.is_closing():
            raise ConnectionResetError("the server closed the connection")
        self.transport.write(b"".join(parts))
        while self._writing_paused and not self._closed:  # the socket did not take it all: wait for room
            await self._wait(timeout)

    async def _event(self, timeout: float | None) -> h11.Event:
        """h11's next event of the response, fed from the buffer (waiting for bytes as needed)."""
        while True:
            state = self.h11.their_state
            try:
                event = self.h11.next_event()
            except h11.RemoteProtocolError as exc:
                if self._eof_fed and state is h11.SEND_RESPONSE:  # closed before a whole head
                    if not self._received:
                        raise ProtocolError("Server disconnected without sending a response.") from exc
                    raise ProtocolError("peer closed connection in the middle of the response head") from exc
                raise ProtocolError(str(exc)) from exc
            if event is not h11.NEED_DATA:
                assert isinstance(event, h11.Event)
                return event
            if not self._buffer and not self._closed:
                if self._reading_paused and self.transport is not None:
                    self._reading_paused = False
                    self.transport.resume_reading()
                await self._wait(timeout)
            if self._buffer:
                data = bytes(self._buffer)
                self._buffer.clear()
                self._received += len(data)
                self.h11.receive_data(data)
            elif self._closed:
                if self._lost is not None:
                    raise self._lost
                if self._eof_fed:  # h11 still needs data after the end: it raises on the next call
                    raise ProtocolError("peer closed connection without sending a complete response")
                self._eof_fed = True
                self.h11.receive_data(b"")

    async def response_head(self, timeout: float | None) -> h11.Response:
        """The response's status line and headers (informational responses skipped)."""
        while True:
            event = await self._event(timeout)
            if isinstance(event, h11.InformationalResponse):
                if event.status_code == 101:
                    raise ProtocolError("the server switched protocols, which this client does not do")
                continue
            if isinstance(event, h11.Response):
                return event
            if isinstance(event, h11.ConnectionClosed):
                raise ProtocolError("Server disconnected without sending a response.")
            raise ProtocolError(f"unexpected {type(event).__name__} before the response head")

    async def body(self, timeout: float | None) -> AsyncIterator[bytes]:
        """The body's bytes as they arrive (chunk framing removed, trailers left out)."""
        while True:
            event = await self._event(timeout)
            if isinstance(event, h11.Data):
                yield bytes(event.data)
            elif isinstance(event, h11.EndOfMessage):
                return
            else:
                raise ProtocolError(f"unexpected {type(event).__name__} in the response body")

    def reuse(self) -> bool:
        """After the whole exchange: ready the connection for the next one, or False if it cannot carry one."""
        if self._closed or self._buffer or self.h11.our_state is not h11.DONE or self.h11.their_state is not h11.DONE:
            return False
        self.h11.start_next_cycle()
        self._received = 0
        return True


class _Body(httpx.AsyncByteStream):
    """A response body read off its connection; the connection goes back to the pool once the body ended."""

    def __init__(self, pool: Http11Transport, origin: Origin, connection: _Connection, request: httpx.Request):
        self._pool = pool
        self._origin = origin
        self._connection: _Connection | None = connection
        self._request = request

    async def __aiter__(self) -> AsyncIterator[bytes]:
        connection = self._connection
        if connection is None:
            raise httpx.StreamClosed()
        with _mapped(self._request, httpx.ReadTimeout, httpx.ReadError):
            async for data in connection.body(_timeout(self._request, "read")):
                yield data
        self._release()

    def _release(self) -> None:
        connection, self._connection = self._connection, None
        if connection is None:
            return
        if connection.reuse():
            self._pool.put(self._origin, connection)
        else:
            connection.close()

    async def aclose(self) -> None:
        connection, self._connection = self._connection, None
        if connection is not None:  # closed before its end: the connection cannot carry another request
            connection.close()


class Http11Transport(httpx.AsyncBaseTransport):
    """Direct HTTP/1.1 (and HTTPS) connections for an httpx.AsyncClient, reused while they stay idle."""

    def __init__(self, ssl_context: ssl.SSLContext) -> None:
        self._ssl = ssl_context
        self._idle: dict[Origin, list[_Connection]] = {}
        self._closed = False

    def put(self, origin: Origin, connection: _Connection) -> None:
        idle = self._idle.setdefault(origin, [])
        if self._closed or len(idle) >= MAX_IDLE:  # a response read to its end after aclose() is not kept
            connection.close()
            return
        connection.idle_since = time.monotonic()
        idle.append(connection)

    def _idle_connection(self, origin: Origin) -> _Connection | None:
        idle = self._idle.get(origin)
        while idle:
            connection = idle.pop()
            if connection.usable():
                return connection
            connection.close()
        return None

    async def _connect(self, origin: Origin, request: httpx.Request) -> _Connection:
        scheme, host, port = origin
        tls = self._ssl if scheme == "https" else None
        loop = asyncio.get_running_loop()
        with _mapped(request, httpx.ConnectTimeout, httpx.ConnectError):
            async with asyncio.timeout(_timeout(request, "connect")):
                _, connection = await loop.create_connection(
                    _Connection, host, port, ssl=tls, server_hostname=host if tls else None
                )
        return connection

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        url = request.url
        if self._closed:
            raise RuntimeError("Cannot send a request, as the client has been closed.")  # httpx's own words
        if url.scheme not in ("http", "https"):
            raise httpx.UnsupportedProtocol(f"Unsupported URL scheme {url.scheme!r}", request=request)
        origin = (url.scheme, url.raw_host.decode("ascii"), url.port or (443 if url.scheme == "https" else 80))
        connection = self._idle_connection(origin) or await self._connect(origin, request)
        try:
            # A failed write may mean the server answered early (say 413) and closed: read what it said.
            with contextlib.suppress(httpx.WriteError), _mapped(request, httpx.WriteTimeout, httpx.WriteError):
                await connection.send(request)
            with _mapped(request, httpx.ReadTimeout, httpx.ReadError):
                head = await connection.response_head(_timeout(request, "read"))
        except BaseException:
            connection.close()
            raise
        return httpx.Response(
            head.status_code,
            headers=head.headers.raw_items(),
            stream=_Body(self, origin, connection, request),
            extensions={"http_version": b"HTTP/" + head.http_version, "reason_phrase": head.reason},
        )

    async def aclose(self) -> None:
        self._closed = True
        idle, self._idle = self._idle, {}
        for connections in idle.values():
            for connection in connections:
                if connection.transport is not None:
                    connection.transport.close()


def _expire(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_exception(TimeoutError())


@contextlib.contextmanager
def _mapped(
    request: httpx.Request, timeout: type[httpx.TransportError], failure: type[httpx.TransportError]
) -> Iterator[None]:
    """Socket, TLS and protocol failures as the httpx exceptions the rest of the client handles."""
    try:
        yield
    except TimeoutError as exc:
        raise timeout(str(exc) or "timed out", request=request) from exc
    except ProtocolError as exc:
        raise httpx.RemoteProtocolError(str(exc), request=request) from exc
    except h11.LocalProtocolError as exc:  # a request h11 will not write: a header that would split it, say
        raise httpx.LocalProtocolError(str(exc), request=request) from exc
    except (OSError, ssl.SSLError) as exc:
        raise failure(str(exc) or type(exc).__name__, request=request) from exc
