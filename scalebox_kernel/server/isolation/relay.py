"""Relay for kernels that cannot speak Jupyter's IPC transport (jjava, deno, tslab), run inside a sandbox.

    python3 relay.py CONNECTION_FILE -- KERNEL_ARGV...

CONNECTION_FILE is an IPC connection file (unix sockets `<ip>-<port>` in a directory the server also sees).
The relay writes a TCP twin of it (same key, free ports on the sandbox's own loopback), starts the kernel with
that file in place of the original in its argv, and forwards each unix-socket connection to the kernel's TCP
port (ZMTP is the same byte stream over both). It exits with the kernel. Standard library only: it runs on
whatever Python the sandbox has.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Awaitable, Callable

CHANNELS = ("shell", "iopub", "stdin", "control", "hb")
CONNECT_TIMEOUT = 60.0  # seconds a connection waits for the kernel to listen
CHUNK = 65536


def free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def tcp_twin(path: str) -> tuple[dict[str, int], dict[str, int], str]:
    """(unix port per channel, tcp port per channel, path of the TCP connection file written next to `path`)."""
    with open(path) as handle:
        info = json.load(handle)
    if info.get("transport") != "ipc":
        raise SystemExit(f"relay: {path} is not an IPC connection file")
    unix_ports = {name: int(info[f"{name}_port"]) for name in CHANNELS}
    tcp_ports = dict(zip(CHANNELS, free_ports(len(CHANNELS)), strict=True))
    twin = dict(info, transport="tcp", ip="127.0.0.1", **{f"{n}_port": p for n, p in tcp_ports.items()})
    twin_path = path[: -len(".json")] if path.endswith(".json") else path
    twin_path += "-tcp.json"
    fd = os.open(twin_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        json.dump(twin, handle)
    return unix_ports, tcp_ports, twin_path


async def pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(CHUNK):
            writer.write(data)
            await writer.drain()
    except (ConnectionError, OSError):
        pass
    finally:
        with contextlib.suppress(Exception):
            writer.close()


async def connect_kernel(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + CONNECT_TIMEOUT
    while True:
        try:
            return await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            if loop.time() > deadline:
                raise
            await asyncio.sleep(0.05)


def forwarder(port: int) -> Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            kernel_reader, kernel_writer = await connect_kernel(port)
        except OSError:
            writer.close()
            return
        await asyncio.gather(pump(reader, kernel_writer), pump(kernel_reader, writer))

    return handle


async def relay(connection_file: str, argv: list[str]) -> int:
    with open(connection_file) as handle:
        ip = json.load(handle)["ip"]
    unix_ports, tcp_ports, twin_path = tcp_twin(connection_file)
    kernel_argv = [twin_path if arg == connection_file else arg for arg in argv]
    loop = asyncio.get_running_loop()
    # A handler (not SIG_IGN) keeps SIGINT from killing the relay, while the kernel still gets its default.
    loop.add_signal_handler(signal.SIGINT, lambda: None)
    kernel = subprocess.Popen(kernel_argv)
    loop.add_signal_handler(signal.SIGTERM, kernel.terminate)
    servers = []
    paths = []
    try:
        for name in CHANNELS:
            path = f"{ip}-{unix_ports[name]}"
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
            servers.append(await asyncio.start_unix_server(forwarder(tcp_ports[name]), path=path))
            paths.append(path)
        return await asyncio.to_thread(kernel.wait)
    finally:
        for server in servers:
            server.close()
        for path in [*paths, twin_path]:
            with contextlib.suppress(OSError):
                os.unlink(path)
        if kernel.poll() is None:
            kernel.kill()


def main() -> None:
    args = sys.argv[1:]
    if len(args) < 3 or args[1] != "--":
        raise SystemExit("usage: relay.py CONNECTION_FILE -- KERNEL_ARGV...")
    code = asyncio.run(relay(args[0], args[2:]))
    sys.exit(code if code >= 0 else 128 - code)


if __name__ == "__main__":
    main()
