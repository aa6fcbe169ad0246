"""A sandbox's own TCP ports through scalebox-local's one port, HTTP and WebSocket, token required.

Three addresses reach port N of sandbox S:
- the path form `/sbx/S/port/N/<path>`, for plain clients (our client's `get_host(N)`);
- the SDKs' `getHost(N)` form (PROTOCOL.md 2.1): Host `N-<this server's host>` on `/sbx/S/<path>` (as
  `32000-<host>` already reaches the Jupyter endpoint, which that port stays);
- the origin form, for browsers (`get_url(N, token=True)`): Host `N-S.localhost:<server port>` on `/<path>`, the
  port's own browser origin (browsers resolve every `*.localhost` to loopback). Only there does a `?token=` visit
  set a cookie (by a redirect that drops the token from the URL): on the shared origin of the other two forms, a
  page of one sandbox could use a cookie of another's.

Here a request is checked: the sandbox's envd access token, as X-Access-Token, `Authorization: token`, `?token=`,
or the cookie a `?token=` visit sets, before anything reaches into the sandbox. It then gets its own connection
to 127.0.0.1:N inside the sandbox's network namespace (`SandboxIsolation.connect_port`), within the sandbox's
limit of open ones, and goes over it as `port_proxy` does. The token is removed wherever it came; the rest
reaches the sandbox's server as sent, with X-Forwarded-Host, -Proto and -Prefix beside it.
"""

from __future__ import annotations

import contextlib
import hmac
import re
import socket
from collections.abc import Awaitable, Callable, Iterator
from urllib.parse import quote, unquote_to_bytes

from starlette.datastructures import Headers
from starlette.requests import HTTPConnection, Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route, WebSocketRoute
from starlette.types import ASGIApp, Receive, Scope, Send
from starlette.websockets import WebSocket

from .bodies import authorization_token
from .isolation import JailError
from .jupyter_api import ApiError
from .port_proxy import (
    COOKIE,
    Denied,
    HttpExchange,
    PortTarget,
    bridge_websockets,
    connection_named,
    is_our_cookie,
    open_websocket,
)
from .sandboxes import SandboxError, SandboxExpired, SandboxManager, SandboxNotFound, SandboxPaused
from .settings import ServerSettings

#: What the Jupyter endpoint takes too: `Authorization: token <t>` or `Bearer <t>`.
TOKEN_SCHEMES = ("token", "bearer")
#: `32000-<host>` is the sandbox's Jupyter endpoint, served by scalebox-local itself (jupyter_api).
JUPYTER_PORT = 32000
#: Keys of the scope, set by `HostForm`: the prefix the client addresses the port by, and whether the request came
#: by the port's own origin.
PREFIX_KEY = "scalebox.port_prefix"
ORIGIN_KEY = "scalebox.port_origin"
#: Request headers that never travel on (hop-by-hop, or ours).
_DROPPED = frozenset(
    b"connection keep-alive proxy-connection proxy-authorization te trailer transfer-encoding upgrade expect host "
    b"x-access-token x-forwarded-host x-forwarded-proto x-forwarded-prefix".split()
)
_HOST_FORM = re.compile(rb"([1-9][0-9]{0,4})-(.+)", re.DOTALL)
_ORIGIN_FORM = re.compile(rb"([1-9][0-9]{0,4})-(sbx-[0-9a-f]{1,32})\.localhost(?::[0-9]{1,5})?")
_LOOPBACK_NAMES = frozenset({"127.0.0.1", "localhost", "[::1]"})
_SANDBOX_PATH = re.compile(r"/sbx/([^/]+)(/.*)?", re.DOTALL)


