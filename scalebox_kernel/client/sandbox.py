"""`AsyncSandbox`: a sandbox's life on the control plane (REST) and its code execution on the agent (Connect)."""

from __future__ import annotations

from typing import Any, Literal
from urllib.parse import urlencode, urlsplit

from ..config import ScaleboxConfig
from ..errors import InvalidArgument, ScaleboxError
from ..protocol import pb
from ..protocol.connect import JSON, PROTO
from ..protocol.signature import DEFAULT_USER
from . import control_plane
from .callbacks import Callback
from .commands import AsyncCommands
from .connect_client import ConnectClient
from .connection import Connection, agent_url
from .control_plane import data_of, rest
from .execution import Handlers, execute
from .filesystem import AsyncFilesystem, file_url
from .jupyter import JupyterEndpoint, jupyter_url
from .lifecycle import SandboxLifecycle
from .models import Context, Execution, Locality, ObjectStorage, SandboxInfo, ScaleboxRegion
from .ports import port_host, port_origin, port_url
from .pty import AsyncPty
from .transport import Transport

CodecName = Literal["proto", "json"]
# `list` is also a method of AsyncSandbox, so its body spells this list by alias.
Regions = list[ScaleboxRegion]


StorageOption = ObjectStorage | dict[str, Any]


def object_storage_body(value: StorageOption | list[StorageOption]) -> list[dict[str, Any]]:
    """The create body's `object_storage` list (PROTOCOL.md 1.5) from one mount or a list of them."""
    items = value if isinstance(value, list) else [value]
    try:
        return [ObjectStorage.of(item).to_api() for item in items]
    except (TypeError, ValueError) as exc:
        raise InvalidArgument(str(exc)) from None


def _locality(locality: Locality | dict[str, Any]) -> dict[str, Any]:
    if isinstance(locality, Locality):
        return locality.to_api()
    if not isinstance(locality, dict):
        raise InvalidArgument(f"locality must be a Locality or a dict, not {type(locality).__name__}")
    return dict(locality)


