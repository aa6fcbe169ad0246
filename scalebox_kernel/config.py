"""Settings shared by every door (kernel, magics, client, CLI): one traitlets object, each trait mirrored by an
environment variable named in its help, with `.env` in the working directory as a last resort."""

from __future__ import annotations

import os
from pathlib import Path

from dotenv import dotenv_values
from jupyter_core.paths import jupyter_data_dir
from traitlets import Bool, Enum, Float, Int, Unicode, default
from traitlets.config import Configurable

DEFAULT_CLOUD_URL = "https://api.scalebox.dev"


def _env(*names: str) -> str | None:
    """The first of `names` set in the environment, else in `./.env`."""
    for name in names:
        value = os.environ.get(name)
        if value:
            return value
    dotenv = _dotenv()
    for name in names:
        value = dotenv.get(name)
        if value:
            return value
    return None


def _dotenv() -> dict[str, str | None]:
    path = Path.cwd() / ".env"
    return dotenv_values(path) if path.is_file() else {}


class ScaleboxConfig(Configurable):
    """Where sandboxes live and how long things may take."""

    api_key = Unicode(
        None,
        allow_none=True,
        config=True,
        help="Scalebox API key. With one, sandboxes run in the Scalebox cloud (or at api_url); without one, on "
        "scalebox-local. Env: SCALEBOX_API_KEY (or SBX_API_KEY).",
    )

    @default("api_key")
    def _default_api_key(self) -> str | None:
        return _env("SCALEBOX_API_KEY", "SBX_API_KEY")

    api_url = Unicode(
        None,
        allow_none=True,
        config=True,
        help="Base URL of the control plane, without /v1 (e.g. https://api.scalebox.dev). "
        "Env: SCALEBOX_API_URL, or SBX_DOMAIN as the Python SDK spells it (host[:port]/v1).",
    )

    @default("api_url")
    def _default_api_url(self) -> str | None:
        url = _env("SCALEBOX_API_URL")
        if url:
            return url.rstrip("/")
        domain = _env("SBX_DOMAIN")
        if domain:
            domain = domain.strip("/")
            if domain.endswith("/v1"):
                domain = domain[: -len("/v1")]
            return domain if "://" in domain else f"https://{domain}"
        return None

    ca_file = Unicode(
        None,
        allow_none=True,
        config=True,
        help="PEM file of certificates to trust for HTTPS (scalebox-local's own certificate, say). "
        "Env: SCALEBOX_CA_FILE; SSL_CERT_FILE is honoured as usual.",
    )

    @default("ca_file")
    def _default_ca_file(self) -> str | None:
        return _env("SCALEBOX_CA_FILE")

    request_timeout = Float(
        30.0,
        config=True,
        help="Seconds one HTTP request may take (not a cell: cells have execution_timeout). "
        "Env: SCALEBOX_REQUEST_TIMEOUT.",
    )

    @default("request_timeout")
    def _default_request_timeout(self) -> float:
        return float(_env("SCALEBOX_REQUEST_TIMEOUT") or 30.0)

    stream_idle_timeout = Float(
        60.0,
        config=True,
        help="Seconds a stream (a running cell, a command's output, a directory watch) may carry nothing, not even "
        "a keepalive, before the server counts as gone and the call fails with ServerUnavailable; 0 means wait "
        "forever. Keep it well above the server's keepalive interval (the client asks for one every quarter of "
        "it). Env: SCALEBOX_STREAM_IDLE_TIMEOUT.",
    )

    @default("stream_idle_timeout")
    def _default_stream_idle_timeout(self) -> float:
        return float(_env("SCALEBOX_STREAM_IDLE_TIMEOUT") or 60.0)

    execution_timeout = Float(
        0.0,
        config=True,
        help="Seconds a cell may run before it is interrupted; 0 means no limit. Env: SCALEBOX_EXECUTION_TIMEOUT.",
    )

    @default("execution_timeout")
    def _default_execution_timeout(self) -> float:
        return float(_env("SCALEBOX_EXECUTION_TIMEOUT") or 0.0)

    channel = Enum(
        ["auto", "jupyter", "execute"],
        "auto",
        config=True,
        help="How the Scalebox kernel reaches the sandbox's kernel: `jupyter`, the sandbox's Jupyter endpoint (every "
        "message: widgets, input(), clear_output, completion); `execute`, the ExecutionService path (stdout, stderr, "
        "results and errors only); `auto`, the endpoint where the back end has one. Env: SCALEBOX_CHANNEL.",
    )

    @default("channel")
    def _default_channel(self) -> str:
        value = (_env("SCALEBOX_CHANNEL") or "auto").strip().lower()
        return value if value in ("auto", "jupyter", "execute") else "auto"

    reconnect_timeout = Float(
        60.0,
        config=True,
        help="Seconds the Scalebox kernel keeps trying to re-open a dropped connection to the sandbox's kernel "
        "before the running cell fails. Env: SCALEBOX_RECONNECT_TIMEOUT.",
    )

    @default("reconnect_timeout")
    def _default_reconnect_timeout(self) -> float:
        return float(_env("SCALEBOX_RECONNECT_TIMEOUT") or 60.0)

    sandbox_timeout = Int(
        300,
        config=True,
        help="Seconds a new sandbox lives before it is killed, unless extended. Env: SCALEBOX_SANDBOX_TIMEOUT.",
    )

    @default("sandbox_timeout")
    def _default_sandbox_timeout(self) -> int:
        return int(_env("SCALEBOX_SANDBOX_TIMEOUT") or 300)

    template = Unicode(
        "code-interpreter",
        config=True,
        help="Template of new sandboxes. Env: SCALEBOX_TEMPLATE.",
    )

    @default("template")
    def _default_template(self) -> str:
        return _env("SCALEBOX_TEMPLATE") or "code-interpreter"

    data_dir = Unicode(
        config=True,
        help="Where scalebox-local keeps its database, certificates and sandbox files. Env: SCALEBOX_DATA_DIR.",
    )

    @default("data_dir")
    def _default_data_dir(self) -> str:
        return _env("SCALEBOX_DATA_DIR") or os.path.join(jupyter_data_dir(), "scalebox")

    local_autostart = Bool(
        True,
        config=True,
        help="Start scalebox-local in the background when no API key is set and it is not running. "
        "Env: SCALEBOX_LOCAL_AUTOSTART (0 to disable).",
    )

    @default("local_autostart")
    def _default_local_autostart(self) -> bool:
        return (_env("SCALEBOX_LOCAL_AUTOSTART") or "1").lower() not in ("0", "false", "no", "off")

    @property
    def uses_cloud(self) -> bool:
        return bool(self.api_key)

    def secrets(self) -> list[str]:
        """Values that must never appear in output or logs."""
        return [s for s in (self.api_key,) if s]
