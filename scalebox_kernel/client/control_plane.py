"""Control-plane calls (REST under /v1) on one sandbox by its id, shared by the class forms (`Sandbox.kill(id)`) and
the instance forms (`sandbox.kill()`) of `AsyncSandbox`, plus the regions list."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import Any, TypeVar

import httpx

from ..config import ScaleboxConfig
from ..errors import ScaleboxError
from .connection import resolve_connection
from .models import SandboxInfo, SandboxMetrics, ScaleboxRegion
from .transport import Transport

R = TypeVar("R")


async def open_transport(
    config: ScaleboxConfig | None, api_key: str | None, api_url: str | None, request_timeout: float | None = None
) -> tuple[ScaleboxConfig, Transport]:
    """The config in effect and a new transport to the server it designates (the caller closes it)."""
    config, connection = await resolve_connection(
        config, api_key=api_key, api_url=api_url, request_timeout=request_timeout
    )
    return config, Transport(connection)


async def call_by_id(
    call: Callable[[Transport], Awaitable[R]],
    config: ScaleboxConfig | None,
    api_key: str | None,
    api_url: str | None,
    request_timeout: float | None,
) -> R:
    """Run one control-plane call on a transport of its own, closed after (the class forms: `Sandbox.kill(id)`)."""
    _, transport = await open_transport(config, api_key, api_url, request_timeout)
    try:
        return await call(transport)
    finally:
        await transport.aclose()


async def rest(
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
    """One control-plane call; any status >= 300 not in `ok` becomes a typed error (a 404 naming `sandbox_id`
    becomes SandboxNotFound)."""
    url = transport.connection.rest_url + path
    headers = {"X-API-KEY": transport.connection.api_key}
    response = await transport.request(method, url, what=what, idempotent=idempotent, headers=headers, **kwargs)
    if response.status_code >= 300 and response.status_code not in ok:
        raise transport.rest_error(response, what, sandbox_id)
    return response


def data_of(transport: Transport, response: httpx.Response, what: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """The `data` object of a control-plane answer, and the whole body beside it."""
    try:
        body = response.json()
    except ValueError:
        body = None
    if not isinstance(body, dict) or not isinstance(body.get("data"), dict):
        raise transport.error(ScaleboxError, f"{what}: the server's answer has no `data` object", status_code=200)
    return body["data"], body


async def kill(transport: Transport, sandbox_id: str) -> bool:
    """Kill a sandbox; False when the server does not know it (already gone, or never was)."""
    response = await rest(
        transport, "DELETE", f"/sandboxes/{sandbox_id}", what=f"Killing sandbox {sandbox_id}", ok=(404,)
    )
    return response.status_code != 404


async def set_timeout(transport: Transport, sandbox_id: str, timeout: int) -> None:
    await rest(
        transport,
        "POST",
        f"/sandboxes/{sandbox_id}/timeout",
        what=f"Setting the timeout of sandbox {sandbox_id}",
        sandbox_id=sandbox_id,
        idempotent=True,
        json={"timeout": int(timeout)},
    )


async def get_info(transport: Transport, sandbox_id: str) -> SandboxInfo:
    what = f"Getting sandbox {sandbox_id}"
    response = await rest(transport, "GET", f"/sandboxes/{sandbox_id}", what=what, sandbox_id=sandbox_id)
    data, body = data_of(transport, response, what)
    return SandboxInfo.from_api(data, body)


async def get_metrics(
    transport: Transport, sandbox_id: str, start: datetime | None = None, end: datetime | None = None
) -> list[SandboxMetrics]:
    """The sandbox's metrics samples, those between `start` and `end` when given (sent in ms, as the seed does)."""
    what = f"Getting the metrics of sandbox {sandbox_id}"
    params = {name: int(when.timestamp() * 1000) for name, when in (("start", start), ("end", end)) if when}
    response = await rest(
        transport, "GET", f"/sandboxes/{sandbox_id}/metrics", what=what, sandbox_id=sandbox_id, params=params
    )
    data, _ = data_of(transport, response, what)
    return SandboxMetrics.list_from_api(data)


async def pause(transport: Transport, sandbox_id: str) -> None:
    """Pause a sandbox; pausing a paused one is fine (the server's 409)."""
    await rest(
        transport,
        "POST",
        f"/sandboxes/{sandbox_id}/pause",
        what=f"Pausing sandbox {sandbox_id}",
        sandbox_id=sandbox_id,
        ok=(409,),
        idempotent=True,
    )


async def connect(transport: Transport, sandbox_id: str, timeout: int | None) -> dict[str, Any]:
    """Resume (if paused) and describe a sandbox: the `data` of the connect answer."""
    what = f"Connecting to sandbox {sandbox_id}"
    body = {"timeout": int(timeout)} if timeout is not None else None
    response = await rest(
        transport,
        "POST",
        f"/sandboxes/{sandbox_id}/connect",
        what=what,
        sandbox_id=sandbox_id,
        idempotent=True,
        json=body,
    )
    data, _ = data_of(transport, response, what)
    return data


async def get_regions(transport: Transport) -> list[ScaleboxRegion]:
    what = "Listing the regions"
    response = await rest(transport, "GET", "/scalebox-regions", what=what)
    data, body = data_of(transport, response, what)
    if body.get("success") is False:
        raise transport.error(ScaleboxError, f"{what}: the server answered success: false", status_code=200)
    return [
        ScaleboxRegion(id=str(item.get("id") or ""), name=str(item.get("name") or ""))
        for item in data.get("scalebox_regions") or []
        if isinstance(item, dict)
    ]
