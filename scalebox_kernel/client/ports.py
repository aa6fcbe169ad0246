"""Addresses of a sandbox's own TCP ports (`get_host`, `get_url`), as each back end routes them.

scalebox-local's `sandbox_domain` carries a path (`127.0.0.1:<port>/sbx/<id>`): one server port for every sandbox,
so port N is the path `<domain>/port/N`. For a browser, port N also has an origin of its own there,
`N-<id>.localhost:<port>` (browsers resolve `*.localhost` to loopback; Python and curl do not, hence the path form
for programs). A domain without a path is a cloud ingress, which names port N as the JS SDK's `getHost(N)` does:
`N-<domain>`.
"""

from __future__ import annotations

from urllib.parse import quote, urlsplit

from ..errors import InvalidArgument


def port_host(sandbox_domain: str, port: int) -> str:
    """Host (and, on scalebox-local, path) that reaches `port` inside the sandbox, without a scheme."""
    if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
        raise InvalidArgument(f"port must be a TCP port number (1-65535), not {port!r}")
    domain = sandbox_domain.strip().rstrip("/").split("://", 1)[-1]
    if "/" in domain:
        return f"{domain}/port/{port}"
    return f"{port}-{domain}"


def port_origin(sandbox_domain: str, port: int) -> str | None:
    """scalebox-local's own origin for `port` of the sandbox (`N-<id>.localhost:<server port>`); None on a cloud,
    whose `N-<domain>` is an origin already."""
    domain = port_host(sandbox_domain, port).removesuffix(f"/port/{port}")
    server, _, place = domain.partition("/sbx/")
    if not place or "/" in place:
        return None
    _, colon, server_port = server.rpartition(":")
    return f"{port}-{place.lower()}.localhost" + (f":{server_port}" if colon and server_port.isdigit() else "")


def port_url(agent_url: str, host: str, path: str, token: str | None) -> str:
    """The full URL of `path` on a port's `host`, in the agent's scheme; with `token` as `?token=` when given."""
    scheme = urlsplit(agent_url).scheme or "https"
    url = f"{scheme}://{host}/{path.lstrip('/')}"
    if token:
        url += ("&" if "?" in path else "?") + f"token={quote(token, safe='')}"
    return url
