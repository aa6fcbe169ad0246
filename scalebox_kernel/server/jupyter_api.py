"""Each sandbox's Jupyter endpoint: the Jupyter Server kernels API (REST + WebSocket channels) over its contexts.

Under the sandbox's agent address (`/sbx/<id>/api/...`, whatever the Host: the SDKs' `32000-<host>` form of the
Jupyter port reaches it too), the kernels of this API are the sandbox's contexts:
one kernel, one state, whether `run_code` or a notebook reaches it. The WebSocket carries every message unchanged
both ways, in either framing (`protocol.jupyter_ws`), through `agent.channels`. Auth is that sandbox's access
token only: `Authorization: token <t>`, `X-Access-Token`, or `?token=` (browsers cannot set headers on a
WebSocket).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import inspect
import json
import logging
import secrets
from datetime import UTC, datetime
from typing import Any

from starlette.requests import HTTPConnection, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route, WebSocketRoute
from starlette.websockets import WebSocket, WebSocketDisconnect

from ..protocol import jupyter_ws
from ..protocol.connect import ConnectError
from .agent import SandboxAgent
from .agent.channels import CLOSE_GONE, CLOSE_PAUSED, CLOSE_REPLACED, PAUSED_PREFIX, ClientSession, Closed
from .agent.execution import CodeContext
from .bodies import BodyTooLarge, authorization_token, read_limited
from .sandboxes import SandboxError, SandboxExpired, SandboxManager, SandboxNotFound, SandboxPaused
from .scrub import scrub
from .settings import ServerSettings

log = logging.getLogger("scalebox_kernel.server")

#: Largest REST body (a kernel start request is a name and a path).
MAX_BODY = 64 * 1024
_SESSION_ID_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.")


class ApiError(Exception):
    """An error of this API: its status and message, answered as Jupyter Server does (`{"message", "reason"}`)."""

    def __init__(self, status: int, message: str, code: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code  # for our client: sandbox_not_found, sandbox_expired, sandbox_paused, kernel_not_found

    def response(self) -> Response:
        return JSONResponse({"message": scrub(self.message), "reason": self.code, "code": self.code}, self.status)


def _iso(seconds: float) -> str:
    return datetime.fromtimestamp(seconds or 0, UTC).isoformat().replace("+00:00", "Z")


class JupyterPlane:
    """The routes of every sandbox's Jupyter endpoint."""

    def __init__(self, manager: SandboxManager, settings: ServerSettings) -> None:
        self.manager = manager
        self.settings = settings

    def routes(self) -> list[BaseRoute]:
        base = "/sbx/{sandbox_id}/api"
        return [
            Route(f"{base}", self.api, methods=["GET"]),
            Route(f"{base}/kernelspecs", self.kernelspecs, methods=["GET"]),
            Route(f"{base}/kernelspecs/{{name}}", self.kernelspec, methods=["GET"]),
            Route(f"{base}/kernels", self.kernels, methods=["GET", "POST"]),
            Route(f"{base}/kernels/{{kernel_id}}", self.kernel, methods=["GET", "DELETE"]),
            Route(f"{base}/kernels/{{kernel_id}}/interrupt", self.interrupt, methods=["POST"]),
            Route(f"{base}/kernels/{{kernel_id}}/restart", self.restart, methods=["POST"]),
            Route(f"{base}/sessions", self.sessions, methods=["GET"]),
            WebSocketRoute(f"{base}/kernels/{{kernel_id}}/channels", self.channels),
        ]

    # ---- auth and lookup --------------------------------------------------------------------------------------------

    def _agent(self, connection: HTTPConnection) -> SandboxAgent:
        """The sandbox's agent once the caller's token is that sandbox's; ApiError otherwise."""
        sandbox_id = connection.path_params["sandbox_id"]
        given = _token(connection)
        if given is None:  # before the lookup: without a token, nobody learns which sandboxes exist
            raise ApiError(
                401,
                "missing token: send Authorization: token <the sandbox's envd_access_token> (or ?token= on the URL)",
            )
        try:
            self.manager.get(sandbox_id)
        except SandboxError as exc:
            raise ApiError(404, exc.message, _gone_code(exc)) from None
        expected = (self.manager.token_of(sandbox_id) or "").encode()
        if not expected or not hmac.compare_digest(given.encode(), expected):
            raise ApiError(403, f"invalid token for sandbox {sandbox_id}")
        try:
            return self.manager.agent(sandbox_id)
        except SandboxPaused as exc:
            raise ApiError(409, exc.message, "sandbox_paused") from None
        except SandboxNotFound as exc:
            raise ApiError(404, exc.message, _gone_code(exc)) from None
        except SandboxError as exc:
            raise ApiError(503, exc.message) from None

    @staticmethod
    def _context(agent: SandboxAgent, kernel_id: str) -> CodeContext:
        try:
            return agent.contexts.find(kernel_id)
        except ConnectError:
            raise ApiError(404, f"kernel {kernel_id} not found in this sandbox", "kernel_not_found") from None

    async def _handle(self, request: Request, work: Any) -> Response:
        try:
            result = work(self._agent(request))
            return await result if inspect.isawaitable(result) else result
        except ApiError as exc:
            return exc.response()
        except ConnectError as exc:
            return ApiError(exc.http_status, exc.message).response()
        except SandboxError as exc:  # it went away meanwhile (killed while its kernel restarted, say)
            return ApiError(503, exc.message).response()
        except Exception as exc:  # what no check foresaw: an answer, and one line in the log
            log.warning("%s %s failed: %s: %s", request.method, request.url.path, type(exc).__name__, exc)
            return ApiError(500, f"{request.method} {request.url.path} failed: {type(exc).__name__}").response()

    # ---- REST -------------------------------------------------------------------------------------------------------

    async def api(self, request: Request) -> Response:
        from .. import __version__

        return await self._handle(request, lambda agent: _json({"version": __version__}))

    def _spec(self, agent: SandboxAgent, name: str) -> dict[str, Any]:
        runtime = agent.contexts.registry.resolve(name)
        return {
            "name": runtime.name,
            "spec": {
                "argv": [],
                "display_name": runtime.display_name,
                "language": runtime.name,
                "interrupt_mode": "message",
                "env": {},
                "metadata": {"scalebox": {"aliases": list(runtime.aliases)}},
            },
            "resources": {},
        }

    async def kernelspecs(self, request: Request) -> Response:
        async def work(agent: SandboxAgent) -> Response:
            names = agent.contexts.registry.available()
            specs = {name: self._spec(agent, name) for name in names}
            return _json({"default": "python" if "python" in specs else next(iter(specs), ""), "kernelspecs": specs})

        return await self._handle(request, work)

    async def kernelspec(self, request: Request) -> Response:
        async def work(agent: SandboxAgent) -> Response:
            name = request.path_params["name"]
            if name not in agent.contexts.registry.available():
                raise ApiError(404, f"no kernelspec {name!r} here")
            return _json(self._spec(agent, name))

        return await self._handle(request, work)

    @staticmethod
    def _model(context: CodeContext) -> dict[str, Any]:
        kernel = context.kernel
        return {
            "id": context.id,
            "name": context.runtime.name,
            "last_activity": _iso(kernel.last_activity or context.created_at.seconds),
            "execution_state": kernel.execution_state,
            "connections": kernel.clients.connections,
        }

    async def kernels(self, request: Request) -> Response:
        async def work(agent: SandboxAgent) -> Response:
            if request.method == "GET":
                return _json([self._model(context) for context in agent.contexts.listed()])
            body = await _body(request)
            name = body.get("name") or "python"
            if not isinstance(name, str):
                raise ApiError(400, "name is a kernelspec name (a string)")
            try:  # `path` names the notebook on the client's side: kernels start in the sandbox's home
                context = agent.contexts.create(name)
            except ConnectError as exc:
                status = 404 if exc.code == "invalid_argument" else exc.http_status
                raise ApiError(status, exc.message) from None
            await context.kernel.ready()
            return _json(self._model(context), 201)

        return await self._handle(request, work)

    async def kernel(self, request: Request) -> Response:
        async def work(agent: SandboxAgent) -> Response:
            context = self._context(agent, request.path_params["kernel_id"])
            if request.method == "GET":
                return _json(self._model(context))
            await agent.contexts.destroy(context.id)
            return Response(status_code=204)

        return await self._handle(request, work)

    async def interrupt(self, request: Request) -> Response:
        async def work(agent: SandboxAgent) -> Response:
            await self._context(agent, request.path_params["kernel_id"]).kernel.interrupt()
            return Response(status_code=204)

        return await self._handle(request, work)

    async def restart(self, request: Request) -> Response:
        async def work(agent: SandboxAgent) -> Response:
            context = self._context(agent, request.path_params["kernel_id"])
            await context.kernel.restart()
            return _json(self._model(context))

        return await self._handle(request, work)

    async def sessions(self, request: Request) -> Response:
        """jupyter_server's sessions API is not served (the Scalebox kernel keeps sessions); an empty list keeps
        clients that list sessions at start-up working."""
        return await self._handle(request, lambda agent: _json([]))

    # ---- WebSocket ----------------------------------------------------------------------------------------------

    async def channels(self, websocket: WebSocket) -> None:
        try:
            agent = self._agent(websocket)
            context = self._context(agent, websocket.path_params["kernel_id"])
            await context.kernel.ready()
            session_id = websocket.query_params.get("session_id") or secrets.token_hex(16)
            if len(session_id) > 128 or not set(session_id) <= _SESSION_ID_CHARS:
                raise ApiError(400, "session_id is at most 128 letters, digits, '-', '_' or '.'")
            session, new = context.kernel.clients.open(session_id)
            if new:
                await session.subscribed()
        except ApiError as exc:
            await _deny(websocket, exc)
            return
        except (ConnectError, Closed) as exc:
            await _deny(websocket, ApiError(503, getattr(exc, "message", None) or str(exc)))
            return
        offered = websocket.scope.get("subprotocols") or []
        subprotocol = jupyter_ws.V1_SUBPROTOCOL if jupyter_ws.V1_SUBPROTOCOL in offered else None
        # Tell the client whether what its kernel sent while it was away is still here, and whether the kernel lost
        # its state since (a restarted server brings contexts back empty).
        headers = [(b"x-scalebox-session", b"new" if new else b"resumed")]
        notice, context.kernel.notice = context.kernel.notice, None
        if notice:
            headers.append((b"x-scalebox-notice", notice.strip().encode("ascii", "replace")[:500]))
        await websocket.accept(subprotocol=subprotocol, headers=headers)
        await self._serve(websocket, session, subprotocol, agent.sandbox_id)

    def _ended(self, sandbox_id: str) -> str | None:
        """Why the sandbox no longer takes requests (its time ran out, it was killed or paused), if so: checked for
        every client message, since the reaper may stop its kernels a moment after the sandbox ended."""
        try:
            self.manager.agent(sandbox_id)
        except SandboxError as exc:
            return exc.message
        return None

    async def _serve(
        self, websocket: WebSocket, session: ClientSession, subprotocol: str | None, sandbox_id: str
    ) -> None:
        closed = asyncio.Event()

        async def send(message: jupyter_ws.WireMessage) -> None:
            frame = jupyter_ws.encode(message, subprotocol)
            if isinstance(frame, str):
                await websocket.send_text(frame)
            else:
                await websocket.send_bytes(frame)

        async def on_close(reason: str) -> None:
            closed.set()
            code = CLOSE_GONE
            if reason.startswith("replaced"):
                code = CLOSE_REPLACED
            elif reason.startswith(PAUSED_PREFIX):
                code = CLOSE_PAUSED
            with contextlib.suppress(Exception):
                await websocket.close(code, _close_reason(reason))

        previous = session.on_close
        if previous is not None:  # another WebSocket served this session: it is replaced, the session stays
            session.on_close = None
            with contextlib.suppress(Exception):
                await previous("replaced by a newer connection of the same session")
        session.on_close = on_close
        try:
            await session.attach(send)
        except Closed as exc:
            await on_close(exc.reason)
            return
        except Exception:  # the client left while what was kept went out
            session.detach(send)
            return
        try:
            while not closed.is_set():
                frame = await websocket.receive()
                if frame["type"] == "websocket.disconnect":
                    break
                data = frame.get("bytes")
                data = data if data is not None else frame.get("text")
                if data is None:
                    continue
                try:
                    message = jupyter_ws.decode(data, subprotocol)
                except jupyter_ws.FramingError as exc:
                    log.info("Jupyter endpoint: dropped a client frame: %s", exc)
                    continue
                ended = self._ended(sandbox_id)
                if ended is not None:  # not passed on: the client resumes the sandbox (or hears it is gone)
                    paused = "paused" in ended
                    await on_close(f"{PAUSED_PREFIX}{ended}" if paused else f"the kernel is gone: {ended}")
                    break
                await session.send(message)
        except WebSocketDisconnect:
            pass
        finally:
            if session.on_close is on_close:
                session.on_close = None
            session.detach(send)