class HostForm:
    """ASGI middleware: a request by the Host form or the origin form is rewritten to the path form
    `/sbx/S/port/N/<path>` before routing. The Host form is `N-<host>` on `/sbx/S/<path>`, where `<host>` is this
    server's (`public_host`, or a loopback name on its port); its Host becomes `<host>`. Port 32000 is left alone.
    The origin form is Host `N-S.localhost[:port]` on any path; its Host stays."""

    def __init__(self, app: ASGIApp, public_host: str) -> None:
        self.app = app
        self.public_host = public_host.lower()
        _, colon, port = self.public_host.rpartition(":")
        self.public_port = port if colon and port.isdigit() else ""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] in ("http", "websocket"):
            scope = _origin_form(scope) or self._host_form(scope) or scope
        await self.app(scope, receive, send)

    def _ours(self, host: bytes) -> bool:
        """Whether `host` names this server (the Host form's `<host>`): `N-<anything>` would catch real host names
        such as `10-0-0-5.example`."""
        name = host.decode("latin-1").lower()
        if name == self.public_host:
            return True
        base, colon, port = name.rpartition(":")
        return bool(colon) and base in _LOOPBACK_NAMES and port == self.public_port

    def _host_form(self, scope: Scope) -> Scope | None:
        return _host_form(scope, self._ours)


def _origin_form(scope: Scope) -> Scope | None:
    host = next((value for name, value in scope["headers"] if name == b"host"), b"")
    named = _ORIGIN_FORM.fullmatch(host.lower())
    if named is None or int(named[1]) > 65535:
        return None
    inner = f"/sbx/{named[2].decode()}/port/{int(named[1])}"
    raw = scope.get("raw_path") or quote(scope["path"]).encode()
    return {
        **scope,
        "path": inner + scope["path"],
        "raw_path": inner.encode() + raw,
        PREFIX_KEY: "",
        ORIGIN_KEY: True,
    }


def _host_form(scope: Scope, ours: Callable[[bytes], bool]) -> Scope | None:
    host = next((value for name, value in scope["headers"] if name == b"host"), b"")
    named = _HOST_FORM.fullmatch(host)
    if named is None or int(named[1]) > 65535 or int(named[1]) == JUPYTER_PORT or not ours(named[2]):
        return None
    place = _SANDBOX_PATH.fullmatch(scope["path"])
    if place is None:
        return None
    prefix = f"/sbx/{place[1]}"
    inner = f"{prefix}/port/{int(named[1])}"
    raw = scope.get("raw_path") or quote(scope["path"]).encode()
    rest = b"/" + raw.split(b"/", 3)[3] if raw.count(b"/") >= 3 else b"/"
    headers = [(name, named[2] if name == b"host" else value) for name, value in scope["headers"]]
    return {
        **scope,
        "path": inner + (place[2] or "/"),
        "raw_path": inner.encode() + rest,
        "headers": headers,
        PREFIX_KEY: prefix,
    }


