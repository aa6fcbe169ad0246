"""The kernel process: reads the connection file, binds the five channels, and serves ScaleboxKernel on them.

`python -m scalebox_kernel.kernel -f {connection_file} --language python` is what the kernelspecs run. Without
`-f`, the kernel picks its own ports and key and writes its connection file into Jupyter's runtime directory,
as `ipykernel` does, so that `jupyter console --existing` can reach it.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
from pathlib import Path
from typing import Any

import zmq
from traitlets import Unicode
from traitlets.config import Application

from ..config import ScaleboxConfig
from .base import KernelSockets
from .kernel import ScaleboxKernel
from .wire import Wire

#: The channels of a connection file, and each one's socket type.
CHANNELS = {"shell": zmq.ROUTER, "control": zmq.ROUTER, "stdin": zmq.ROUTER, "iopub": zmq.XPUB, "hb": zmq.ROUTER}


class ScaleboxKernelApp(Application):
    name = "scalebox-kernel"
    description = "A Jupyter kernel that runs every cell in a Scalebox sandbox."
    classes = [ScaleboxKernel, ScaleboxConfig]
    aliases = {
        "f": "ScaleboxKernelApp.connection_file",
        "language": "ScaleboxKernel.language",
        "ip": "ScaleboxKernelApp.ip",
        "transport": "ScaleboxKernelApp.transport",
    }

    connection_file = Unicode(
        config=True, help="The connection file (ports, key) the frontend wrote; without one the kernel writes its own."
    )
    ip = Unicode("127.0.0.1", config=True, help="The address to bind when the kernel writes its connection file.")
    transport = Unicode("tcp", config=True, help="tcp or ipc, when the kernel writes its connection file.")

    _wrote_connection = False

    def initialize(self, argv: Any = None) -> None:
        super().initialize(argv)
        # SIGINT is the interrupt the kernel itself installs once it serves; before that it must not kill it.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        info = self._connection()
        key = str(info.get("key", "")).encode()
        session = Wire(key, str(info.get("signature_scheme") or "hmac-sha256"))
        context: zmq.Context[Any] = zmq.Context()
        hb_context: zmq.Context[Any] = zmq.Context()
        sockets, ports = self._bind({channel: hb_context if channel == "hb" else context for channel in CHANNELS}, info)
        exists = bool(self.connection_file) and Path(self.connection_file).exists()
        if not exists or any(not info.get(f"{channel}_port") for channel in CHANNELS):
            self._write_connection(info, ports)  # a port left to the kernel is written back, as ipykernel does
            self._wrote_connection = not exists
        self.kernel = ScaleboxKernel(
            parent=self,
            session=session,
            sockets=KernelSockets(context=context, hb_context=hb_context, **sockets),
            ports=ports,
        )

    @property
    def abs_connection_file(self) -> str:
        return os.path.abspath(self.connection_file) if self.connection_file else ""

    def _connection(self) -> dict[str, Any]:
        if self.connection_file and Path(self.connection_file).exists():
            with open(self.connection_file, encoding="utf-8") as handle:
                info = json.load(handle)
            if not isinstance(info, dict):
                raise SystemExit(f"{self.connection_file} is not a Jupyter connection file (a JSON object)")
            return info
        return {"ip": self.ip, "transport": self.transport, "key": secrets.token_hex(32)}

    def _bind(
        self, contexts: dict[str, zmq.Context[Any]], info: dict[str, Any]
    ) -> tuple[dict[str, Any], dict[str, int]]:
        transport = str(info.get("transport") or "tcp")
        ip = str(info.get("ip") or "127.0.0.1")
        sockets: dict[str, Any] = {}
        ports: dict[str, int] = {}
        for channel, kind in CHANNELS.items():
            socket = contexts[channel].socket(kind)
            socket.linger = 1000
            if channel == "iopub":
                socket.sndhwm = 0  # a frontend that falls behind a flood gets all of it later, nothing dropped
                socket.setsockopt(zmq.XPUB_VERBOSE, 1)  # every subscriber is welcomed, not only a topic's first
            port = int(info.get(f"{channel}_port") or 0)
            if transport == "ipc":
                port = port or _free_ipc_port(ip)
                socket.bind(f"ipc://{ip}-{port}")
            elif port:
                socket.bind(f"tcp://{ip}:{port}")
            else:
                port = socket.bind_to_random_port(f"tcp://{ip}")
            sockets[channel] = socket
            ports[channel] = port
        return sockets, ports

    def _write_connection(self, info: dict[str, Any], ports: dict[str, int]) -> None:
        if not self.connection_file:
            from jupyter_core.paths import jupyter_runtime_dir

            runtime = Path(jupyter_runtime_dir())
            runtime.mkdir(mode=0o700, parents=True, exist_ok=True)
            self.connection_file = str(runtime / f"kernel-scalebox-{os.getpid()}.json")
        language = self.config.ScaleboxKernel.get("language", "python")
        content = {
            **info,
            **{f"{channel}_port": port for channel, port in ports.items()},
            "signature_scheme": info.get("signature_scheme") or "hmac-sha256",
            "kernel_name": info.get("kernel_name") or f"scalebox-{language}",
        }
        fd = os.open(self.connection_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            json.dump(content, handle, indent=1)
        self.log.info("To connect a client: --existing %s", os.path.basename(self.connection_file))

    def start(self) -> None:
        try:
            self.kernel.serve()
        finally:
            if self._wrote_connection:  # the kernel's own file goes with it, as ipykernel's does
                with contextlib.suppress(OSError):
                    os.remove(self.connection_file)


def _free_ipc_port(ip: str) -> int:
    port = 1
    while os.path.exists(f"{ip}-{port}"):
        port += 1
    return port


def main() -> None:
    ScaleboxKernelApp.launch_instance()
