"""The HTTP exchange and the WebSocket bridge between a client of scalebox-local and a server in a sandbox.

`ports.py` decides whether a request may reach a sandbox's port and opens the connection; here the request goes
over it. HTTP/1.1 runs through h11 on the sandbox's side, chunk by chunk each way, so a streamed response streams
and memory holds a chunk at a time; a WebSocket becomes two, frames passed both ways and the close code kept.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from dataclasses import dataclass

import h11
from starlette.responses import Response
from starlette.types import Receive, Scope, Send
from starlette.websockets import WebSocket
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus, InvalidURI

from .isolation.sandbox import SandboxIsolation
from .jupyter_api import ApiError
from .settings import ServerSettings

log = logging.getLogger("scalebox_kernel.server")

#: The cookie a `?token=` visit sets (HttpOnly, SameSite=Strict, its Path the port's prefix).
COOKIE = "scalebox-port-token"
CHUNK = 64 * 1024
MAX_HEAD_BYTES = 64 * 1024
#: The largest WebSocket message forwarded either way; a larger one closes the WebSocket with 1009 (too big). With
#: `WS_MAX_QUEUE` messages queued from the sandbox, a forwarded WebSocket holds a few of these at most, however
#: slowly its client reads.
WS_MAX_MESSAGE = 4 * 1024 * 1024
WS_MAX_QUEUE = 2
_RESPONSE_DROPPED = frozenset(b"connection keep-alive proxy-connection te trailer transfer-encoding upgrade".split())
#: Handshake headers the WebSocket client makes itself.
_WS_OWN = frozenset(
    b"host origin user-agent sec-websocket-key sec-websocket-version sec-websocket-extensions "
    b"sec-websocket-protocol".split()
)
_TOO_BIG = f"a message over {WS_MAX_MESSAGE // (1024 * 1024)} MiB, the limit of a forwarded WebSocket"
_SERVICE_WORKER_REFUSED = (
    "a service worker registered here would span every sandbox on this origin (the path form /sbx/<id>/port/<n>/ "
    "is one origin for all of them): open {where} at its own origin instead, get_url({port}, token=True)"
)
#: Close codes a WebSocket may send (1005, 1006 and 1015 only describe what happened).
_SENDABLE = frozenset(range(1000, 5000)) - {1004, 1005, 1006, 1015}


@dataclass
class PortTarget:
    """A request that checked out: where it goes, and how it looks to the sandbox's server."""

    sandbox_id: str
    port: int
    isolation: SandboxIsolation
    prefix: str  # the port's address as the client sees it, e.g. /sbx/S/port/N
    target: bytes  # the request target for the sandbox's server: path and query, the token removed
    headers: list[tuple[bytes, bytes]]  # what the sandbox's server gets, the token removed, Host included
    host: bytes
    cookie: bytes | None  # Set-Cookie for a `?token=` visit
    bare: bool  # the path form's prefix without a slash after it
    #: Whether the request came by the sandbox's own origin (`<n>-<id>.localhost`), not the shared path form
    #: `/sbx/<id>/port/<n>/...`: only then may the sandbox's server set what spans its whole origin (service
    #: workers, cookies of any Path or Domain).
    own_origin: bool = False

    @property
    def where(self) -> str:
        return f"port {self.port} of sandbox {self.sandbox_id}"


class Denied(Exception):
    """The sandbox's server refused a WebSocket with this HTTP answer, which goes back to the client."""

    def __init__(self, response: Response) -> None:
        super().__init__(response.status_code)
        self.response = response