class PortForwarding:
    """The routes that reach sandboxes' ports, and the count of each sandbox's open forwarded connections."""

    def __init__(self, manager: SandboxManager, settings: ServerSettings) -> None:
        self.manager = manager
        self.settings = settings
        self._open: dict[str, int] = {}

    def routes(self) -> list[BaseRoute]:
        base = "/sbx/{sandbox_id}/port/{port:int}"
        return [
            Route(base, _AnyMethod(self.http)),
            Route(base + "/{path:path}", _AnyMethod(self.http)),
            WebSocketRoute(base, self.websocket),
            WebSocketRoute(base + "/{path:path}", self.websocket),
        ]

    # ---- auth and lookup ----------------------------------------------------------------------------------------

    def _resolve(self, connection: HTTPConnection) -> PortTarget:
        """The target of a request whose token is that sandbox's (ApiError otherwise): checked before anything
        reaches into the sandbox."""
        sandbox_id = connection.path_params["sandbox_id"]
        port = connection.path_params["port"]
        if not 1 <= port <= 65535:
            raise ApiError(400, f"port {port} is not a TCP port (1-65535)")
        presented = _presented(connection)
        if not presented:  # before the lookup: without a token, nobody learns which sandboxes exist
            raise ApiError(
                401,
                "missing token: send X-Access-Token: <the sandbox's envd_access_token> (or ?token= on the URL)",
            )
        try:
            self.manager.get(sandbox_id)
        except SandboxError as exc:
            raise ApiError(404, exc.message, _gone_code(exc)) from None
        token = self.manager.token_of(sandbox_id) or ""
        if not token or not any(hmac.compare_digest(given.encode(), token.encode()) for given in presented):
            raise ApiError(401, f"invalid token for sandbox {sandbox_id}")
        try:
            agent = self.manager.agent(sandbox_id)
        except SandboxPaused as exc:
            raise ApiError(409, exc.message, "sandbox_paused") from None
        except SandboxNotFound as exc:
            raise ApiError(404, exc.message, _gone_code(exc)) from None
        except SandboxError as exc:
            raise ApiError(503, exc.message) from None
        scope = connection.scope
        own_origin = bool(scope.get(ORIGIN_KEY))
        prefix = scope.get(PREFIX_KEY, f"/sbx/{sandbox_id}/port/{port}")
        raw = scope.get("raw_path") or quote(scope["path"]).encode()
        parts = raw.split(b"/", 5)  # '', sbx, id, port, N, rest
        path = b"/" + parts[5] if len(parts) > 5 else b"/"
        query, from_query = _without_token(scope.get("query_string", b""), token)
        host, headers = _upstream_headers(scope, token, prefix)
        cookie = None
        if from_query and own_origin:  # on the shared origin, a cookie would be every sandbox page's to use
            secure = "; Secure" if scope.get("scheme") in ("https", "wss") else ""
            cookie = f"{COOKIE}={token}; Path=/; HttpOnly; SameSite=Lax{secure}".encode()
        return PortTarget(
            sandbox_id=sandbox_id,
            port=port,
            isolation=agent.confinement,
            prefix=prefix,
            target=path + (b"?" + query if query else b""),
            headers=headers,
            host=host,
            cookie=cookie,
            bare=PREFIX_KEY not in scope and len(parts) <= 5,
            own_origin=own_origin,
        )

    async def _connect(self, target: PortTarget) -> socket.socket:
        """A connection to the target's port in its sandbox; ApiError when there is none (nothing listens, it takes
        too long, the sandbox stopped)."""
        timeout = self.settings.port_connect_timeout
        where = target.where
        try:
            return await target.isolation.connect_port(target.port, timeout)
        except ConnectionRefusedError:
            raise ApiError(
                502, f"nothing listens on {where}: start a server there on 127.0.0.1 or 0.0.0.0, port {target.port}"
            ) from None
        except TimeoutError:
            raise ApiError(504, f"{where} did not accept a connection within {timeout:g} s") from None
        except JailError as exc:
            raise ApiError(503, str(exc)) from None
        except OSError as exc:
            raise ApiError(502, f"cannot connect to {where}: {exc.strerror or exc}") from None

    @contextlib.contextmanager
    def _slot(self, sandbox_id: str) -> Iterator[None]:
        """One of the sandbox's `port_max_connections` forwarded connections, for as long as it lasts."""
        open_now = self._open.get(sandbox_id, 0)
        limit = self.settings.port_max_connections
        if open_now >= limit:
            raise ApiError(
                503, f"sandbox {sandbox_id} already has {limit} forwarded connections open (port_max_connections)"
            )
        self._open[sandbox_id] = open_now + 1
        try:
            yield
        finally:
            left = self._open.pop(sandbox_id) - 1
            if left:
                self._open[sandbox_id] = left

    # ---- HTTP -----------------------------------------------------------------------------------------------------

    async def http(self, request: Request) -> Response:
        try:
            target = self._resolve(request)
        except ApiError as exc:
            return exc.response()
        if target.cookie and request.method in ("GET", "HEAD"):  # the token goes into the cookie, out of the URL
            location = target.target.decode("latin-1")  # the same path and query, without the token
            response = Response(status_code=307, headers={"Location": location, "Cache-Control": "no-store"})
            response.raw_headers.append((b"set-cookie", target.cookie))
            return response
        if target.bare and request.method in ("GET", "HEAD"):  # relative links need the slash
            query = request.url.query
            location = f"{target.prefix}/?{query}" if query else f"{target.prefix}/"
            return Response(status_code=307, headers={"Location": location})
        return _Forward(self, target)

    async def forward(self, target: PortTarget, scope: Scope, receive: Receive, send: Send) -> None:
        """Send the request to the sandbox's port and its answer back as it comes."""
        try:
            with self._slot(target.sandbox_id):
                sock = await self._connect(target)
                try:
                    await HttpExchange(self.settings, target, sock).run(scope, receive, send)
                finally:
                    sock.close()
        except ApiError as exc:
            await exc.response()(scope, receive, send)

    # ---- WebSocket ------------------------------------------------------------------------------------------------

    async def websocket(self, websocket: WebSocket) -> None:
        try:
            target = self._resolve(websocket)
            with self._slot(target.sandbox_id):
                sock = await self._connect(target)
                try:
                    upstream = await open_websocket(websocket, target, sock, self.settings)
                    try:
                        await websocket.accept(
                            subprotocol=upstream.subprotocol,
                            headers=[(b"set-cookie", target.cookie)] if target.cookie else None,
                        )
                        await bridge_websockets(websocket, upstream)
                    finally:
                        upstream.transport.abort()  # at once, if the relay's goodbye did not close it
                finally:
                    sock.close()
        except ApiError as exc:
            await _deny(websocket, exc.response())
        except Denied as denied:
            await _deny(websocket, denied.response)


