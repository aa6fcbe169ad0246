"""Shared fixtures: a real scalebox-local started as a subprocess on loopback, with isolated Jupyter paths."""

from __future__ import annotations

import dataclasses
import os
import secrets
import signal
import ssl
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from scalebox_kernel.kernel import zygote
from scalebox_kernel.local import spawn_local_server

REPO = Path(__file__).resolve().parent.parent

# Nothing from the user's environment may steer the tests to another server or leak a real key (where the
# browser tests keep their screenshots is the one setting that may come in).
for _name in list(os.environ):
    steers = _name.startswith(("SCALEBOX_", "SBX_")) and _name != "SCALEBOX_ARTIFACTS"
    if steers or _name in ("SSL_CERT_FILE", "JUPYTER_RUNTIME_DIR", "JUPYTER_PATH"):
        del os.environ[_name]


@pytest.fixture(scope="session", autouse=True)
def isolated_jupyter(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Jupyter's runtime, data and config dirs in a temporary folder for the whole session."""
    root = tmp_path_factory.mktemp("jupyter")
    saved = dict(os.environ)
    os.environ["JUPYTER_RUNTIME_DIR"] = str(root / "runtime")
    os.environ["JUPYTER_DATA_DIR"] = str(root / "data")
    os.environ["JUPYTER_CONFIG_DIR"] = str(root / "config")
    os.environ["IPYTHONDIR"] = str(root / "ipython")
    os.environ["SCALEBOX_DATA_DIR"] = str(root / "scalebox-default")
    os.environ["SCALEBOX_LOCAL_AUTOSTART"] = "0"  # tests start their servers explicitly
    os.environ["SCALEBOX_LOCAL_POOL_SIZE"] = "0"  # the pool only where a test asks for it (test_pool.py)
    os.environ.setdefault("MPLBACKEND", "agg")
    # The kernels' zygote (kernel/zygote.py) of this session: its own, stopped at the end.
    os.environ["SCALEBOX_ZYGOTE_DIR"] = str(root / "zygote")
    yield root
    zygote.stop(root / "zygote")
    os.environ.clear()
    os.environ.update(saved)


@dataclass
class LocalServer:
    """A running scalebox-local: where it listens, its key, its certificate, and how to stop or restart it."""

    url: str
    api_key: str
    certfile: str | None
    data_dir: Path
    runtime_dir: Path
    process: subprocess.Popen[bytes]
    log: Path
    argv: list[str] = field(default_factory=list)

    @property
    def verify(self) -> str | bool:
        return self.certfile or False

    def client(self) -> httpx.Client:
        """A plain HTTP client for the control plane with the key set (for protocol-level tests)."""
        verify = ssl.create_default_context(cafile=self.certfile) if self.certfile else True  # str is deprecated
        return httpx.Client(base_url=self.url, headers={"X-API-KEY": self.api_key}, verify=verify)

    def env(self) -> dict[str, str]:
        """Environment that points our client (and kernels started by tests) at this server."""
        env = {"SCALEBOX_API_URL": self.url, "SCALEBOX_API_KEY": self.api_key}
        if self.certfile:
            env["SCALEBOX_CA_FILE"] = self.certfile
        return env

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def sandbox_ids(self) -> set[str]:
        """The ids `GET /v1/sandboxes` lists (what has a record: never a pooled sandbox)."""
        with self.client() as http:
            listed = http.get("/v1/sandboxes").raise_for_status().json()["data"]["sandboxes"]
            return {s["sandbox_id"] for s in listed}

    def pool(self) -> dict[str, Any]:
        """The warm pool's status (GET /v1/pool)."""
        with self.client() as http:
            found: dict[str, Any] = http.get("/v1/pool").raise_for_status().json()["data"]
            return found

    def wait_pool(self, ready: int, timeout: float = 90.0) -> dict[str, Any]:
        """The pool's status once it holds `ready` sandboxes (bounded)."""
        deadline = time.monotonic() + timeout
        status = self.pool()
        while status["ready"] != ready and time.monotonic() < deadline:
            time.sleep(0.2)
            status = self.pool()
        assert status["ready"] == ready, status
        return status


def start_local_server(
    data_dir: Path, *, tls: bool = False, api_key: str | None = None, extra: list[str] | None = None, port: int = 0
) -> LocalServer:
    """Start `jupyter scalebox serve` on a free loopback port and wait until it answers."""
    api_key = api_key or "test-" + secrets.token_hex(16)
    runtime_dir = data_dir / "runtime"
    log = data_dir / "server.log"
    proc, info = spawn_local_server(
        data_dir=data_dir, runtime_dir=runtime_dir, api_key=api_key, tls=tls, extra_args=extra, log_path=log, port=port
    )
    server = LocalServer(
        url=info.url,
        api_key=api_key,
        certfile=info.certfile,
        data_dir=data_dir,
        runtime_dir=runtime_dir,
        process=proc,
        log=log,
        argv=proc.args if isinstance(proc.args, list) else [],
    )
    with server.client() as http:
        for _ in range(100):
            try:
                if http.get("/v1/scalebox-regions").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.05)
    return server


@pytest.fixture(scope="session")
def server_factory(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[..., LocalServer]]:
    """Start extra servers (own data dir each); all are stopped at the end of the session."""
    started: list[LocalServer] = []

    def factory(*, tls: bool = False, data_dir: Path | None = None, **kwargs: object) -> LocalServer:
        server = start_local_server(data_dir or tmp_path_factory.mktemp("scalebox"), tls=tls, **kwargs)  # type: ignore[arg-type]
        started.append(server)
        return server

    yield factory
    for server in started:
        server.stop()


@pytest.fixture(scope="session")
def local_server(server_factory: Callable[..., LocalServer]) -> LocalServer:
    """scalebox-local over plain HTTP, shared by the session."""
    return server_factory(tls=False)


@pytest.fixture(scope="session")
def local_server_tls(local_server: LocalServer) -> LocalServer:
    """The same scalebox-local, addressed over HTTPS (its one port answers both schemes) with its certificate."""
    return dataclasses.replace(local_server, url=local_server.url.replace("http://", "https://", 1))


@pytest.fixture(scope="module")
def http(local_server: LocalServer) -> Iterator[httpx.Client]:
    """A control-plane HTTP client for `local_server`, with the API key set."""
    with local_server.client() as client:
        client.timeout = httpx.Timeout(60)
        yield client
