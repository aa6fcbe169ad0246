"""scalebox-local's ASGI app, and `jupyter scalebox serve`, which runs it with uvicorn on loopback."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import os
import re
import secrets
import socket
import ssl
import sys
from collections.abc import Iterator
from pathlib import Path

import uvicorn
from jupyter_core.application import JupyterApp
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from traitlets import Bool, Integer, Unicode, default

from .. import __version__
from ..config import ScaleboxConfig
from ..local import API_KEY_ENV, LocalServerInfo, remove_runtime_info, runtime_file, write_runtime_info
from .bodies import error_response
from .datalock import DataDirBusy, DataDirLock
from .isolation.jail import LINKS_DIR
from .isolation.sandbox import describe, describe_object_storage
from .jupyter_api import JupyterPlane
from .listener import DualSchemeListener
from .ports import HostForm, PortForwarding
from .rest import ControlPlane
from .rpc import AgentPlane
from .sandboxes import SandboxManager
from .scrub import register_data_dir
from .settings import ServerSettings
from .tls import ensure_self_signed

log = logging.getLogger("scalebox_kernel.server")


def create_app(settings: ServerSettings, manager: SandboxManager, api_key: str) -> Starlette:
    """The whole server: control plane under /v1, every sandbox's agent under /sbx/<id>, and /health."""

    async def health(request: Request) -> Response:
        return JSONResponse({"status": "ok", "version": __version__})

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        if exc.status_code == 404:
            return error_response(404, f"no such endpoint: {request.method} {request.url.path}")
        if exc.status_code == 405:
            return error_response(405, f"method {request.method} is not allowed on {request.url.path}")
        return error_response(exc.status_code, str(exc.detail))

    async def internal_error(request: Request, exc: Exception) -> Response:
        return error_response(500, f"internal error: {type(exc).__name__}")

    routes: list[BaseRoute] = [Route("/health", health, methods=["GET", "HEAD"])]
    routes += ControlPlane(manager, api_key).routes()
    if settings.jupyter_endpoint:
        routes += JupyterPlane(manager, settings).routes()
    routes += PortForwarding(manager, settings).routes()  # before the agent's /sbx/<id>/<service>/<method>
    routes += AgentPlane(manager, settings).routes()
    return Starlette(
        routes=routes,
        middleware=[Middleware(CatchAll), Middleware(HostForm, public_host=manager.public_host)],
        exception_handlers={HTTPException: http_error, 500: internal_error},
    )