class HttpExchange:
    """One HTTP request and its response between the client and the sandbox's server (h11 on the sandbox's side).
    Every wait for either side ends after `port_idle_timeout`."""

    def __init__(self, settings: ServerSettings, target: PortTarget, sock: socket.socket) -> None:
        self.target = target
        self.sock = sock
        self.idle = settings.port_idle_timeout
        self.loop = asyncio.get_running_loop()
        self.h11 = h11.Connection(h11.CLIENT, max_incomplete_event_size=MAX_HEAD_BYTES)
        self.client_left = False

    async def run(self, scope: Scope, receive: Receive, send: Send) -> None:
        if not self.target.own_origin and (b"service-worker", b"script") in scope["headers"]:
            await _fail(send, 403, _SERVICE_WORKER_REFUSED.format(where=self.target.where, port=self.target.port))
            return
        try:
            if not await self._send_request(scope, receive, send):
                return  # the client left
        except h11.LocalProtocolError as exc:  # what the client sent cannot go on as HTTP/1.1
            await _fail(send, 400, f"the request cannot be forwarded to {self.target.where}: {exc}")
            return
        watcher = asyncio.create_task(self._watch_client(receive))
        try:
            await self._relay_response(send)
        finally:
            watcher.cancel()

    async def _write(self, event: h11.Event) -> bool:
        """Send one h11 event to the sandbox's server; False once it stopped reading (it may still answer)."""
        data = self.h11.send(event)
        try:
            if data:
                await asyncio.wait_for(self.loop.sock_sendall(self.sock, data), self.idle)
        except (OSError, TimeoutError):
            return False
        return True

    async def _send_request(self, scope: Scope, receive: Receive, send: Send) -> bool:
        """The request line, headers and body (as it arrives); False when the client left or stalled meanwhile."""
        headers = list(self.target.headers)
        if any(name == b"transfer-encoding" for name, _ in scope["headers"]):
            # The body is framed by its chunks: a Content-Length beside them is not to be believed (nor sent on).
            headers = [(name, value) for name, value in headers if name != b"content-length"]
            headers.append((b"transfer-encoding", b"chunked"))
        request = h11.Request(method=scope["method"].encode(), target=self.target.target, headers=headers)
        writing = await self._write(request)
        while True:
            try:
                message = await asyncio.wait_for(receive(), self.idle)
            except TimeoutError:
                await _fail(send, 408, f"the request's body stalled for {self.idle:g} s")
                return False
            if message["type"] == "http.disconnect":
                return False
            body = message.get("body", b"")
            if writing and body:
                writing = await self._write(h11.Data(data=body))
            if not message.get("more_body", False):
                if writing:
                    await self._write(h11.EndOfMessage())
                return True

    async def _watch_client(self, receive: Receive) -> None:
        """Once the request is in: the client leaving ends the exchange (the sandbox's server sees its end)."""
        while (await receive())["type"] != "http.disconnect":
            pass
        self.client_left = True
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)

    async def _next(self) -> h11.Event | None:
        """The next event from the sandbox's server; None when it went silent for too long."""
        while True:
            event = self.h11.next_event()
            if isinstance(event, h11.Event):
                return event
            if event is not h11.NEED_DATA:  # PAUSED: nothing more can come on this connection
                return h11.ConnectionClosed()
            try:
                data = await asyncio.wait_for(self.loop.sock_recv(self.sock, CHUNK), self.idle)
            except TimeoutError:
                return None
            except OSError:
                data = b""
            self.h11.receive_data(data)

    async def _relay_response(self, send: Send) -> None:
        """The answer as it comes. One that breaks off is left incomplete, so the client sees it cut short."""
        where = self.target.where
        started = False
        while True:
            try:
                event = await self._next()
            except h11.RemoteProtocolError as exc:
                if self.client_left:  # we cut it: nobody to tell
                    return
                if not started:
                    await _fail(send, 502, f"{where} did not answer with HTTP/1.x ({exc})")
                else:
                    log.info("%s: its answer broke off: %s", where, exc)
                return
            if event is None:
                if not started:
                    await _fail(send, 504, f"{where} sent no answer within {self.idle:g} s")
                else:
                    log.info("%s: silent for %g s, its answer is cut", where, self.idle)
                return
            if isinstance(event, h11.InformationalResponse):
                continue
            if isinstance(event, h11.Response):
                headers = _downstream_headers(list(event.headers), self.target.prefix.encode(), self.target.own_origin)
                if self.target.cookie:
                    headers.append((b"set-cookie", self.target.cookie))
                await send({"type": "http.response.start", "status": event.status_code, "headers": headers})
                started = True
            elif isinstance(event, h11.Data):
                await send({"type": "http.response.body", "body": bytes(event.data), "more_body": True})
            elif isinstance(event, h11.EndOfMessage):
                await send({"type": "http.response.body", "body": b"", "more_body": False})
                return
            else:  # ConnectionClosed: nothing more comes
                if not started:
                    await _fail(send, 502, f"{where} closed the connection without answering")
                return


async def _fail(send: Send, status: int, message: str) -> None:
    reply = ApiError(status, message).response()
    await send({"type": "http.response.start", "status": status, "headers": reply.raw_headers})
    await send({"type": "http.response.body", "body": reply.body, "more_body": False})


async def open_websocket(
    websocket: WebSocket, target: PortTarget, sock: socket.socket, settings: ServerSettings
) -> ClientConnection:
    """The WebSocket to the sandbox's server over `sock`, with the client's subprotocols, origin and headers;
    Denied with its answer when it refuses, ApiError (502) when it is no WebSocket server at all."""
    headers = [(name.decode("latin-1"), value.decode("latin-1")) for name, value in target.headers]
    headers = [(name, value) for name, value in headers if name.encode() not in _WS_OWN]
    host = target.host.decode("latin-1") or f"127.0.0.1:{target.port}"
    try:
        return await connect(
            f"ws://{host}{target.target.decode('latin-1')}",
            sock=sock,
            origin=websocket.headers.get("origin"),  # type: ignore[arg-type]
            subprotocols=websocket.scope.get("subprotocols") or None,
            additional_headers=headers,
            user_agent_header=websocket.headers.get("user-agent"),
            compression=None,
            open_timeout=settings.port_connect_timeout,
            max_size=WS_MAX_MESSAGE,
            max_queue=WS_MAX_QUEUE,
            proxy=None,
        )
    except InvalidStatus as exc:
        answer = exc.response
        kept = [(k, v) for k, v in answer.headers.raw_items() if k.lower() in ("content-type", "www-authenticate")]
        raise Denied(Response(bytes(answer.body or b""), answer.status_code, headers=dict(kept))) from None
    except (InvalidURI, InvalidHandshake, OSError, TimeoutError) as exc:
        raise ApiError(502, f"no WebSocket on {target.where}: {type(exc).__name__}: {exc}") from None