def _gone_code(exc: SandboxError) -> str:
    return "sandbox_expired" if isinstance(exc, SandboxExpired) else "sandbox_not_found"


def _token(connection: HTTPConnection) -> str | None:
    return (
        authorization_token(connection.headers, ("token", "bearer"))
        or connection.headers.get("x-access-token")
        or connection.query_params.get("token")
        or None
    )


async def _body(request: Request) -> dict[str, Any]:
    try:
        raw = await read_limited(request, MAX_BODY)
    except BodyTooLarge as exc:
        raise ApiError(413, str(exc)) from None
    if not raw.strip():
        return {}
    try:
        body = json.loads(raw)
    except ValueError as exc:
        raise ApiError(400, f"the body is not JSON: {exc}") from None
    if not isinstance(body, dict):
        raise ApiError(400, "the body is a JSON object")
    return body


def _json(value: Any, status: int = 200) -> Response:
    return JSONResponse(value, status)


def _close_reason(reason: str) -> str:
    """A WebSocket close reason is at most 123 bytes."""
    data = scrub(reason).encode()[:123]
    return data.decode("utf-8", "ignore")


async def _deny(websocket: WebSocket, error: ApiError) -> None:
    """Refuse a WebSocket before accepting it: with the error's status and body where the server can say it."""
    if "websocket.http.response" in websocket.scope.get("extensions", {}):
        await websocket.send_denial_response(error.response())
    else:
        await websocket.close(1008, _close_reason(error.message))
