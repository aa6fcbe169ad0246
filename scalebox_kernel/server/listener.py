"""One port, both schemes: each accepted connection is served as HTTPS if its first byte starts a TLS handshake
(0x16), else as plain HTTP.

The seed JS SDK speaks plain HTTP for RPCs to a sandbox domain containing `127.0.0.1` but HTTPS for `/health` and
the file routes on the very same host and port (PROTOCOL.md 2.1, 8.1), and the Python SDK speaks only HTTPS, so
scalebox-local must answer both on its one port. The byte is peeked, never read, so the TLS layer (or the HTTP
parser) sees the connection from its start.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import socket
import ssl
from collections.abc import Callable

log = logging.getLogger(__name__)

TLS_HANDSHAKE = 0x16
#: A connection that sends nothing for this long is closed (browsers open spare connections and may leave them).
FIRST_BYTE_TIMEOUT = 30.0
HANDSHAKE_TIMEOUT = 10.0


class DualSchemeListener:
    """Accepts on a listening socket and hands each connection to `protocol_factory`, over TLS when it asks.

    Quacks like the `asyncio.Server` uvicorn keeps in `Server.servers` (it only calls `close()`)."""

    def __init__(
        self,
        sock: socket.socket,
        protocol_factory: Callable[[], asyncio.Protocol],
        ssl_context: ssl.SSLContext | None,
        backlog: int = 2048,
    ) -> None:
        self._sock = sock
        self._factory = protocol_factory
        self._ssl = ssl_context
        self._backlog = backlog
        self._accepting: asyncio.Task[None] | None = None
        self._pending: set[asyncio.Task[None]] = set()

    def start(self) -> None:
        self._sock.setblocking(False)
        self._sock.listen(self._backlog)
        self._accepting = asyncio.get_running_loop().create_task(self._accept_loop())

    def close(self) -> None:
        """Stop accepting; connections already handed over are uvicorn's to shut down."""
        if self._accepting is not None:
            self._accepting.cancel()
        for task in self._pending:
            task.cancel()

    async def wait_closed(self) -> None:
        tasks = [t for t in (self._accepting, *self._pending) if t is not None]
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _accept_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                conn, _ = await loop.sock_accept(self._sock)
            except OSError as exc:
                # Out of file descriptors (or the like): say so, and keep serving those already connected.
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    log.warning("cannot accept a connection: %s", exc.strerror or exc)
                    await asyncio.sleep(0.1)
                    continue
                if exc.errno in (errno.ECONNABORTED, errno.EPROTO, errno.EINTR):
                    continue
                raise
            task = loop.create_task(self._hand_over(conn))
            self._pending.add(task)
            task.add_done_callback(self._pending.discard)

    async def _hand_over(self, conn: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        try:
            conn.setblocking(False)
            first = await asyncio.wait_for(_peek(loop, conn), FIRST_BYTE_TIMEOUT)
            if not first:
                conn.close()
                return
            use_tls = first[0] == TLS_HANDSHAKE and self._ssl is not None
            await loop.connect_accepted_socket(
                self._factory,
                conn,
                ssl=self._ssl if use_tls else None,
                ssl_handshake_timeout=HANDSHAKE_TIMEOUT if use_tls else None,
            )
        except (OSError, TimeoutError, ssl.SSLError) as exc:
            # A client that hung up, sent nothing, or failed its handshake (an untrusted certificate, say).
            log.debug("connection dropped before HTTP: %r", exc)
            with contextlib.suppress(OSError):
                conn.close()
        except asyncio.CancelledError:
            with contextlib.suppress(OSError):
                conn.close()
            raise


async def _peek(loop: asyncio.AbstractEventLoop, conn: socket.socket) -> bytes:
    """The connection's first byte, left in the socket for whoever reads it next; b"" if it closed."""
    while True:
        try:
            return conn.recv(1, socket.MSG_PEEK)
        except BlockingIOError:
            pass
        readable: asyncio.Future[None] = loop.create_future()
        fd = conn.fileno()
        loop.add_reader(fd, _set_once, readable)
        try:
            await readable
        finally:
            loop.remove_reader(fd)


def _set_once(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)
