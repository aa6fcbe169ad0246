"""A sandbox's Jupyter endpoint (PROTOCOL.md 11): the kernels REST API and a kernel's WebSocket channels.

On scalebox-local the endpoint lives under the sandbox's agent address (`<agent>/api/...`); on the Scalebox cloud
it is the sandbox's Jupyter port, addressed as the SDKs do (`https://32000-<sandbox_domain>`). `KernelChannel` keeps
one WebSocket to one kernel open: when it drops (a network blip, a restarted server) it is made again, with
backoff, under the same client session id, and the server replays what the kernel sent meanwhile.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
import ssl
from collections.abc import Callable
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

import websockets
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus

from ..errors import (
    AuthenticationError,
    NotFound,
    SandboxExpired,
    SandboxNotFound,
    SandboxPaused,
    ScaleboxError,
    ServerUnavailable,
)
from ..protocol import jupyter_ws
from ..protocol.jupyter_ws import WireMessage

if TYPE_CHECKING:
    from .transport import Transport

log = logging.getLogger(__name__)

JUPYTER_PORT = 32000
#: WebSocket close codes of the endpoint: the kernel (or its sandbox) is gone for good; another connection of the
#: same client session took over.
CLOSE_GONE = 4004
CLOSE_REPLACED = 4009
CLOSE_PAUSED = 4409
#: Seconds between reconnection attempts (the last one repeats until `reconnect_for` runs out).
BACKOFF = (0.1, 0.25, 0.5, 1.0, 2.0, 4.0)


def jupyter_url(agent_url: str, sandbox_domain: str) -> str:
    """The endpoint's base URL: the agent's own address when the domain carries a path (one server for many
    sandboxes, as scalebox-local), else the sandbox's Jupyter port as the SDKs name it."""
    domain = sandbox_domain.strip().rstrip("/").split("://", 1)[-1]
    if "/" in domain:
        return agent_url.rstrip("/")
    return f"https://{JUPYTER_PORT}-{domain}"


class ChannelGone(ScaleboxError):
    """The endpoint closed a kernel's channel for good: the kernel or its sandbox is gone (`reason` says which)."""

    def __init__(self, reason: str, *, sandbox_gone: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.sandbox_gone = sandbox_gone


class JupyterEndpoint:
    """The kernels REST API of one sandbox's Jupyter endpoint, and channels to its kernels."""

    def __init__(self, transport: Transport, base_url: str, token: str, sandbox_id: str) -> None:
        self.transport = transport
        self.base_url = base_url.rstrip("/")
        self._token = token
        self.sandbox_id = sandbox_id

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"token {self._token}"}

    async def _call(self, method: str, path: str, what: str, **kwargs: Any) -> Any:
        response = await self.transport.request(
            method, self.base_url + path, what=what, headers=self.headers, idempotent=method == "GET", **kwargs
        )
        if response.status_code >= 300:
            raise self._error(response.status_code, response, what)
        return response.json() if response.content else None

    def _error(self, status: int, response: Any, what: str) -> ScaleboxError:
        code = None
        with contextlib.suppress(Exception):
            code = response.json().get("code")
        if status == 404 and code == "kernel_not_found":
            return self.transport.error(NotFound, f"{what}: the kernel is gone", status_code=404, code=code)
        if status == 409 or code == "sandbox_paused":
            return self.transport.error(SandboxPaused, f"{what}: sandbox {self.sandbox_id} is paused", status_code=409)
        if status == 404 and code not in ("sandbox_not_found", "sandbox_expired"):  # not an endpoint of ours
            return self.transport.error(NotFound, f"{what}: no Jupyter endpoint here", status_code=404)
        return self.transport.rest_error(response, what, self.sandbox_id)

    async def available(self) -> bool:
        """Whether the back end serves a Jupyter endpoint for this sandbox (raises if the sandbox is gone)."""
        try:
            await self._call("GET", "/api", "Jupyter endpoint")
        except (SandboxNotFound, SandboxPaused, ScaleboxError) as exc:
            if isinstance(exc, SandboxNotFound | SandboxPaused) or getattr(exc, "status_code", None) not in (404, 405):
                raise
            return False
        return True

    async def kernel(self, kernel_id: str) -> dict[str, Any]:
        return dict(await self._call("GET", f"/api/kernels/{quote(kernel_id)}", "kernel info"))

    async def interrupt(self, kernel_id: str) -> None:
        await self._call("POST", f"/api/kernels/{quote(kernel_id)}/interrupt", "interrupt")

    async def restart(self, kernel_id: str) -> None:
        await self._call("POST", f"/api/kernels/{quote(kernel_id)}/restart", "restart")

    def channel(
        self,
        kernel_id: str,
        on_message: Callable[[WireMessage], None],
        on_event: Callable[[str, str], None],
        *,
        session_id: str | None = None,
        reconnect_for: float = 60.0,
    ) -> KernelChannel:
        url = self.base_url.replace("https://", "wss://", 1).replace("http://", "ws://", 1)
        session_id = session_id or secrets.token_hex(16)
        url = f"{url}/api/kernels/{quote(kernel_id)}/channels?session_id={session_id}"
        verify = self.transport.connection.verify
        context: ssl.SSLContext | None = None
        if url.startswith("wss://"):
            context = (
                ssl.create_default_context(cafile=verify) if isinstance(verify, str) else ssl.create_default_context()
            )
            if verify is False:
                context.check_hostname = False
                context.verify_mode = ssl.CERT_NONE
        return KernelChannel(
            url,
            self.headers,
            context,
            on_message=on_message,
            on_event=on_event,
            reconnect_for=reconnect_for,
            redact=self.transport.redact,
            loopback=self.transport.connection.is_loopback,
            idle=self.transport.connection.stream_idle_timeout,
            silence=lambda: str(self.transport.silence_error("the sandbox kernel's channel")),
        )


