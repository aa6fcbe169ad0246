"""The control plane under /v1 (PROTOCOL.md sections 1 and 8.2): sandboxes, timeouts, pause, metrics, regions."""

from __future__ import annotations

import hmac
import json
import math
import time
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import parse_qsl

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from .bodies import BodyTooLarge, authorization_token, error_response, read_limited
from .isolation.buckets import Bucket, parse_object_storage
from .sandboxes import BadRequest, Conflict, CreateSpec, SandboxError, SandboxManager
from .scrub import scrub
from .settings import ServerSettings
from .store import PAUSED, RUNNING, STATES, SandboxRecord, iso
from .validation import InvalidJson, load_json

ENVD_VERSION = "1.0.0"
REGIONS = [{"id": "local", "name": "scalebox-local"}]
#: Control-plane bodies are small JSON objects; anything bigger is a mistake.
MAX_BODY_BYTES = 1024 * 1024
DEFAULT_PAGE_SIZE = 100
MAX_PAGE_SIZE = 1000

Handler = Callable[[Request], Awaitable[Response]]


def _ok(data: Any, status: int = 200, **extra: Any) -> JSONResponse:
    return JSONResponse({"success": True, "data": data, **extra}, status)


# ---- request parsing --------------------------------------------------------------------------------------------


async def _json_body(request: Request) -> dict[str, Any]:
    """The request's JSON object; an empty body is `{}` (connect and pause are sent without one)."""
    raw = await read_limited(request, MAX_BODY_BYTES)
    if not raw.strip():
        return {}
    try:
        body = load_json(raw)
    except InvalidJson as exc:
        raise BadRequest(str(exc)) from None
    if body is None:
        return {}
    if not isinstance(body, dict):
        raise BadRequest(f"request body must be a JSON object, not {type(body).__name__}")
    return body


