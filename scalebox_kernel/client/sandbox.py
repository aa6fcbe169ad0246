"""`AsyncSandbox`: a sandbox's life on the control plane (REST) and its code execution on the agent (Connect)."""

from __future__ import annotations

from typing import Any, Literal
from urllib.parse import urlencode, urlsplit

import httpx

from ..config import ScaleboxConfig
from ..errors import ScaleboxError
from ..protocol import pb
from ..protocol.connect import JSON, PROTO
from .callbacks import Callback
from .commands import AsyncCommands
from .connect_client import ConnectClient
from .connection import Connection, agent_url, resolve_connection
from .execution import Handlers, execute
from .filesystem import AsyncFilesystem
from .jupyter import JupyterEndpoint, jupyter_url
from .models import Context, Execution, SandboxInfo
from .transport import Transport

CodecName = Literal["proto", "json"]


def _data(transport: Transport, response: httpx.Response, what: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """The `data` object of a control-plane answer, and the whole body beside it."""
    try:
        body = response.json()
    except ValueError:
        body = None
    if not isinstance(body, dict) or not isinstance(body.get("data"), dict):
        raise transport.error(ScaleboxError, f"{what}: the server's answer has no `data` object", status_code=200)
    return body["data"], body


class AsyncSandbox:
    """A sandbox: create or connect with the class methods, then run code, manage files and run commands."""

    sandbox_id: str
    template_id: str
    sandbox_domain: str
    config: ScaleboxConfig
    files: AsyncFilesystem
    commands: AsyncCommands

    def __init__(
        self, config: ScaleboxConfig, transport: Transport, data: dict[str, Any], *, codec: CodecName = "proto"
    ) -> None:
        self.config = config
        self._transport = transport
        self.sandbox_id = str(data.get("sandbox_id") or "")
        self.template_id = str(data.get("template_id") or "")
        if not self.sandbox_id:
            raise transport.error(ScaleboxError, "The server's sandbox answer has no sandbox_id; is it a Scalebox API?")
        self._rpc = ConnectClient(
            transport, "", {}, codec=JSON if codec == "json" else PROTO, sandbox_id=self.sandbox_id
        )
        self._attach(data)
        self.files = AsyncFilesystem(self._rpc)
        self.commands = AsyncCommands(self._rpc)

    def _attach(self, data: dict[str, Any]) -> None:
        """Point the agent client at the domain and token of a create/connect answer."""
        connection = self._transport.connection
        self.sandbox_domain = str(
            data.get("sandbox_domain") or data.get("domain") or urlsplit(connection.api_url).netloc
        )
        token = data.get("envd_access_token")
        headers = {"Authorization": "Bearer root"}
        if token:
            self._transport.add_secret(str(token))
            headers["X-Access-Token"] = str(token)
        self._rpc.base_url = agent_url(connection, self.sandbox_domain)
        self._rpc.headers = headers

    def __repr__(self) -> str:
        return f"{type(self).__name__}(sandbox_id={self.sandbox_id!r}, sandbox_domain={self.sandbox_domain!r})"

    @property
    def agent_url(self) -> str:
        """Base URL of this sandbox's agent (health, files, Connect services)."""
        return self._rpc.base_url

    @property
    def connection(self) -> Connection:
        return self._transport.connection

    def jupyter(self) -> JupyterEndpoint:
        """This sandbox's Jupyter endpoint (kernels REST API and channels; PROTOCOL.md 11)."""
        base = jupyter_url(self.agent_url, self.sandbox_domain)
        token = self._rpc.headers.get("X-Access-Token", "")
        return JupyterEndpoint(self._transport, base, token, self.sandbox_id)

    def secrets(self) -> list[str]:
        """Values that must never be shown or logged (the API key, the access token): for `errors.redact`."""
        return self._transport.secrets

    # ------------------------------------------------------------------------------------------ class methods

    @classmethod
    async def _open(
        cls,
        config: ScaleboxConfig | None,
        api_key: str | None,
        api_url: str | None,
        request_timeout: float | None = None,
    ) -> tuple[ScaleboxConfig, Transport]:
        config, connection = await resolve_connection(
            config, api_key=api_key, api_url=api_url, request_timeout=request_timeout
        )
        return config, Transport(connection)

    @staticmethod
    async def _rest(
        transport: Transport,
        method: str,
        path: str,
        *,
        what: str,
        sandbox_id: str | None = None,
        ok: tuple[int, ...] = (),
        idempotent: bool | None = None,
        **kwargs: Any,
    ) -> httpx.Response:
        """One control-plane call; any status >= 300 not in `ok` becomes a typed error."""
        url = transport.connection.rest_url + path
        headers = {"X-API-KEY": transport.connection.api_key}
        response = await transport.request(method, url, what=what, idempotent=idempotent, headers=headers, **kwargs)
        if response.status_code >= 300 and response.status_code not in ok:
            raise transport.rest_error(response, what, sandbox_id)
        return response

    @classmethod
    async def create(
        cls,
        template: str | None = None,
        *,
        timeout: int | None = None,
        metadata: dict[str, str] | None = None,
        envs: dict[str, str] | None = None,
        allow_internet_access: bool = True,
        auto_pause: bool = False,
        config: ScaleboxConfig | None = None,
        api_key: str | None = None,
        api_url: str | None = None,
        request_timeout: float | None = None,
        codec: CodecName = "proto",
    ) -> AsyncSandbox:
        """Create a sandbox (`timeout`: seconds it lives unless extended; defaults from the config)."""
        config, transport = await cls._open(config, api_key, api_url, request_timeout)
        body = {
            "template": template or config.template,
            "timeout": int(timeout if timeout is not None else config.sandbox_timeout),
            "metadata": dict(metadata or {}),
            "env_vars": dict(envs or {}),
            "secure": True,
            "allow_internet_access": allow_internet_access,
            "auto_pause": auto_pause,
        }
        try:
            response = await cls._rest(transport, "POST", "/sandboxes", what="Creating a sandbox", json=body)
            data, _ = _data(transport, response, "Creating a sandbox")
            return cls(config, transport, data, codec=codec)
        except BaseException:
            await transport.aclose()
            raise

    @classmethod
    async def connect(
        cls,
        sandbox_id: str,
        *,
        timeout: int | None = None,
        config: ScaleboxConfig | None = None,
        api_key: str | None = None,
        api_url: str | None = None,
        request_timeout: float | None = None,
        codec: CodecName = "proto",
    ) -> AsyncSandbox:
        """Attach to an existing sandbox, resuming it if it is paused."""
        config, transport = await cls._open(config, api_key, api_url, request_timeout)
        try:
            data = await cls._connect(transport, sandbox_id, timeout)
            return cls(config, transport, data, codec=codec)
        except BaseException:
            await transport.aclose()
            raise

    @classmethod
    async def _connect(cls, transport: Transport, sandbox_id: str, timeout: int | None) -> dict[str, Any]:
        what = f"Connecting to sandbox {sandbox_id}"
        body = {"timeout": int(timeout)} if timeout is not None else None
        response = await cls._rest(
            transport,
            "POST",
            f"/sandboxes/{sandbox_id}/connect",
            what=what,
            sandbox_id=sandbox_id,
            idempotent=True,
            json=body,
        )
        data, _ = _data(transport, response, what)
        return data

    @classmethod
    async def list(
        cls,
        *,
        metadata: dict[str, str] | None = None,
        state: list[str] | None = None,
        config: ScaleboxConfig | None = None,
        api_key: str | None = None,
        api_url: str | None = None,
    ) -> list[SandboxInfo]:
        """Sandboxes the server knows, optionally only those in `state` and carrying all of `metadata`."""
        _, transport = await cls._open(config, api_key, api_url)
        found: dict[str, SandboxInfo] = {}
        try:
            statuses: list[str | None] = [*state] if state else [None]
            for status in statuses:
                page = 1
                while True:
                    params: dict[str, Any] = {}
                    if status:
                        params["status"] = status
                    if metadata:
                        params["metadata"] = urlencode(metadata)
                    if page > 1:
                        params["page"] = page
                    response = await cls._rest(transport, "GET", "/sandboxes", what="Listing sandboxes", params=params)
                    data, _ = _data(transport, response, "Listing sandboxes")
                    for item in data.get("sandboxes") or []:
                        info = SandboxInfo.from_api(item)
                        found.setdefault(info.sandbox_id, info)
                    pagination = data.get("pagination") or {}
                    if (
                        not isinstance(pagination, dict)
                        or page >= int(pagination.get("total_pages") or 1)
                        or page >= 1000
                    ):
                        break
                    page += 1
        finally:
            await transport.aclose()
        wanted = set(state or [])
        return [
            info
            for info in found.values()
            if (not wanted or info.state in wanted)
            and all(info.metadata.get(k) == v for k, v in (metadata or {}).items())
        ]

    @classmethod
    async def kill_by_id(
        cls,
        sandbox_id: str,
        *,
        config: ScaleboxConfig | None = None,
        api_key: str | None = None,
        api_url: str | None = None,
    ) -> bool:
        """Kill a sandbox by id; False when the server does not know it."""
        _, transport = await cls._open(config, api_key, api_url)
        try:
            response = await cls._rest(
                transport, "DELETE", f"/sandboxes/{sandbox_id}", what=f"Killing sandbox {sandbox_id}", ok=(404,)
            )
            return response.status_code != 404
        finally:
            await transport.aclose()

    # ------------------------------------------------------------------------------------------ lifecycle

    async def kill(self) -> None:
        """Kill the sandbox (its files and kernels are gone); killing one already gone is not an error."""
        await self._rest(
            self._transport,
            "DELETE",
            f"/sandboxes/{self.sandbox_id}",
            what=f"Killing sandbox {self.sandbox_id}",
            ok=(404,),
        )

    async def set_timeout(self, timeout: int) -> None:
        """Let the sandbox live `timeout` seconds from now (extends or shortens its life)."""
        await self._rest(
            self._transport,
            "POST",
            f"/sandboxes/{self.sandbox_id}/timeout",
            what=f"Setting the timeout of sandbox {self.sandbox_id}",
            sandbox_id=self.sandbox_id,
            idempotent=True,
            json={"timeout": int(timeout)},
        )

    async def pause(self) -> None:
        """Pause the sandbox (files and, where supported, memory are kept); pausing a paused one is fine."""
        await self._rest(
            self._transport,
            "POST",
            f"/sandboxes/{self.sandbox_id}/pause",
            what=f"Pausing sandbox {self.sandbox_id}",
            sandbox_id=self.sandbox_id,
            ok=(409,),
            idempotent=True,
        )

    async def resume(self, timeout: int | None = None) -> None:
        """Resume a paused sandbox (a no-op for a running one) and re-attach this object to it."""
        self._attach(await self._connect(self._transport, self.sandbox_id, timeout))

    async def get_info(self) -> SandboxInfo:
        what = f"Getting sandbox {self.sandbox_id}"
        response = await self._rest(
            self._transport, "GET", f"/sandboxes/{self.sandbox_id}", what=what, sandbox_id=self.sandbox_id
        )
        data, body = _data(self._transport, response, what)
        return SandboxInfo.from_api(data, body)

    async def is_running(self) -> bool:
        """Whether the sandbox's agent answers its health check."""
        try:
            response = await self._transport.request(
                "GET",
                self._rpc.base_url + "/health",
                what="Health check",
                idempotent=False,
                headers=self._rpc.headers,
                timeout=min(self._transport.connection.request_timeout or 5.0, 5.0),
            )
        except ScaleboxError:
            return False
        return 200 <= response.status_code < 300

    async def close(self) -> None:
        """Close this object's HTTP connections (the sandbox itself keeps running)."""
        await self._transport.aclose()

    async def __aenter__(self) -> AsyncSandbox:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        try:
            await self.kill()
        finally:
            await self.close()

    # ------------------------------------------------------------------------------------------ code

    async def create_code_context(self, language: str = "python", cwd: str | None = None) -> Context:
        """A new context (its own kernel): state kept between the cells run in it."""
        request = pb.CreateContextRequest(language=language or "python", cwd=cwd or "")
        reply = await self._rpc.unary(
            "ContextService/CreateContext", request, pb.Context, what=f"Creating a {language} context"
        )
        return Context.from_pb(reply)

    async def destroy_context(self, context: Context | str) -> None:
        context_id = context.id if isinstance(context, Context) else context
        await self._rpc.unary(
            "ContextService/DestroyContext",
            pb.DestroyContextRequest(context_id=context_id),
            pb.DestroyContextResponse,
            what=f"Destroying context {context_id}",
        )

    async def run_code(
        self,
        code: str,
        *,
        language: str | None = None,
        context: Context | str | None = None,
        envs: dict[str, str] | None = None,
        on_stdout: Callback | None = None,
        on_stderr: Callback | None = None,
        on_result: Callback | None = None,
        on_error: Callback | None = None,
        timeout: float | None = None,
    ) -> Execution:
        """Run a cell; callbacks see its output as it comes. Past `timeout` seconds (default: the config's
        execution_timeout; 0 or None there means no limit) the cell is interrupted and ExecutionTimeout raised.

        Without a context the code runs in the sandbox's default context of `language` (python by default);
        with one, in that context (and its language). Cancelling the call interrupts the cell.
        """
        request = pb.ExecuteRequest(code=code, env_vars=envs or {})
        if context is not None:
            request.context_id = context.id if isinstance(context, Context) else context
        else:
            request.language = language or "python"
        limit = timeout if timeout is not None else self.config.execution_timeout
        return await execute(self._rpc, request, Handlers(on_stdout, on_stderr, on_result, on_error), limit or None)