class _AnyMethod:
    """A route's ASGI endpoint that takes every method (Starlette gives a function endpoint GET alone)."""

    def __init__(self, handler: Callable[[Request], Awaitable[Response]]) -> None:
        self.handler = handler

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        response = await self.handler(Request(scope, receive, send))
        await response(scope, receive, send)


class _Forward(Response):
    """The response of a forwarded HTTP request: made while it is sent, by `PortForwarding.forward`."""

    def __init__(self, plane: PortForwarding, target: PortTarget) -> None:
        super().__init__()
        self._plane = plane
        self._target = target

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self._plane.forward(self._target, scope, receive, send)


async def _deny(websocket: WebSocket, response: Response) -> None:
    """Refuse a WebSocket before accepting it: with the HTTP answer where the server can send one."""
    if "websocket.http.response" in websocket.scope.get("extensions", {}):
        await websocket.send_denial_response(response)
    else:
        await websocket.close(1008)


# ---- headers, query and cookies ---------------------------------------------------------------------------------


def _presented(connection: HTTPConnection) -> list[str]:
    """Every token the request carries, wherever: any one of them may be the sandbox's."""
    found = [
        connection.headers.get("x-access-token"),
        authorization_token(connection.headers, TOKEN_SCHEMES),
        *connection.query_params.getlist("token"),
        connection.cookies.get(COOKIE),
    ]
    return [token for token in found if token]


def _without_token(query: bytes, token: str) -> tuple[bytes, bool]:
    """The query string without `token=<the sandbox's token>` (another `token` is the app's own), and whether it
    had one."""
    kept, found = [], False
    for item in query.split(b"&") if query else []:
        name, _, value = item.partition(b"=")
        if unquote_to_bytes(name.replace(b"+", b" ")) == b"token" and hmac.compare_digest(
            unquote_to_bytes(value.replace(b"+", b" ")), token.encode()
        ):
            found = True
            continue
        kept.append(item)
    return b"&".join(kept), found


def _upstream_headers(scope: Scope, token: str, prefix: str) -> tuple[bytes, list[tuple[bytes, bytes]]]:
    """(Host, the headers the sandbox's server gets): the client's, minus hop-by-hop ones and the token."""
    headers: list[tuple[bytes, bytes]] = scope["headers"]
    named = connection_named(headers)
    host = b""
    kept: list[tuple[bytes, bytes]] = []
    for name, value in headers:
        if name == b"host":
            host = value
        if name in _DROPPED or name in named:
            continue
        ours = (
            authorization_token(Headers({"authorization": value.decode("latin-1")}), TOKEN_SCHEMES) or None
            if name == b"authorization"
            else None
        )
        if ours is not None and hmac.compare_digest(ours.encode(), token.encode()):
            continue
        if name == b"referer" and token.encode() in value:  # the page's own URL, with ?token= in it
            continue
        if name == b"cookie":
            value = b"; ".join(c for c in (p.strip() for p in value.split(b";")) if c and not is_our_cookie(c))
            if not value:
                continue
        kept.append((name, value))
    scheme = b"https" if scope.get("scheme") in ("https", "wss") else b"http"
    kept.append((b"host", host or b"127.0.0.1"))
    kept += [(b"x-forwarded-host", host), (b"x-forwarded-proto", scheme), (b"x-forwarded-prefix", prefix.encode())]
    return host, [(name, value) for name, value in kept if value]


def _gone_code(exc: SandboxError) -> str:
    return "sandbox_expired" if isinstance(exc, SandboxExpired) else "sandbox_not_found"