def _shown(value: Any) -> str:
    """A JSON value for an error message, cut short."""
    text = json.dumps(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _int(body: dict[str, Any], name: str, default: int | None) -> int | None:
    """An integer field (1e3 is 1000); its range is checked where it is used."""
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise BadRequest(f"{name} must be an integer, not {_shown(value)}")
    return value


def _bool(body: dict[str, Any], name: str, default: bool) -> bool:
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise BadRequest(f"{name} must be true or false, not {_shown(value)}")
    return value


def _str_map(body: dict[str, Any], name: str) -> dict[str, str]:
    value = body.get(name)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise BadRequest(f"{name} must be an object of strings, not {_shown(value)}")
    for key, item in value.items():
        if not isinstance(item, str):
            raise BadRequest(f"{name}.{key[:64]} must be a string, not {_shown(item)}")
    return dict(value)


def _disk_mb(body: dict[str, Any], max_disk_mb: int) -> int | None:
    """`disk_mb`, or the OpenAPI's `storage_gb` (GiB) as its alias."""
    disk_mb = _int(body, "disk_mb", None)
    storage_gb = _int(body, "storage_gb", None)
    if storage_gb is None:
        return disk_mb
    if not 1 <= storage_gb <= max_disk_mb // 1024:
        raise BadRequest(f"storage_gb must be from 1 to {max_disk_mb // 1024} GiB on this server, not {storage_gb}")
    if disk_mb is not None and disk_mb != storage_gb * 1024:
        raise BadRequest("give disk_mb or storage_gb, not both (they disagree)")
    return storage_gb * 1024


#: The templates scalebox-local serves: the same sandbox under the names the SDKs use.
TEMPLATES = ("base", "code-interpreter")


def parse_create(body: dict[str, Any], settings: ServerSettings) -> CreateSpec:
    """The create body as a spec, every field of the right type (the spec checks the ranges)."""
    template = body.get("template")
    if template is None or template == "":
        template = "base"
    if not isinstance(template, str):
        raise BadRequest(f"template must be a string, not {_shown(template)}")
    if template not in TEMPLATES:
        known = " and ".join(repr(name) for name in TEMPLATES)
        raise BadRequest(f"unknown template {template[:64]!r}: scalebox-local has {known} (SCALEBOX_TEMPLATE)")
    try:
        object_storage = parse_object_storage(body.get("object_storage"))
    except ValueError as exc:
        raise BadRequest(str(exc)) from None
    _bool(body, "object_storage_direct_mount", False)  # buckets are always mounted by the server, for the sandbox
    s3fs_path = body.get("s3fs_executable_path")
    if s3fs_path not in (None, "", "s3fs"):
        raise BadRequest("s3fs_executable_path cannot be chosen on scalebox-local: it mounts with the host's own s3fs")
    if body.get("net_proxy_country"):
        raise BadRequest("net_proxy_country is not supported by scalebox-local")
    _bool(body, "is_async", False)  # creating is quick: the answer always comes when the sandbox runs
    locality = body.get("locality")
    if locality is not None:
        if not isinstance(locality, dict):
            raise BadRequest(f"locality must be an object, not {_shown(locality)}")
        region = locality.get("region")
        if region is not None and not isinstance(region, str):
            raise BadRequest(f"locality.region must be a string, not {_shown(region)}")
        force = locality.get("force")
        if force is not None and not isinstance(force, bool):
            raise BadRequest(f"locality.force must be true or false, not {_shown(force)}")
        if force and region not in (None, "", "local"):
            raise Conflict(f"region {region[:64]!r} is not available; the only region is 'local'")
    timeout = _int(body, "timeout", settings.default_timeout)
    assert timeout is not None
    return CreateSpec(
        template=template,
        timeout=timeout,
        metadata=_str_map(body, "metadata"),
        envs=_str_map(body, "env_vars"),
        auto_pause=_bool(body, "auto_pause", False),
        allow_internet_access=_bool(body, "allow_internet_access", True),
        secure=_bool(body, "secure", False),
        cpu_count=_int(body, "cpu_count", None),
        memory_mb=_int(body, "memory_mb", None),
        disk_mb=_disk_mb(body, settings.max_disk_mb),
        object_storage=object_storage,
    )


def _query_int(request: Request, *names: str, default: int, minimum: int) -> int:
    for name in names:
        raw = request.query_params.get(name)
        if raw is not None and raw != "":
            if not (raw.isascii() and raw.isdigit() and len(raw) <= 18) or int(raw) < minimum:
                raise BadRequest(f"query parameter {name} must be an integer >= {minimum}, not {raw[:40]!r}")
            return int(raw)
    return default


# ---- the control plane ------------------------------------------------------------------------------------------


def _credential(request: Request) -> tuple[str, str]:
    """The API key the request offers, and which header it came in."""
    key = request.headers.get("x-api-key")
    if key:
        return key, "X-API-KEY"
    token = authorization_token(request.headers)
    return (token, "Authorization: Bearer") if token else ("", "")


class ControlPlane:
    """Handlers of /v1/...; each checks the API key first."""

    def __init__(self, manager: SandboxManager, api_key: str) -> None:
        self.manager = manager
        self._api_key = api_key.encode()

    def routes(self) -> list[Route]:
        guard = self._guard
        return [
            Route("/v1/sandboxes", guard(self.create), methods=["POST"]),
            Route("/v1/sandboxes", guard(self.list), methods=["GET"]),
            Route("/v1/sandboxes/{sandbox_id}", guard(self.get), methods=["GET"]),
            Route("/v1/sandboxes/{sandbox_id}", guard(self.kill), methods=["DELETE"]),
            Route("/v1/sandboxes/{sandbox_id}/timeout", guard(self.set_timeout), methods=["POST", "PUT"]),
            Route("/v1/sandboxes/{sandbox_id}/connect", guard(self.connect), methods=["POST"]),
            Route("/v1/sandboxes/{sandbox_id}/resume", guard(self.connect), methods=["POST"]),
            Route("/v1/sandboxes/{sandbox_id}/pause", guard(self.pause), methods=["POST"]),
            Route("/v1/sandboxes/{sandbox_id}/metrics", guard(self.metrics), methods=["GET"]),
            Route("/v1/sandboxes/{sandbox_id}/status", guard(self.status), methods=["GET"]),
            Route("/v1/scalebox-regions", guard(self.regions), methods=["GET"]),
            Route("/v1/pool", guard(self.pool), methods=["GET"]),
        ]

    def _guard(self, handler: Handler) -> Handler:
        """Authenticate by X-API-KEY, or by `Authorization: Bearer <key>` (what the JS SDK sends for
        SCALEBOX_ACCESS_TOKEN), and turn errors into JSON error bodies. The constant `Authorization: Bearer root`
        the Python SDK adds beside its X-API-KEY is no credential (PROTOCOL.md 1.2)."""

        async def guarded(request: Request) -> Response:
            given, source = _credential(request)
            if not given:
                return error_response(
                    401,
                    "missing credentials; send the scalebox-local API key as X-API-KEY or as Authorization: Bearer",
                )
            if not hmac.compare_digest(given.encode(), self._api_key):
                return error_response(401, f"invalid API key (from {source})")
            try:
                return await handler(request)
            except SandboxError as exc:
                return error_response(exc.status, exc.message, exc.code)
            except BodyTooLarge as exc:
                return error_response(413, str(exc))

        return guarded

    # ---- serialisation --------------------------------------------------------------------------------------------

    def _isolation(self, record: SandboxRecord) -> dict[str, Any]:
        try:
            return self.manager.agent(record.sandbox_id).isolation()
        except SandboxError:
            return self.manager.isolation()

    def _buckets(self, record: SandboxRecord) -> list[dict[str, Any]]:
        """Its object storage mounts (uri and mount point, whether mounted now): never their keys."""
        try:
            return self.manager.agent(record.sandbox_id).confinement.buckets()
        except SandboxError:
            return [Bucket.from_json(item).public() for item in record.object_storage]

    def sandbox_data(self, record: SandboxRecord) -> dict[str, Any]:
        """`data` of create, connect and get-info (PROTOCOL.md 1.6), snake_case plus the camelCase Python reads:
        a list item and more."""
        return {
            **self.list_item(record),
            "alias": record.template,
            "envd_access_token": record.token,
            "envdVersion": ENVD_VERSION,
            "clientID": "scalebox-local",
            "reason": record.reason,
            "paused_at": iso(record.paused_at),
            "timeout_at": iso(record.end_at),
            "env_vars": dict(record.envs),
            "auto_pause": record.auto_pause,
            "allow_internet_access": record.allow_internet_access,
            "secure": record.secure,
            "isolation": self._isolation(record),
            "object_storage": self._buckets(record),
            "warm": record.warm,
        }

    def list_item(self, record: SandboxRecord) -> dict[str, Any]:
        """One sandbox of a list response."""
        return {
            "sandbox_id": record.sandbox_id,
            "template_id": record.template,
            "name": record.template,
            "status": self.manager.state(record),
            "cpu_count": record.cpu_count,
            "memory_mb": record.memory_mb,
            "disk_mb": record.disk_mb,
            "problem": scrub(record.problem) or None,
            "created_at": iso(record.created_at),
            "started_at": iso(record.created_at),
            "end_at": iso(record.end_at),
            "timeout": record.timeout,
            "uptime": int(time.time() - record.created_at),
            "metadata": dict(record.metadata),
            "sandbox_domain": self.manager.domain(record.sandbox_id),
            "object_storage": [Bucket.from_json(item).public() for item in record.object_storage],
        }

    # ---- handlers -------------------------------------------------------------------------------------------------

    async def create(self, request: Request) -> Response:
        spec = parse_create(await _json_body(request), self.manager.settings)
        record = await self.manager.create(spec)
        return _ok(self.sandbox_data(record), 201)

    async def get(self, request: Request) -> Response:
        record = self.manager.inspect(request.path_params["sandbox_id"])
        data = self.sandbox_data(record)
        # The Python SDK reads metadata, alias and envdVersion of get-info from the top level (PROTOCOL.md 1.6).
        return _ok(data, metadata=data["metadata"], alias=data["alias"], envdVersion=ENVD_VERSION)

    async def list(self, request: Request) -> Response:
        raw_status = request.query_params.get("status", "")
        states = {s.strip().lower() for s in raw_status.split(",") if s.strip()} or {RUNNING, PAUSED}
        unknown = states - set(STATES)
        if unknown:
            raise BadRequest(f"unknown status {sorted(unknown)[0]!r}; use running, paused or terminated")
        metadata = dict(parse_qsl(request.query_params.get("metadata", ""), keep_blank_values=True))
        limit = _query_int(request, "limit", "page_size", default=DEFAULT_PAGE_SIZE, minimum=1)
        limit = min(limit, MAX_PAGE_SIZE)
        page = _query_int(request, "page", default=1, minimum=1)
        offset = _query_int(request, "offset", "skip", default=(page - 1) * limit, minimum=0)
        page = offset // limit + 1
        records = self.manager.list(states, metadata)
        items = [self.list_item(r) for r in records[offset : offset + limit]]
        total = len(records)
        pagination = {
            "page": page,
            "limit": limit,
            "total": total,
            "total_pages": math.ceil(total / limit),
            "offset": offset,
        }
        return _ok({"sandboxes": items, "pagination": pagination}, total=total)

    async def kill(self, request: Request) -> Response:
        sandbox_id = request.path_params["sandbox_id"]
        await self.manager.kill(sandbox_id)
        data = {"sandbox_id": sandbox_id, "status": "terminated", "note": "its files were deleted"}
        return _ok(data, message=f"sandbox {sandbox_id} killed")

    async def set_timeout(self, request: Request) -> Response:
        body = await _json_body(request)
        timeout = _int(body, "timeout", None)
        if timeout is None:
            raise BadRequest('timeout is required: send {"timeout": <seconds>}')
        record = self.manager.set_timeout(request.path_params["sandbox_id"], timeout)
        data = {
            "timeout": record.timeout,
            "timeout_at": iso(record.end_at),
            "used_lifetime": int(time.time() - record.created_at),
            "remaining_time": int(record.remaining()),
        }
        return _ok(data, message="timeout updated")

    async def connect(self, request: Request) -> Response:
        body = await _json_body(request)
        record = await self.manager.connect(request.path_params["sandbox_id"], _int(body, "timeout", None))
        return _ok(self.sandbox_data(record))

    async def pause(self, request: Request) -> Response:
        await _json_body(request)  # `{"is_async": true}` is accepted; pausing is quick anyway
        record = await self.manager.pause(request.path_params["sandbox_id"])
        return _ok({"sandbox_id": record.sandbox_id, "status": record.state}, message="sandbox paused")

    async def metrics(self, request: Request) -> Response:
        sample = await self.manager.measure(request.path_params["sandbox_id"])
        # JS reads one sample from `data`, Python a list from `data.metrics` (PROTOCOL.md 1.9): send both.
        return _ok({**sample, "metrics": [sample]})

    async def status(self, request: Request) -> Response:
        record = self.manager.inspect(request.path_params["sandbox_id"])
        data = {"sandbox_id": record.sandbox_id, "status": self.manager.state(record), "reason": record.reason}
        if record.problem:
            data["problem"] = scrub(record.problem)
        return _ok(data)

    async def pool(self, request: Request) -> Response:
        """scalebox-local's warm pool: its size, what is ready, its memory and budget."""
        return _ok(self.manager.pool.status())

    async def regions(self, request: Request) -> Response:
        return _ok({"scalebox_regions": REGIONS})
