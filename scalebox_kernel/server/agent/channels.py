"""A kernel's Jupyter channels, bridged to WebSocket clients (the sandbox's Jupyter endpoint, PROTOCOL.md 11).

Each client session (the `session_id` of `/api/kernels/<id>/channels`) gets ZMQ sockets of its own on the kernel:
shell, control and stdin DEALERs sharing one identity (the kernel sends `input_request` to the identity that
sent the execute request) and an iopub SUB. Messages pass as their JSON bytes, re-signed with the kernel's key on
the way in and never parsed on the way out. The sockets outlive a dropped WebSocket: what the kernel sends
meanwhile (output, replies, input requests) is kept for `KEEP_FOR` seconds, up to `budget` bytes, and replayed
when the same session reconnects. A session that outgrows its budget, or whose client stays away longer, is
closed: its client then reconnects to a new session, and learns that what was sent in between is lost.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from typing import Any, Protocol

import zmq
import zmq.asyncio
from jupyter_client.session import Session

from ...protocol.jupyter_ws import WireMessage
from .iopub import DELIMITER, MAX_MESSAGE

log = logging.getLogger(__name__)

#: Seconds a client session's sockets and kept messages wait for it to reconnect.
KEEP_FOR = 120.0
#: Client sessions one kernel keeps (connected or waiting); the oldest waiting one goes first beyond it.
MAX_SESSIONS = 16
#: Seconds the iopub subscription of a new session may take to reach the kernel (it is nudged meanwhile).
SUBSCRIBE_WAIT = 10.0
#: Seconds a barrier may take to come back before a cell's held idle goes on anyway (kernels that send late).
BARRIER_WAIT = 2.0
#: Seconds the iopub messages of those nudges are still told apart from the client's own.
NUDGE_LINGER = 5.0
#: WebSocket close codes: the kernel (or its sandbox) is gone for good; another connection took the session over.
CLOSE_GONE = 4004
CLOSE_REPLACED = 4009
#: ... and the sandbox was paused: its kernel is frozen (the session stays, for the client that resumes it).
CLOSE_PAUSED = 4409
PAUSED_PREFIX = "paused: "

Sender = Callable[[WireMessage], Awaitable[None]]


class KernelConnection(Protocol):
    """What the bridge needs of a kernel: sockets on its current process, and its signing session."""

    def connect_channel(self, channel: str, identity: bytes) -> zmq.asyncio.Socket: ...

    @property
    def signer(self) -> Session: ...

    @property
    def late_output(self) -> bool:
        """Whether the kernel may send a cell's output after its idle status (Deno's does)."""
        ...


class Closed(Exception):
    """The client session is over (its kernel or sandbox went away); `reason` says why."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class ClientSession:
    """One frontend session on one kernel: its sockets, its WebSocket when there is one, its kept messages."""

    def __init__(
        self, kernel: KernelConnection, session_id: str, budget: int, expire: Callable[[], None] | None = None
    ) -> None:
        self.kernel = kernel
        self._expire = expire  # looks for sessions away too long (called KEEP_FOR after a detach)
        self.session_id = session_id
        self.identity = f"scalebox-{session_id}".encode()[:255]
        self._budget = budget
        self._sender: Sender | None = None
        self._send_lock = asyncio.Lock()
        self._kept: deque[WireMessage] = deque()
        self._kept_bytes = 0
        self._sockets: dict[str, zmq.asyncio.Socket] = {}
        self._pumps: list[asyncio.Task[None]] = []
        self._iopub_seen = asyncio.Event()  # the kernel's iopub reached this session's subscription
        self._nudges: set[str] = set()  # ids of our own kernel_info requests: their iopub is nobody's
        # For kernels that send output after idle: this client's cells, whose idle waits for a barrier.
        self._cells: set[str] = set()
        self._barriers: dict[str, asyncio.Event] = {}
        self._held: set[asyncio.Task[None]] = set()
        self.detached_at: float | None = None
        self.closed: str | None = None  # why, once closed
        self.on_close: Callable[[str], Awaitable[None]] | None = None  # tells the attached WebSocket

    # ---- sockets -----------------------------------------------------------------------------------------------------

    def connect(self) -> None:
        """Sockets on the kernel's current process (again after a restart: the old ones are closed)."""
        self._close_sockets()
        self._iopub_seen.clear()
        self._cells.clear()
        for channel in ("shell", "control", "stdin", "iopub"):
            socket = self.kernel.connect_channel(channel, self.identity)
            socket.setsockopt(zmq.MAXMSGSIZE, MAX_MESSAGE)
            socket.setsockopt(zmq.LINGER, 0)
            self._sockets[channel] = socket
            self._pumps.append(asyncio.create_task(self._pump(channel, socket), name=f"bridge {channel}"))

    def _close_sockets(self) -> None:
        for task in self._pumps:
            task.cancel()
        self._pumps.clear()
        for socket in self._sockets.values():
            socket.close(linger=0)
        self._sockets.clear()

    async def _pump(self, channel: str, socket: zmq.asyncio.Socket) -> None:
        """Kernel -> client, for one socket, in order."""
        while not socket.closed:
            try:
                frames = await socket.recv_multipart(copy=False)
            except zmq.ZMQError as exc:
                if socket.closed:
                    return
                log.warning("bridge %s of %s: %s", channel, self.session_id, exc)
                await asyncio.sleep(0.1)
                continue
            message = _message(channel, frames)
            if message is not None:
                if channel == "iopub":
                    self._iopub_seen.set()
                    # The parent is looked at only while there are nudges or held cells to tell apart.
                    parent = _parent_id(message) if self._nudges or self._cells or self._barriers else ""
                    if parent in self._nudges:
                        continue
                    if parent:
                        idle = (parent in self._cells or parent in self._barriers) and _is_idle(message)
                        if parent in self._barriers:  # our barrier: its idle says everything before it is out
                            if idle:
                                self._barriers[parent].set()
                            continue
                        if parent in self._cells and idle:
                            self._cells.discard(parent)
                            self._hold(message)
                            continue
                await self._deliver(message)

    def _hold(self, idle: WireMessage) -> None:
        """Pass a cell's idle on only after a kernel_info barrier came back (or BARRIER_WAIT passed): output the
        kernel sends late then reaches the client before the idle that ends the cell for it."""

        async def release() -> None:
            with self._side_socket() as socket:
                msg_id = self._kernel_info(socket)
                done = self._barriers[msg_id] = asyncio.Event()
                try:
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(BARRIER_WAIT):
                            await done.wait()
                finally:
                    self._barriers.pop(msg_id, None)
            await self._deliver(idle)

        task = asyncio.create_task(release())
        self._held.add(task)
        task.add_done_callback(self._held.discard)

    async def subscribed(self) -> bool:
        """Wait until the iopub subscription reaches the kernel (a SUB socket misses what a kernel publishes
        before then): ask for kernel_info on a socket of its own until some iopub message arrives. False if the
        kernel never answered."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + SUBSCRIBE_WAIT
        wait = 0.005  # a subscribed kernel answers within milliseconds; doubling keeps the nudges few
        try:
            with self._side_socket() as socket:
                while not self._iopub_seen.is_set() and loop.time() < deadline:
                    self._nudges.add(self._kernel_info(socket))
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(wait):
                            await self._iopub_seen.wait()
                    wait = min(wait * 2, 1.0)
                    with contextlib.suppress(zmq.Again):  # its reply is nobody's: drop it
                        while True:
                            await socket.recv_multipart(zmq.NOBLOCK)
        finally:
            # Their busy and idle may still be on the way: dropped for a while yet, then nobody looks any more.
            loop.call_later(NUDGE_LINGER, self._nudges.clear)
        return self._iopub_seen.is_set()

    @contextlib.contextmanager
    def _side_socket(self) -> Iterator[zmq.asyncio.Socket]:
        """A shell socket of the server's own (no client identity): its replies reach no client."""
        socket = self.kernel.connect_channel("shell", b"")
        socket.setsockopt(zmq.LINGER, 0)
        try:
            yield socket
        finally:
            socket.close(linger=0)

    def _kernel_info(self, socket: zmq.asyncio.Socket) -> str:
        """Send a kernel_info request (its idle on iopub follows everything the kernel sent before); its id."""
        request = self.kernel.signer.msg("kernel_info_request")
        self.kernel.signer.send(socket, request)
        return str(request["header"]["msg_id"])

    async def _deliver(self, message: WireMessage) -> None:
        sender = self._sender
        if sender is not None:
            try:
                async with self._send_lock:
                    await sender(message)
                return
            except Exception as exc:  # the WebSocket broke under us: keep the message for the next one
                log.debug("client session %s dropped: %s", self.session_id, exc)
                self.detach(sender)
        size = _size(message)
        if self._kept_bytes + size > self._budget:  # the client is away for too much: let it all go
            budget = self._budget // (1024 * 1024)
            await self.close(f"the kernel sent more than {budget} MiB while the client was away")
            return
        self._kept.append(message)
        self._kept_bytes += size

    # ---- client ------------------------------------------------------------------------------------------------------

    async def attach(self, sender: Sender) -> None:
        """Serve a (new) WebSocket: what was kept goes out first, in order."""
        if self.closed is not None:
            raise Closed(self.closed)
        async with self._send_lock:
            self._sender = sender
            self.detached_at = None
            while self._kept:
                message = self._kept[0]
                await sender(message)
                self._kept.popleft()
                self._kept_bytes -= _size(message)

    def detach(self, sender: Sender | None = None) -> None:
        """The WebSocket went away (only if it is still `sender`'s): keep messages from now on."""
        if sender is not None and self._sender is not sender:
            return
        self._sender = None
        loop = asyncio.get_running_loop()
        self.detached_at = loop.time()
        if self._expire is not None:
            loop.call_later(KEEP_FOR + 1, self._expire)

    @property
    def attached(self) -> bool:
        return self._sender is not None

    async def send(self, message: WireMessage) -> None:
        """Client -> kernel: sign with the kernel's key and send on the message's channel."""
        socket = self._sockets.get(message.channel)
        if socket is None or socket.closed:
            return  # between a restart's stop and start: the kernel could not have taken it
        parts = [bytes(part) for part in message.parts]
        if self.kernel.late_output and message.channel == "shell" and b'"execute_request"' in parts[0]:
            with contextlib.suppress(ValueError, AttributeError):
                self._cells.add(str(json.loads(parts[0]).get("msg_id", "")))
        signature = self.kernel.signer.sign(parts)
        await socket.send_multipart([DELIMITER, signature, *parts, *message.buffers], copy=False)

    async def disconnect(self, reason: str) -> None:
        """Close the attached WebSocket (if any) with `reason`; the session and what it keeps stay."""
        notify, self.on_close = self.on_close, None
        if notify is not None:
            with contextlib.suppress(Exception):
                await notify(reason)

    async def close(self, reason: str) -> None:
        if self.closed is not None:
            return
        self.closed = reason
        self._close_sockets()
        self._kept.clear()
        self._kept_bytes = 0
        await self.disconnect(reason)


