"""Which server to talk to, with which key and which certificates: arguments, then config, then scalebox-local."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from urllib.parse import urlsplit

from ..config import DEFAULT_CLOUD_URL, ScaleboxConfig
from ..errors import AuthenticationError, ServerUnavailable
from ..local import ensure_local_server, read_runtime_info


@dataclass(frozen=True)
class Connection:
    """A resolved control-plane endpoint. `api_url` has no `/v1`; `verify` is what httpx should trust;
    `stream_idle_timeout` (0: none) is how long a stream may stay silent before the server counts as gone."""

    api_url: str
    api_key: str
    verify: str | bool
    request_timeout: float
    local: bool = False
    stream_idle_timeout: float = 60.0

    def __repr__(self) -> str:  # never show the key
        return (
            f"Connection(api_url={self.api_url!r}, local={self.local}, request_timeout={self.request_timeout}, "
            f"stream_idle_timeout={self.stream_idle_timeout})"
        )

    @property
    def rest_url(self) -> str:
        return self.api_url.rstrip("/") + "/v1"

    @property
    def is_loopback(self) -> bool:
        host = urlsplit(self.api_url).hostname or ""
        return host in ("127.0.0.1", "localhost", "::1")


async def resolve_connection(
    config: ScaleboxConfig | None = None,
    *,
    api_key: str | None = None,
    api_url: str | None = None,
    request_timeout: float | None = None,
) -> tuple[ScaleboxConfig, Connection]:
    """The config in effect and the endpoint it designates (starting scalebox-local if allowed and needed)."""
    config = config if config is not None else ScaleboxConfig.load()
    timeout = float(request_timeout if request_timeout is not None else config.request_timeout)
    idle = max(float(config.stream_idle_timeout), 0.0)
    key = api_key or config.api_key
    if key:
        url = (api_url or config.api_url or DEFAULT_CLOUD_URL).rstrip("/")
        verify: str | bool = config.ca_file or True
        if not config.ca_file and url.startswith("https://"):  # scalebox-local by URL, either scheme: its cert
            local = read_runtime_info()
            if local is not None and local.certfile and urlsplit(local.url).netloc == urlsplit(url).netloc:
                verify = local.certfile
        return config, Connection(url, key, verify, timeout, stream_idle_timeout=idle)
    wanted = (api_url or config.api_url or "").rstrip("/")
    info = read_runtime_info()
    # Only scalebox-local can do without a key (addressed by either scheme: its port answers both).
    if wanted and (info is None or urlsplit(info.url).netloc != urlsplit(wanted).netloc):
        raise AuthenticationError(
            f"No API key is set for {wanted}. Set SCALEBOX_API_KEY (or pass api_key=...), or unset "
            "SCALEBOX_API_URL / SBX_DOMAIN to use scalebox-local."
        )
    if info is None and config.local_autostart:
        info = await asyncio.to_thread(ensure_local_server, config.data_dir)
    if info is None:
        raise ServerUnavailable(
            "No Scalebox API key is set and scalebox-local is not running. Start it with `jupyter scalebox serve` "
            "(or set SCALEBOX_LOCAL_AUTOSTART=1), or set SCALEBOX_API_KEY to use the Scalebox cloud."
        )
    return config, Connection(
        wanted or info.url.rstrip("/"),
        info.api_key,
        config.ca_file or info.certfile or True,
        timeout,
        local=True,
        stream_idle_timeout=idle,
    )


def agent_url(connection: Connection, sandbox_domain: str) -> str:
    """The sandbox agent's base URL: the control plane's scheme when on the same host:port (or both on this
    machine, as the JS SDK does for localhost), https otherwise."""
    domain = sandbox_domain.strip().rstrip("/")
    if domain.startswith(("http://", "https://")):
        return domain
    api = urlsplit(connection.api_url)
    host_port = domain.split("/", 1)[0]
    same_origin = host_port.lower() == api.netloc.lower()
    host = urlsplit(f"//{host_port}").hostname or ""
    both_local = connection.is_loopback and host in ("127.0.0.1", "localhost", "::1")
    return f"{api.scheme if same_origin or both_local else 'https'}://{domain}"