class CatchAll:
    """Any exception a handler lets out becomes a JSON 500 naming only its type (the traceback goes to the log).

    No exception reaches Starlette's ServerErrorMiddleware, which would re-raise it to uvicorn, which then drops
    the client's keep-alive connection."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = ended = False

        async def watched_send(message: Message) -> None:
            nonlocal started, ended
            if message["type"] == "http.response.start":
                started = True
            elif message["type"] == "http.response.body" and not message.get("more_body", False):
                ended = True
            await send(message)

        try:
            await self.app(scope, receive, watched_send)
        except ClientDisconnect:  # the client left mid-request: nobody to answer
            log.debug("%s %s: the client went away", scope.get("method"), scope.get("path"))
        except Exception as exc:
            log.error("%s %s failed", scope.get("method"), scope.get("path"), exc_info=exc)
            if not started:
                reply = error_response(500, f"internal error ({type(exc).__name__}); the server log has the details")
                with contextlib.suppress(Exception):  # the client may be gone
                    await reply(scope, receive, send)
            elif not ended:  # half a body went out already: end it there (the client sees it cut short)
                with contextlib.suppress(Exception):
                    await send({"type": "http.response.body", "body": b"", "more_body": False})


def _is_loopback(ip: str) -> bool:
    if ip == "localhost":
        return True
    try:
        return ipaddress.ip_address(ip).is_loopback
    except ValueError:
        return False


def _url_host(ip: str) -> str:
    """How clients on this machine reach a server bound to `ip`."""
    if ip in ("", "0.0.0.0", "localhost"):
        return "127.0.0.1"
    if ip == "::":
        return "[::1]"
    return f"[{ip}]" if ":" in ip else ip


def _bind(ip: str, port: int) -> socket.socket:
    host = "127.0.0.1" if ip == "localhost" else ip
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)  # proto set: asyncio then sets TCP_NODELAY
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.set_inheritable(False)
    return sock


class _Server(uvicorn.Server):
    """uvicorn on one port for both schemes (server/listener.py), minus re-raising SIGTERM/SIGINT after shutdown:
    we still have kernels to stop then."""

    def __init__(self, config: uvicorn.Config, ssl_context: ssl.SSLContext | None) -> None:
        super().__init__(config)
        self._ssl_context = ssl_context

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets=[])  # the lifespan and server state, no listener of uvicorn's own

        def create_protocol() -> asyncio.Protocol:
            return self.config.http_protocol_class(  # type: ignore[call-arg]
                config=self.config, server_state=self.server_state, app_state=self.lifespan.state
            )

        for sock in sockets or []:
            listener = DualSchemeListener(sock, create_protocol, self._ssl_context, self.config.backlog)
            listener.start()
            self.servers.append(listener)  # type: ignore[arg-type]

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        import signal
        import threading

        if threading.current_thread() is not threading.main_thread():
            yield
            return
        handled = (signal.SIGINT, signal.SIGTERM)
        original = {sig: signal.signal(sig, self.handle_exit) for sig in handled}
        try:
            yield
        finally:
            for sig, handler in original.items():
                signal.signal(sig, handler)


class ServeApp(JupyterApp):
    """`jupyter scalebox serve`: scalebox-local, the embedded sandbox server, on loopback."""

    name = "jupyter-scalebox-serve"
    version = __version__
    description = "Start scalebox-local, an embedded sandbox server speaking the Scalebox wire protocol."
    classes = [ServerSettings, ScaleboxConfig]

    aliases = {
        **JupyterApp.aliases,
        "ip": "ServeApp.ip",
        "port": "ServeApp.port",
        "api-key": "ServeApp.api_key",  # parsed only to refuse it with a clear message (see start)
        "api-key-file": "ServeApp.api_key_file",
        "certfile": "ServeApp.certfile",
        "keyfile": "ServeApp.keyfile",
        "data-dir": "ServerSettings.data_dir",
        "log-level": "Application.log_level",
    }
    flags = {
        **JupyterApp.flags,
        "tls": (
            {"ServeApp": {"tls": True}},
            "Point clients at https:// (the runtime file's URL); both schemes answer on the port either way.",
        ),
        "replace": (
            {"ServeApp": {"replace": True}},
            "If a scalebox-local already serves this data dir, stop it (SIGTERM) and take its place.",
        ),
        "no-isolation": (
            {"ServerSettings": {"isolation": "none"}},
            "Run sandbox code on the host, unconfined (as without bubblewrap); allow_internet_access=false is then "
            "refused.",
        ),
    }

    ip = Unicode("127.0.0.1", config=True, help="Address to listen on (loopback unless an API key is given).")
    port = Integer(0, config=True, help="Port to listen on; 0 picks a free one.")
    api_key = Unicode(
        "",
        config=True,
        help="API key clients must send as X-API-KEY (or as Authorization: Bearer); generated when empty (see the "
        f"runtime file). Env: {API_KEY_ENV}. Never on the command line: use --api-key-file.",
    )
    api_key_file = Unicode(
        "", config=True, help="File holding the API key (its first line); it must not be readable by other users."
    )

    @default("api_key")
    def _default_api_key(self) -> str:
        return os.environ.get(API_KEY_ENV, "")

    certfile = Unicode(
        "", config=True, help="PEM certificate for HTTPS; by default a self-signed one, made once in the data dir."
    )
    keyfile = Unicode("", config=True, help="PEM private key of --certfile.")
    replace = Bool(
        False,
        config=True,
        help="Stop the scalebox-local already serving this data dir and take its place (else a second one refuses "
        "to start, naming the first).",
    )
    tls = Bool(
        False,
        config=True,
        help="Name the https:// URL in the runtime file. HTTP and HTTPS both answer on the one port regardless: a "
        "connection that starts with a TLS handshake is served over TLS.",
    )

    @default("config_file_name")
    def _default_config_file_name(self) -> str:
        return "jupyter_scalebox_config"

    def start(self) -> None:
        super().start()
        if "api_key" in self.cli_config.get("ServeApp", {}):
            self.log.critical(
                "An API key on the command line is visible to every user of this machine (ps). Put it in a file "
                "only you can read and pass --api-key-file FILE, or set %s.",
                API_KEY_ENV,
            )
            self.exit(2)
        if self.api_key_file:
            self.api_key = self._read_key_file(self.api_key_file)
        if not _is_loopback(self.ip) and not self.api_key:
            self.log.critical(
                "Refusing to listen on %s without an API key: anyone who can reach that address could run code "
                "here. Pass --api-key-file FILE or set %s (and use --tls or --certfile/--keyfile), or listen on "
                "127.0.0.1.",
                self.ip,
                API_KEY_ENV,
            )
            self.exit(2)
        if bool(self.certfile) != bool(self.keyfile):
            self.log.critical("--certfile and --keyfile go together; pass both, or --tls for a self-signed pair.")
            self.exit(2)
        _setup_logging()
        # Relative paths are the caller's: resolved now, before the server works from its data dir.
        self.certfile, self.keyfile = (os.path.abspath(path) if path else "" for path in (self.certfile, self.keyfile))
        settings = ServerSettings(parent=self)
        data = settings.data_path
        lock = DataDirLock(data)
        try:
            data.mkdir(parents=True, exist_ok=True)
            os.chmod(data, 0o700)
            lock.acquire(self.replace)
            # The server's working directory is its data dir: not the folder it was started from (a notebook's,
            # which may be deleted under it).
            os.chdir(data)
        except DataDirBusy as exc:
            self.log.critical("%s", exc)
            self.exit(1)
        except OSError as exc:
            self.log.critical("scalebox-local could not start: %s", exc)
            self.exit(1)
        try:
            asyncio.run(self._serve(settings, lock))
        except OSError as exc:
            self.log.critical("scalebox-local could not start: %s", exc)
            self.exit(1)
        finally:
            lock.release()

    def _read_key_file(self, path: str) -> str:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            with os.fdopen(fd) as handle:
                if os.fstat(handle.fileno()).st_mode & 0o077:
                    self.log.critical("%s is readable by other users; chmod 600 it first.", path)
                    self.exit(2)
                key = handle.readline().strip()
        except OSError as exc:
            self.log.critical("Cannot read the API key file %s: %s", path, exc.strerror or exc)
            self.exit(2)
        if not key:
            self.log.critical("The API key file %s is empty.", path)
            self.exit(2)
        return key

    async def _serve(self, settings: ServerSettings, lock: DataDirLock) -> None:
        data = settings.data_path
        register_data_dir(data)
        register_data_dir(LINKS_DIR)
        api_key = self.api_key or secrets.token_urlsafe(32)
        certfile, keyfile = self.certfile, self.keyfile
        if not certfile:
            cert, key = ensure_self_signed(data / "tls")
            certfile, keyfile = str(cert), str(key)
        ssl_context = _ssl_context(certfile, keyfile)
        sock = _bind(self.ip, self.port)
        port = sock.getsockname()[1]
        host = _url_host(self.ip)
        # Both schemes answer on the port; the runtime file names the one clients are pointed at by default.
        url = f"{'https' if self.tls or self.certfile else 'http'}://{host}:{port}"
        manager = SandboxManager(settings, public_host=settings.public_host or f"{host}:{port}")
        await manager.start()
        config = uvicorn.Config(
            create_app(settings, manager, api_key),
            log_level="warning",
            access_log=False,
            timeout_graceful_shutdown=3,
            lifespan="off",
            http="h11",
            ws="websockets-sansio",
            ws_max_size=settings.max_request_bytes,
            ws_per_message_deflate=False,  # a 20 MB plot is not worth compressing on loopback
            ws_ping_interval=20.0,
            ws_ping_timeout=20.0,
            loop="asyncio",
            server_header=False,
        )
        server = _Server(config, ssl_context)
        pid = os.getpid()
        task = asyncio.create_task(server.serve(sockets=[sock]))
        try:
            while not server.started and not task.done():
                await asyncio.sleep(0.02)
            if server.started:
                lock.announce(url)
                write_runtime_info(LocalServerInfo(url, api_key, certfile, pid, str(data)))
                self._announce(url, certfile, data, describe(settings), describe_object_storage(settings))
            await task
        finally:
            remove_runtime_info(pid)
            await manager.close()
            log.info("scalebox-local stopped")

    def _announce(self, url: str, certfile: str, data: Path, protections: str, storage: str) -> None:
        print(f"scalebox-local {__version__} serving at {url}", flush=True)
        print(f"  HTTP and HTTPS on this port; certificate: {certfile}", flush=True)
        print(f"  data dir: {data}", flush=True)
        print(f"  {protections}", flush=True)
        print(f"  {storage}", flush=True)
        print(f"  API key and URL for clients: {runtime_file()}", flush=True)


def _ssl_context(certfile: str, keyfile: str) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(certfile, keyfile)
    context.set_alpn_protocols(["http/1.1"])
    return context


class _RedactTokens(logging.Filter):
    """uvicorn logs a WebSocket's path with its query (browsers put `?token=` there): never the token."""

    _TOKEN = re.compile(r"(token=)[^&\s\"']+", re.IGNORECASE)

    def filter(self, record: logging.LogRecord) -> bool:
        if record.args:
            record.msg, record.args = record.getMessage(), None
        record.msg = self._TOKEN.sub(r"\1[redacted]", str(record.msg))
        return True


def _setup_logging() -> None:
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logging.getLogger(name).addFilter(_RedactTokens())
    logger = logging.getLogger("scalebox_kernel")
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("[scalebox-local %(levelname)s] %(message)s"))
        logger.addHandler(handler)
    logger.setLevel(logging.INFO)