class KernelClients:
    """The client sessions of one kernel."""

    def __init__(self, kernel: KernelConnection, budget: int) -> None:
        self.kernel = kernel
        self.budget = budget
        self.sessions: dict[str, ClientSession] = {}
        self.closed: str | None = None
        self._tasks: set[asyncio.Task[Any]] = set()  # closes, nudges and pause notices under way

    def _background(self, work: Coroutine[Any, Any, Any]) -> None:
        task = asyncio.create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def open(self, session_id: str) -> tuple[ClientSession, bool]:
        """The session of that id (kept from an earlier WebSocket, or new: then connected now); True if new."""
        if self.closed is not None:
            raise Closed(self.closed)
        self.expire()
        session = self.sessions.get(session_id)
        if session is not None and session.closed is None:
            return session, False
        if len(self.sessions) >= MAX_SESSIONS:
            waiting = [s for s in self.sessions.values() if not s.attached]
            if not waiting:
                raise Closed(f"this kernel already serves {MAX_SESSIONS} client sessions")
            oldest = min(waiting, key=lambda s: s.detached_at or 0.0)
            self.sessions.pop(oldest.session_id)
            self._background(oldest.close("replaced by a newer client session"))
        session = ClientSession(self.kernel, session_id, self.budget, self.expire)
        session.connect()
        self.sessions[session_id] = session
        return session, True

    def expire(self) -> None:
        """Close sessions whose WebSocket has been away longer than KEEP_FOR."""
        now = asyncio.get_running_loop().time()
        for session_id, session in list(self.sessions.items()):
            gone = session.closed is not None
            stale = session.detached_at is not None and now - session.detached_at > KEEP_FOR
            if gone or stale:
                del self.sessions[session_id]
                self._background(session.close("the client was away too long"))

    def pause(self) -> None:
        """The sandbox is being paused: its clients hear so (a running cell cannot end while its kernel is frozen)."""
        for session in self.sessions.values():
            if session.attached:
                self._background(session.disconnect(f"{PAUSED_PREFIX}the sandbox was paused"))

    def reconnect(self) -> None:
        """The kernel restarted: every session gets sockets on the new process."""
        for session in self.sessions.values():
            if session.closed is None:
                session.connect()
                self._background(session.subscribed())

    @property
    def connections(self) -> int:
        return sum(1 for session in self.sessions.values() if session.attached)

    async def close(self, reason: str) -> None:
        """The kernel is gone for good: close every session (their WebSockets hear `reason`)."""
        self.closed = reason
        sessions = list(self.sessions.values())
        self.sessions.clear()
        await asyncio.gather(*(session.close(reason) for session in sessions), return_exceptions=True)


def _message(channel: str, frames: list[Any]) -> WireMessage | None:
    """The message in a multipart ZMQ message from the kernel (its signature is not checked: the client gets what
    the kernel said, and nothing here acts on it)."""
    index = next((i for i, f in enumerate(frames) if len(f) == len(DELIMITER) and f.bytes == DELIMITER), None)
    if index is None or len(frames) < index + 6:
        log.debug("bridge %s: dropped a message that is not a Jupyter message", channel)
        return None
    parts = [frame.buffer for frame in frames[index + 2 : index + 6]]
    return WireMessage(channel, parts, [frame.buffer for frame in frames[index + 6 :]])


def _parent_id(message: WireMessage) -> str:
    try:
        parent = json.loads(bytes(message.parts[1]))
    except ValueError:
        return ""
    return str(parent.get("msg_id", "")) if isinstance(parent, dict) else ""


def _is_idle(message: WireMessage) -> bool:
    """An idle status (its small header says status before its content is looked at)."""
    if b'"status"' not in bytes(message.parts[0]):
        return False
    return b'"idle"' in bytes(message.parts[3])


def _size(message: WireMessage) -> int:
    return sum(len(part) for part in message.parts) + sum(len(buffer) for buffer in message.buffers)