class KernelChannel:
    """One kernel's channels over one WebSocket (re-made when it drops). `on_message` gets every message the
    kernel sends; `on_event(kind, detail)` hears `dropped`, `reconnected` and `gone` (detail: why)."""

    def __init__(
        self,
        url: str,
        headers: dict[str, str],
        ssl_context: ssl.SSLContext | None,
        *,
        on_message: Callable[[WireMessage], None],
        on_event: Callable[[str, str], None],
        reconnect_for: float,
        redact: Callable[[str], str],
        loopback: bool,
        idle: float = 60.0,
        silence: Callable[[], str] | None = None,
    ) -> None:
        self.url = url
        self._headers = headers
        self._ssl = ssl_context
        self._on_message = on_message
        self._on_event = on_event
        self._reconnect_for = reconnect_for
        self._redact = redact
        self._loopback = loopback
        # Liveness: a ping every quarter of the idle timeout, and a server silent for all of it is given up on.
        self._idle = idle if idle > 0 else None
        self._silence = silence or (lambda: f"the server sent nothing for {idle:g} s")
        self._ws: ClientConnection | None = None
        self._subprotocol: str | None = None
        self._connected = asyncio.Event()
        self._reader: asyncio.Task[None] | None = None
        self.gone: str | None = None  # why the channel is over, once it is
        self.resumed = False  # the last connection found the session's kept messages (else they are lost)
        self.paused = False  # the channel ended because the sandbox was paused
        self.dropped = 0  # messages of the sandbox's that could not be handled
        self.notice: str | None = None  # the endpoint's word that the kernel lost its state, on the last connection
        self._closing = False

    async def _connect(self) -> ClientConnection:
        try:
            ws = await connect(
                self.url,
                additional_headers=self._headers,
                subprotocols=[websockets.Subprotocol(jupyter_ws.V1_SUBPROTOCOL)],
                max_size=None,  # a kernel's message is bounded by the server (MAX_MESSAGE), not here
                max_queue=64,
                compression=None,
                ssl=self._ssl,
                open_timeout=15,
                ping_interval=min(self._idle / 4, 20.0) if self._idle else 20.0,
                ping_timeout=self._idle,
                close_timeout=1.0,  # a silent server will not answer the close either
                proxy=None if self._loopback else True,
            )
        except InvalidStatus as exc:
            raise self._refused(exc) from None
        except (OSError, InvalidHandshake, TimeoutError) as exc:
            raise ServerUnavailable(self._redact(f"cannot reach the sandbox's Jupyter endpoint: {exc}")) from None
        self._subprotocol = ws.subprotocol
        headers = ws.response.headers if ws.response is not None else {}
        self.resumed = headers.get("x-scalebox-session") == "resumed"
        self.notice = headers.get("x-scalebox-notice") or None
        return ws

    def _refused(self, exc: InvalidStatus) -> ScaleboxError:
        status = exc.response.status_code
        code, message = None, ""
        with contextlib.suppress(Exception):
            body = json.loads(exc.response.body or b"{}")
            code, message = body.get("code"), str(body.get("message") or "")
        message = self._redact(message or f"HTTP {status}")
        if code == "sandbox_expired":
            return SandboxExpired(message)
        if code == "sandbox_not_found":
            return SandboxNotFound(message)
        if code == "sandbox_paused" or status == 409:
            return SandboxPaused(message)
        if status == 404:
            return NotFound(message)
        if status in (401, 403):
            return AuthenticationError(message)
        return ServerUnavailable(message)

    async def open(self) -> None:
        self._ws = await self._connect()
        self._connected.set()
        self._reader = asyncio.create_task(self._read(), name="scalebox channel reader")
        self._reader.add_done_callback(self._reader_done)

    def _reader_done(self, task: asyncio.Task[None]) -> None:
        """However the reader ended, the channel is over unless it was closed: what waits on it must hear so."""
        if self.gone is None and not self._closing:
            error = None if task.cancelled() else task.exception()
            log.warning("the channel to the sandbox kernel stopped: %r", error)
            self._end(f"the connection to the sandbox kernel failed ({type(error).__name__ if error else 'stopped'})")

    async def send(self, message: WireMessage) -> None:
        """Send now, or (while reconnecting) once the channel is back; ChannelGone if it will not be."""
        while True:
            if self.gone is not None:
                raise ChannelGone(self.gone)
            ws = self._ws
            if ws is None:
                await self._connected.wait()
                continue
            try:
                await ws.send(jupyter_ws.encode(message, self._subprotocol))
                return
            except ConnectionClosed:  # not sent: the reader is reconnecting, send it again on the new one
                self._connected.clear()
                if self._ws is ws:
                    self._ws = None
                await asyncio.sleep(0)

    async def _read(self) -> None:
        while self.gone is None:
            ws = self._ws
            if ws is None:
                return
            closed: ConnectionClosed | None = None
            try:
                async for frame in ws:
                    try:
                        message = jupyter_ws.decode(frame, self._subprotocol, from_client=False)
                    except jupyter_ws.FramingError as exc:
                        log.warning("dropped a message from the sandbox kernel: %s", exc)
                        continue
                    try:
                        self._on_message(message)
                    except Exception:  # the sandbox wrote it: it must not stop the channel
                        self.dropped += 1
                        log.warning("dropped a message from the sandbox kernel that could not be handled")
            except ConnectionClosed as exc:
                closed = exc
            if self._closing:
                return
            code, reason = ws.close_code, ws.close_reason or ""
            if code in (CLOSE_GONE, CLOSE_REPLACED):
                self._end(reason or "the kernel is gone", sandbox_gone="sandbox" in reason)
                return
            if code == CLOSE_PAUSED:  # its kernel is frozen: what waits fails, a new connection resumes it
                self.paused = True
                self._end(reason or "the sandbox was paused")
                return
            self._ws = None
            self._connected.clear()
            sent = (closed.sent if closed is not None else None) or ws.protocol.close_sent
            if sent is not None and "ping timeout" in sent.reason:  # silent, not closed: what waits fails now
                self._on_event("silent", self._silence())
            else:
                self._on_event("dropped", f"code {code}")
            if not await self._reconnect():
                return

    async def _reconnect(self) -> bool:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._reconnect_for
        attempt = 0
        last = "no attempt"
        while loop.time() < deadline and not self._closing:
            await asyncio.sleep(BACKOFF[min(attempt, len(BACKOFF) - 1)])
            attempt += 1
            try:
                self._ws = await self._connect()
            except (SandboxNotFound, SandboxPaused, NotFound) as exc:
                self._end(str(exc), sandbox_gone=not isinstance(exc, NotFound))
                return False
            except ScaleboxError as exc:
                last = str(exc)
                continue
            self._connected.set()
            self._on_event("reconnected", f"after {attempt} attempt{'s' if attempt > 1 else ''}")
            return True
        if not self._closing:
            self._end(f"the connection to the sandbox dropped and could not be made again ({last})")
        return False

    def _end(self, reason: str, *, sandbox_gone: bool = False) -> None:
        self.gone = reason
        self.sandbox_gone = sandbox_gone
        self._connected.set()  # senders wake up and see it
        self._on_event("gone", reason)

    sandbox_gone = False

    async def close(self) -> None:
        self._closing = True
        if self.gone is None:
            self.gone = "closed"
        self._connected.set()
        ws, self._ws = self._ws, None
        if ws is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(ws.close(), 5)
        reader, self._reader = self._reader, None
        if reader is not None and reader is not asyncio.current_task():
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await reader