class AsyncSandbox(SandboxLifecycle):
    """A sandbox: create or connect with the class methods, then run code, manage files and run commands. Its
    lifecycle calls (`kill`, `set_timeout`, `get_info`, `get_metrics`, `pause`) work on the class with a sandbox
    id too (lifecycle.py)."""

    sandbox_id: str
    template_id: str
    sandbox_domain: str
    config: ScaleboxConfig
    files: AsyncFilesystem
    commands: AsyncCommands
    pty: AsyncPty

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
        self.pty = AsyncPty(self._rpc, self.commands)

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

    # ---- the sandbox's own ports (a web server started in it); client/ports.py
    def get_host(self, port: int) -> str:
        """Host, and on scalebox-local path, that reaches `port` inside the sandbox, without a scheme:
        `127.0.0.1:<server port>/sbx/<id>/port/<port>` on scalebox-local, `<port>-<sandbox_domain>` on a cloud.
        Requests need the sandbox's access token (X-Access-Token, or `get_url(..., token=True)`)."""
        return port_host(self.sandbox_domain, port)

    def get_url(self, port: int, path: str = "/", *, token: bool = False) -> str:
        """The full URL of `path` on `port` inside the sandbox. `token=True` makes it a browser's URL: the access
        token in it as `?token=` (treat it as a secret), and on scalebox-local the port's own origin
        `N-<id>.localhost:<server port>`, where the first visit trades the token for a cookie of that origin."""
        if not token:
            return port_url(self.agent_url, self.get_host(port), path, None)
        host = port_origin(self.sandbox_domain, port) or self.get_host(port)
        return port_url(self.agent_url, host, path, self._rpc.headers.get("X-Access-Token"))

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
        return await control_plane.open_transport(config, api_key, api_url, request_timeout)

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
        cpu_count: int | None = None,
        memory_mb: int | None = None,
        locality: Locality | dict[str, Any] | None = None,
        object_storage: StorageOption | list[StorageOption] | None = None,
        config: ScaleboxConfig | None = None,
        api_key: str | None = None,
        api_url: str | None = None,
        request_timeout: float | None = None,
        codec: CodecName = "proto",
    ) -> AsyncSandbox:
        """Create a sandbox (`timeout`: seconds it lives unless extended; defaults from the config). `cpu_count`
        and `memory_mb` size it (the server's defaults otherwise; it refuses more than it allows). `locality`
        asks for a region (see `get_regions()`); with `force`, one that cannot be had fails with HTTP 409.
        `object_storage` mounts buckets (an `ObjectStorage`, a dict of its fields, or a list of them); keys not
        given come from the AWS variables, and a bucket that cannot be mounted fails the create."""
        storage = object_storage_body(object_storage) if object_storage else []
        config, transport = await cls._open(config, api_key, api_url, request_timeout)
        for item in storage:
            transport.add_secret(item["access_key"])
            transport.add_secret(item["secret_key"])
        body: dict[str, Any] = {
            "template": template or config.template,
            "timeout": int(timeout if timeout is not None else config.sandbox_timeout),
            "metadata": dict(metadata or {}),
            "env_vars": dict(envs or {}),
            "secure": True,
            "allow_internet_access": allow_internet_access,
            "auto_pause": auto_pause,
        }
        for name, value in (("cpu_count", cpu_count), ("memory_mb", memory_mb)):
            if value is not None:
                if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                    await transport.aclose()
                    raise InvalidArgument(f"{name} must be a whole number of at least 1, not {value!r}")
                body[name] = value
        try:
            if locality is not None:
                body["locality"] = _locality(locality)
            if storage:
                body["object_storage"] = storage
            response = await rest(transport, "POST", "/sandboxes", what="Creating a sandbox", json=body)
            data, _ = data_of(transport, response, "Creating a sandbox")
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
            data = await control_plane.connect(transport, sandbox_id, timeout)
            return cls(config, transport, data, codec=codec)
        except BaseException:
            await transport.aclose()
            raise

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
                    response = await rest(transport, "GET", "/sandboxes", what="Listing sandboxes", params=params)
                    data, _ = data_of(transport, response, "Listing sandboxes")
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
    async def get_regions(
        cls,
        *,
        config: ScaleboxConfig | None = None,
        api_key: str | None = None,
        api_url: str | None = None,
        request_timeout: float | None = None,
    ) -> Regions:
        """The regions sandboxes can be created in (`Locality(region=...)` on `create`)."""
        return await control_plane.call_by_id(control_plane.get_regions, config, api_key, api_url, request_timeout)

    @classmethod
    async def kill_by_id(
        cls,
        sandbox_id: str,
        *,
        config: ScaleboxConfig | None = None,
        api_key: str | None = None,
        api_url: str | None = None,
    ) -> bool:
        """Kill a sandbox by id; False when the server does not know it (the same as `AsyncSandbox.kill(id)`)."""
        return await cls._kill_by_id(sandbox_id, config=config, api_key=api_key, api_url=api_url)

    async def resume(self, timeout: int | None = None) -> None:
        """Resume a paused sandbox (a no-op for a running one) and re-attach this object to it."""
        self._attach(await control_plane.connect(self._transport, self.sandbox_id, timeout))

    # ------------------------------------------------------------------------------------------ file URLs

    def download_url(self, path: str, user: str = DEFAULT_USER, use_signature_expiration: int | None = None) -> str:
        """A URL that downloads the file at `path` with a plain GET (a browser, curl): no header needed, signed
        with this sandbox's access token, and valid for `use_signature_expiration` seconds when given."""
        return file_url(
            self.agent_url, path, "read", user=user, token=self._access_token, expires_in=use_signature_expiration
        )

    def upload_url(self, path: str, user: str = DEFAULT_USER, use_signature_expiration: int | None = None) -> str:
        """A URL that writes the file at `path` from a POST of multipart/form-data with a `file` part (a browser's
        form, curl -F): no header needed, signed like `download_url`."""
        return file_url(
            self.agent_url, path, "write", user=user, token=self._access_token, expires_in=use_signature_expiration
        )

    @property
    def _access_token(self) -> str | None:
        return self._rpc.headers.get("X-Access-Token")

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