async def bridge_websockets(websocket: WebSocket, upstream: ClientConnection) -> None:
    """Frames both ways until either side closes; the other side then hears the same close code. A message
    larger than `WS_MAX_MESSAGE`, either way, closes both with 1009."""

    async def from_client() -> None:
        while True:
            message = await websocket.receive()
            if message["type"] == "websocket.disconnect":
                code = message.get("code", 1000)
                await upstream.close(code if code in _SENDABLE else 1000, message.get("reason") or "")
                return
            data = message.get("bytes")
            if data is None:
                data = message.get("text")
            if data is None:
                continue
            if len(data) > WS_MAX_MESSAGE:  # a str's length in characters: its UTF-8 is no shorter
                with contextlib.suppress(Exception):
                    await websocket.close(1009, _TOO_BIG)
                await upstream.close(1009, _TOO_BIG)
                return
            await upstream.send(data)

    async def from_sandbox() -> None:
        too_big = False
        try:
            async for data in upstream:
                if isinstance(data, str):
                    await websocket.send_text(data)
                else:
                    await websocket.send_bytes(data)
        except ConnectionClosed as exc:  # 1009 sent: the sandbox's message was over the limit
            too_big = exc.sent is not None and exc.sent.code == 1009
        code = upstream.close_code
        reason = upstream.close_reason or ""
        if too_big:
            code, reason = 1009, _TOO_BIG
        elif code not in _SENDABLE:
            code, reason = 1001, "the sandbox's server went away"
        with contextlib.suppress(Exception):  # the client may have gone first
            await websocket.close(code, reason[:123])

    tasks = [asyncio.create_task(from_client()), asyncio.create_task(from_sandbox())]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        with contextlib.suppress(Exception):
            await asyncio.wait_for(upstream.close(), 2)
        with contextlib.suppress(Exception):
            await websocket.close(1001)


def connection_named(headers: list[tuple[bytes, bytes]]) -> set[bytes]:
    """Header names a `Connection:` header lists (hop-by-hop by declaration)."""
    return {part.strip().lower() for name, value in headers if name == b"connection" for part in value.split(b",")}


def is_our_cookie(cookie: bytes) -> bool:
    """Whether `name=value` is the port cookie of scalebox-local."""
    return cookie.partition(b"=")[0].strip() == COOKIE.encode()


def _downstream_headers(
    headers: list[tuple[bytes, bytes]], prefix: bytes, own_origin: bool = False
) -> list[tuple[bytes, bytes]]:
    """The sandbox server's response headers for the client: no hop-by-hop ones, no cookie of ours, no
    Content-Length beside a Transfer-Encoding (the body comes dechunked, and is framed anew), and a Location that
    is an absolute path put under the port's prefix (`python -m http.server` redirects so).

    On the shared origin of the path form (not `own_origin`), nothing may reach beyond the port's prefix: no
    Service-Worker-Allowed, and each Set-Cookie kept under the prefix (`_confined_cookie`)."""
    named = connection_named(headers)
    chunked = any(name == b"transfer-encoding" for name, _ in headers)
    kept = []
    for name, value in headers:
        if name in _RESPONSE_DROPPED or name in named or (chunked and name == b"content-length"):
            continue
        if name == b"set-cookie" and is_our_cookie(value.split(b";", 1)[0]):
            continue
        if not own_origin:
            if name == b"service-worker-allowed":
                continue
            if name == b"set-cookie":
                value = _confined_cookie(value, prefix)
        absolute_path = value.startswith(b"/") and not value.startswith(b"//")
        if name == b"location" and absolute_path and value != prefix and not value.startswith(prefix + b"/"):
            value = prefix + value
        kept.append((name, value))
    return kept


def _confined_cookie(cookie: bytes, prefix: bytes) -> bytes:
    """A Set-Cookie of the sandbox's server that stays under the port's prefix: no Domain, and a Path under the
    prefix (the cookie's own absolute Path put under it, as the app sees its paths; else the prefix itself)."""
    name_value, *attributes = cookie.split(b";")
    kept = [name_value]
    path = b""
    for attribute in attributes:
        key, _, value = attribute.strip().partition(b"=")
        key = key.strip().lower()
        if key == b"domain":
            continue
        if key == b"path":
            path = value.strip()
            continue
        kept.append(attribute)
    if not path.startswith(b"/"):
        path = prefix  # none (or not a path, which browsers ignore): the prefix, not the directory of the request
    elif path != prefix and not path.startswith(prefix + b"/"):
        path = prefix if path == b"/" else prefix + path
    kept.append(b" Path=" + path)
    return b";".join(kept)
