"""A Jupyter kernel's messaging on pyzmq: the five channels, the request handlers and their busy/idle frames.

The Scalebox kernel runs no code of its own, so it does not need IPython's machinery to answer a frontend; this
base is what ipykernel's `Kernel` does for a wrapper kernel, in a process that starts in a tenth of a second:

- the shell channel is served on the main thread's asyncio loop, one request at a time, in order;
- the control channel (interrupt, shutdown, kernel_info) on a thread and loop of its own, so that it answers
  while a shell request waits on the sandbox;
- iopub is one XPUB socket without a high-water mark (output a slow frontend has not read waits for it instead
  of being dropped), served by a thread that publishes what the others send and welcomes each subscriber;
- the heartbeat is echoed by ZMQ itself on a thread (`zmq.proxy`), whatever the loops are doing;
- a request is framed by `busy` and `idle` on iopub, with `execute_input` before a cell and, as in ipykernel,
  an error in a cell aborts the execute requests already queued behind it (`stop_on_error`).

Comms (`comm_open`, `comm_msg`, `comm_close`) go to the `comm` package's manager, which this module makes hand
out comms that publish on this kernel's iopub: ipywidgets then works as it does in ipykernel.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import os
import signal
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import zmq
import zmq.asyncio
from traitlets.config import LoggingConfigurable

from .wire import InvalidMessage, Wire

#: Requests served on the shell channel, and the handler method of each.
SHELL_REQUESTS = (
    "execute_request",
    "complete_request",
    "inspect_request",
    "history_request",
    "is_complete_request",
    "kernel_info_request",
    "connect_request",
    "comm_info_request",
    "shutdown_request",
)
#: Requests served on the control channel.
CONTROL_REQUESTS = ("kernel_info_request", "shutdown_request", "interrupt_request")
COMM_MESSAGES = ("comm_open", "comm_msg", "comm_close")
#: Seconds between looks at whether the process that started the kernel is still its parent.
PARENT_POLL = 1.0


@dataclass
class KernelSockets:
    """The kernel's bound sockets (made by the application from the connection file). The heartbeat has a
    context of its own: ZMQ's proxy echoes on it until that context is terminated at exit."""

    context: zmq.Context[Any]
    hb_context: zmq.Context[Any]
    shell: zmq.Socket[Any]
    control: zmq.Socket[Any]
    stdin: zmq.Socket[Any]
    iopub: zmq.Socket[Any]
    hb: zmq.Socket[Any]


class IOPub:
    """iopub: the XPUB socket, owned by a thread of its own that publishes what any thread sends and greets each
    new subscriber with an `iopub_welcome` (JEP 65), so that a client knows when it will miss nothing.

    A thread sends through a PUSH socket of its own to the iopub thread (ZMQ sockets are not shared between
    threads); neither side has a high-water mark, so nothing is dropped, and one thread's messages keep their
    order."""

    def __init__(self, context: zmq.Context[Any], socket: zmq.Socket[Any], session: Wire) -> None:
        self._context = context
        self._socket = socket
        self._session = session
        self._endpoint = f"inproc://scalebox-iopub-{uuid.uuid4().hex}"
        self._pull = context.socket(zmq.PULL)
        self._pull.rcvhwm = 0
        self._pull.bind(self._endpoint)
        self._local = threading.local()
        self._pushes: list[zmq.Socket[Any]] = []  # every thread's, closed at the end
        self._pushes_lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="scalebox-iopub", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def send_multipart(self, frames: list[Any], copy: bool = True) -> None:
        push = getattr(self._local, "push", None)
        if push is None:
            push = self._context.socket(zmq.PUSH)
            push.sndhwm = 0
            push.linger = 1000
            push.connect(self._endpoint)
            self._local.push = push
            with self._pushes_lock:
                self._pushes.append(push)
        push.send_multipart(frames, copy=copy)

    def close(self, timeout: float = 5.0) -> None:
        """Publish what was sent before this (by any thread), then stop; the XPUB socket lingers for what is
        still on its way to subscribers. Called once the other threads have stopped sending."""
        if self._thread.is_alive():
            self.send_multipart([b""])  # a message has at least six frames: one empty frame is the end
            self._thread.join(timeout)
        with self._pushes_lock:
            pushes, self._pushes = self._pushes, []
        for push in pushes:  # all they sent was taken: their threads have stopped
            push.close(linger=0)

    def _run(self) -> None:
        poller = zmq.Poller()
        poller.register(self._pull, zmq.POLLIN)
        poller.register(self._socket, zmq.POLLIN)
        try:
            while self._step(poller):
                pass
        finally:
            self._pull.close(linger=0)
            self._socket.close(linger=1000)

    def _step(self, poller: zmq.Poller) -> bool:
        """One round of the iopub thread; False at the end. A failure is logged and costs at most a message:
        the thread never stops before its end, or the output of every later cell would be lost."""
        try:
            for socket, _event in poller.poll():
                if socket is self._socket:
                    self._greet(self._socket.recv_multipart())
                elif not self._forward(self._pull.recv_multipart(copy=False)):
                    while self._forward_queued():
                        pass
                    return False
        except zmq.ZMQError as exc:
            if exc.errno == zmq.ETERM:
                return False
            logging.getLogger(__name__).warning("iopub could not publish a message: %s", exc)
        except Exception:
            logging.getLogger(__name__).exception("iopub could not publish a message")
        return True

    def _forward(self, frames: list[Any]) -> bool:
        if len(frames) == 1 and not frames[0].bytes:
            return False
        self._socket.send_multipart(frames, copy=False)
        return True

    def _forward_queued(self) -> bool:
        try:
            frames = self._pull.recv_multipart(zmq.NOBLOCK, copy=False)
        except zmq.Again:
            return False
        self._forward(frames)
        return True

    def _greet(self, frames: list[bytes]) -> None:
        for frame in frames:
            if frame[:1] != b"\x01":  # an unsubscription
                continue
            try:
                topic = frame[1:].decode()
            except UnicodeDecodeError:
                continue
            self._session.send(
                self._socket, "iopub_welcome", {"subscription": topic}, ident=frame[1:] if topic else None
            )


class WireKernel(LoggingConfigurable):
    """Serves the Jupyter protocol; a subclass answers with `do_execute`, `do_complete`, … as in ipykernel."""

    implementation = "kernel"
    implementation_version = ""
    banner = ""
    language_info: dict[str, Any] = {}
    help_links: list[dict[str, str]] = []

    def __init__(self, *, session: Wire, sockets: KernelSockets, ports: dict[str, int], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.session = session
        self.sockets = sockets
        self.ports = ports
        self.ident = str(uuid.uuid4())
        self.execution_count = 0
        self.iopub_socket = IOPub(sockets.context, sockets.iopub, session)
        self.stdin_socket = sockets.stdin
        self.loop: asyncio.AbstractEventLoop | None = None
        self.shell_stream: zmq.asyncio.Socket | None = None
        self._control_loop: asyncio.AbstractEventLoop | None = None
        self._control_ready = threading.Event()
        self._abort_queue = False  # set by a cell that failed: the execute requests waiting are aborted next
        self._parents: dict[str, dict[str, Any]] = {"shell": {}, "control": {}}
        self._idents: dict[str, list[bytes]] = {"shell": [], "control": []}
        self._aborting = False
        self._comm_manager: Any = None
        self._stopping = False
        self.shell_handlers: dict[str, Callable[..., Any]] = {name: getattr(self, name) for name in SHELL_REQUESTS}
        self.control_handlers: dict[str, Callable[..., Any]] = {name: getattr(self, name) for name in CONTROL_REQUESTS}
        for name in COMM_MESSAGES:
            self.shell_handlers[name] = self._comm_message

    # ------------------------------------------------------------------------------------------ running

    def serve(self) -> None:
        """Serve until shutdown (or `stop`): the main loop on this thread, control and heartbeat on theirs."""
        loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)
        self.loop = loop
        self.iopub_socket.start()
        threading.Thread(target=self._echo_heartbeats, name="scalebox-heartbeat", daemon=True).start()
        control = threading.Thread(target=self._run_control, name="scalebox-control", daemon=True)
        control.start()
        self.shell_stream = zmq.asyncio.Socket.from_socket(self.sockets.shell)
        self.start()
        self._serving = {
            loop.create_task(self._serve(self.shell_stream, "shell")),
            loop.create_task(self._watch_parent()),
        }
        try:
            loop.run_forever()
        finally:
            self._finish(loop, control)

    def _finish(self, loop: asyncio.AbstractEventLoop, control: threading.Thread) -> None:
        """After the main loop stopped: end every task and thread, then close the sockets and terminate the
        contexts, which waits (a second at most per socket) for what is still queued, such as the shutdown
        reply; a context that still will not end is left to the process's exit."""
        tasks = asyncio.all_tasks(loop)
        for task in tasks:
            task.cancel()
        if tasks:
            loop.run_until_complete(asyncio.wait(tasks, timeout=5))
        self._stop_control()
        control.join(5)
        self.iopub_socket.close()
        for socket in (self.sockets.shell, self.sockets.stdin):
            socket.close(linger=1000)
        loop.close()
        for context in (self.sockets.context, self.sockets.hb_context):
            ender = threading.Thread(target=context.term, name="scalebox-exit", daemon=True)
            ender.start()
            ender.join(5)

    def start(self) -> None:
        """Called on the main loop's thread before it serves (a subclass adds its signal handlers here)."""
        self._publish_status("starting", "shell")

    def stop(self) -> None:
        """End `serve` (from any thread)."""
        self._stopping = True
        loop = self.loop
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(loop.stop)

    def _echo_heartbeats(self) -> None:
        """Echo heartbeats in ZMQ's own loop until the heartbeat's context is terminated at exit."""
        try:
            zmq.proxy(self.sockets.hb, self.sockets.hb)
        except zmq.ZMQError as exc:
            self.log.debug("heartbeat stopped: %s", exc)
        finally:
            self.sockets.hb.close(linger=0)

    def _run_control(self) -> None:
        loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)
        self._control_loop = loop
        socket = zmq.asyncio.Socket.from_socket(self.sockets.control)
        task = loop.create_task(self._serve(socket, "control"))
        self._control_ready.set()
        try:
            loop.run_until_complete(task)
        except asyncio.CancelledError:
            pass
        finally:
            self.sockets.control.close(linger=1000)
            loop.close()

    def _stop_control(self) -> None:
        self._control_ready.wait(5)
        loop = self._control_loop
        if loop is None or loop.is_closed():
            return

        def cancel() -> None:
            for task in asyncio.all_tasks(loop):
                task.cancel()

        with contextlib.suppress(RuntimeError):  # closed meanwhile
            loop.call_soon_threadsafe(cancel)

    async def _serve(self, socket: zmq.asyncio.Socket, channel: str) -> None:
        while True:
            await self._serve_one(socket, await socket.recv_multipart(), channel)
            if self._abort_queue and channel == "shell":
                await self._abort_queued(socket)

    async def _serve_one(self, socket: zmq.asyncio.Socket, frames: list[Any], channel: str) -> None:
        try:
            parsed = self._parse(frames, channel)
            if parsed is None:
                return
            idents, msg = parsed
            if channel == "control":
                await self._handle(socket, idents, msg, "control", self.control_handlers)
            elif (self._aborting and msg["header"].get("msg_type") == "execute_request") or not await self.relay(
                idents, msg
            ):
                await self._handle(socket, idents, msg, "shell", self.shell_handlers)
        except asyncio.CancelledError:
            raise
        except Exception:
            self.log.exception("The kernel failed to answer a %s request", channel)

    async def _watch_parent(self) -> None:
        """As ipykernel: a kernel whose parent (the process that started it, `JPY_PARENT_PID`) is gone ends. A kernel
        forked by the zygote watches its launcher's parent instead (`SCALEBOX_LAUNCHER_PID`)."""
        parent = int(os.environ.get("JPY_PARENT_PID") or 0)
        launcher = int(os.environ.get("SCALEBOX_LAUNCHER_PID") or 0)
        if parent <= 1 or _parent_of(launcher or os.getpid()) != parent:
            return
        while _parent_of(launcher or os.getpid()) == parent:
            await asyncio.sleep(PARENT_POLL)
        self.log.warning("The process that started this kernel is gone: shutting down.")
        self.orphaned()

    def orphaned(self) -> None:
        """The kernel's parent process is gone (a subclass lets go of what it holds first)."""
        self.stop()

    # ------------------------------------------------------------------------------------------ dispatch

    async def relay(self, idents: list[bytes], msg: dict[str, Any]) -> bool:
        """A subclass's first look at each shell request: True if it answered it (its handler then does not)."""
        return False

    def _parse(self, frames: list[Any], channel: str) -> tuple[list[bytes], dict[str, Any]] | None:
        try:
            idents, rest = self.session.feed_identities(frames)
            return idents, self.session.deserialize(rest)
        except InvalidMessage as exc:
            self.log.error("Refused a %s message: %s", channel, exc)
            return None

    async def _handle(
        self,
        stream: Any,
        idents: list[bytes],
        msg: dict[str, Any],
        channel: str,
        handlers: dict[str, Callable[..., Any]],
    ) -> None:
        msg_type = str(msg["header"].get("msg_type", ""))
        handler = handlers.get(msg_type)
        if handler is None:
            self.log.warning("Unknown %s message type: %r", channel, msg_type)
            self._refuse(stream, idents, msg, "UnknownRequest", f"this kernel does not answer {msg_type!r}")
            return
        self.set_parent(idents, msg, channel)
        self._publish_status("busy", channel)
        try:
            if channel == "shell" and self._aborting and msg_type == "execute_request":
                self._send_abort_reply(stream, msg, idents)
            else:
                result = handler(stream, idents, msg)
                if inspect.isawaitable(result):
                    await result
        except (KeyError, TypeError, ValueError, AttributeError) as exc:  # a request whose content is not as specified
            self.log.warning("A %s the kernel could not read: %r", msg_type, exc)
            self._refuse(stream, idents, msg, "BadRequest", f"{msg_type} content is not as the protocol says: {exc!r}")
        except Exception as exc:  # a failure of the kernel's own: said in the log, and in a reply nobody waits for
            self.log.exception("The kernel failed to answer a %s", msg_type)
            self._refuse(stream, idents, msg, type(exc).__name__, f"the kernel failed to answer {msg_type}: {exc}")
        finally:
            self._publish_status("idle", channel)

    def _refuse(self, stream: Any, idents: list[bytes], msg: dict[str, Any], ename: str, evalue: str) -> None:
        """Answer a request that cannot be served with an error reply (a client waiting on it does not hang)."""
        msg_type = str(msg["header"].get("msg_type", ""))
        if not msg_type.endswith("_request"):
            return  # comms and the like expect no reply
        content: dict[str, Any] = {"status": "error", "ename": ename, "evalue": evalue, "traceback": []}
        if msg_type == "execute_request":
            content["execution_count"] = self.execution_count
        self.session.send(stream, msg_type.removesuffix("_request") + "_reply", content, msg, ident=idents)

    def set_parent(self, idents: list[bytes], parent: dict[str, Any], channel: str = "shell") -> None:
        """The request that what is published next answers."""
        self._idents[channel] = list(idents)
        self._parents[channel] = parent

    def get_parent(self, channel: str = "shell") -> dict[str, Any]:
        return self._parents.get(channel, {})

    def _topic(self, topic: str) -> bytes:
        return f"kernel.{self.ident}.{topic}".encode()

    def _publish_status(self, status: str, channel: str, parent: dict[str, Any] | None = None) -> None:
        self.session.send(
            self.iopub_socket,
            "status",
            {"execution_state": status},
            parent=parent or self.get_parent(channel),
            ident=self._topic("status"),
        )

    def send_response(
        self,
        stream: Any,
        msg_type: str,
        content: dict[str, Any] | None = None,
        ident: bytes | list[bytes] | None = None,
        buffers: list[Any] | None = None,
        metadata: dict[str, Any] | None = None,
        channel: str = "shell",
    ) -> dict[str, Any]:
        """Send on `stream` a message answering the current request of `channel`."""
        return self.session.send(
            stream, msg_type, content, self.get_parent(channel), ident=ident, buffers=buffers, metadata=metadata
        )

    # ------------------------------------------------------------------------------------------ execute

    async def execute_request(self, stream: Any, ident: list[bytes], parent: dict[str, Any]) -> None:
        content = parent["content"]
        code = content["code"]
        if not isinstance(code, str):
            raise TypeError(f"code is {type(code).__name__}, not a string")
        silent = bool(content.get("silent", False))
        store_history = bool(content.get("store_history", not silent))
        stop_on_error = content.get("stop_on_error", True)
        started = datetime.now(UTC)
        if not silent:
            self.execution_count += 1
            self.session.send(
                self.iopub_socket,
                "execute_input",
                {"code": code, "execution_count": self.execution_count},
                parent=parent,
                ident=self._topic("execute_input"),
            )
        cell_meta = parent.get("metadata") or {}
        reply = await self.do_execute(
            code,
            silent,
            store_history,
            content.get("user_expressions") or {},
            bool(content.get("allow_stdin", False)),
            cell_meta=cell_meta,
            cell_id=cell_meta.get("cellId") if isinstance(cell_meta, dict) else None,
        )
        metadata = self._reply_metadata(started, reply.get("status"))
        self.session.send(stream, "execute_reply", reply, parent, ident=ident, metadata=metadata)
        if not silent and reply.get("status") == "error" and stop_on_error:
            self._abort_queue = True

    async def _abort_queued(self, stream: zmq.asyncio.Socket) -> None:
        """After a failed cell (its reply and idle are out), the execute requests already waiting behind it are
        answered `aborted`, as ipykernel does; the other requests among them are served as ever. What waits is
        taken before any of it is answered: a request sent once the client saw those answers is served."""
        self._abort_queue = False
        waiting = []
        while True:
            try:
                waiting.append(await stream.recv_multipart(zmq.NOBLOCK))
            except zmq.Again:
                break
        self._aborting = True
        try:
            for frames in waiting:
                await self._serve_one(stream, frames, "shell")
        finally:
            self._aborting = False

    def _reply_metadata(self, started: datetime, status: Any) -> dict[str, Any]:
        """An execute_reply's metadata, as ipykernel's (`started` is ipyparallel's)."""
        return {"started": started, "dependencies_met": True, "engine": self.ident, "status": status}

    def _send_abort_reply(self, stream: Any, msg: dict[str, Any], ident: list[bytes]) -> None:
        self.log.info("Aborting %s", msg["header"].get("msg_id"))
        status = {"status": "aborted"}
        metadata = self._reply_metadata(datetime.now(UTC), "aborted")
        self.session.send(stream, "execute_reply", status, msg, ident=ident, metadata=metadata)

    async def do_execute(
        self,
        code: str,
        silent: bool,
        store_history: bool = True,
        user_expressions: dict[str, Any] | None = None,
        allow_stdin: bool = False,
        *,
        cell_meta: Any = None,
        cell_id: Any = None,
    ) -> dict[str, Any]:
        raise NotImplementedError

    # ------------------------------------------------------------------------------------------ the other requests

    async def complete_request(self, stream: Any, ident: list[bytes], parent: dict[str, Any]) -> None:
        content = parent["content"]
        reply = await self.do_complete(str(content.get("code", "")), content.get("cursor_pos"))
        self.session.send(stream, "complete_reply", reply, parent, ident=ident)

    async def do_complete(self, code: str, cursor_pos: int | None) -> dict[str, Any]:
        cursor = len(code) if cursor_pos is None else cursor_pos
        return {"status": "ok", "matches": [], "cursor_start": cursor, "cursor_end": cursor, "metadata": {}}

    async def inspect_request(self, stream: Any, ident: list[bytes], parent: dict[str, Any]) -> None:
        content = parent["content"]
        reply = await self.do_inspect(
            str(content.get("code", "")),
            int(content.get("cursor_pos") or 0),
            int(content.get("detail_level") or 0),
            content.get("omit_sections") or (),
        )
        self.session.send(stream, "inspect_reply", reply, parent, ident=ident)

    async def do_inspect(
        self, code: str, cursor_pos: int, detail_level: int = 0, omit_sections: Any = ()
    ) -> dict[str, Any]:
        return {"status": "ok", "found": False, "data": {}, "metadata": {}}

    async def history_request(self, stream: Any, ident: list[bytes], parent: dict[str, Any]) -> None:
        content = parent["content"]
        known = ("session", "start", "stop", "n", "pattern", "unique")
        reply = await self.do_history(
            str(content.get("hist_access_type", "tail")),
            bool(content.get("output", False)),
            bool(content.get("raw", True)),
            **{key: content[key] for key in known if key in content},
        )
        self.session.send(stream, "history_reply", reply, parent, ident=ident)

    async def do_history(
        self,
        hist_access_type: str,
        output: bool,
        raw: bool,
        session: int | None = None,
        start: int | None = None,
        stop: int | None = None,
        n: int | None = None,
        pattern: str | None = None,
        unique: bool = False,
    ) -> dict[str, Any]:
        return {"status": "ok", "history": []}

    async def is_complete_request(self, stream: Any, ident: list[bytes], parent: dict[str, Any]) -> None:
        reply = await self.do_is_complete(str(parent["content"].get("code", "")))
        self.session.send(stream, "is_complete_reply", reply, parent, ident=ident)

    async def do_is_complete(self, code: str) -> dict[str, Any]:
        return {"status": "unknown"}

    @property
    def kernel_info(self) -> dict[str, Any]:
        raise NotImplementedError

    async def kernel_info_request(self, stream: Any, ident: list[bytes], parent: dict[str, Any]) -> None:
        self.session.send(stream, "kernel_info_reply", {"status": "ok", **self.kernel_info}, parent, ident=ident)

    async def connect_request(self, stream: Any, ident: list[bytes], parent: dict[str, Any]) -> None:
        content = {"status": "ok", **{f"{name}_port": port for name, port in self.ports.items()}}
        self.session.send(stream, "connect_reply", content, parent, ident=ident)

    async def comm_info_request(self, stream: Any, ident: list[bytes], parent: dict[str, Any]) -> None:
        target = parent["content"].get("target_name")
        comms = self.comm_manager.comms if self._comm_manager is not None else {}
        listed = {
            comm_id: {"target_name": comm.target_name}
            for comm_id, comm in comms.items()
            if target is None or comm.target_name == target
        }
        self.session.send(stream, "comm_info_reply", {"status": "ok", "comms": listed}, parent, ident=ident)

    async def interrupt_request(self, stream: Any, ident: list[bytes], parent: dict[str, Any]) -> None:
        os.kill(os.getpid(), signal.SIGINT)
        self.session.send(stream, "interrupt_reply", {"status": "ok"}, parent, ident=ident)

    async def shutdown_request(self, stream: Any, ident: list[bytes], parent: dict[str, Any]) -> None:
        restart = bool(parent["content"].get("restart", False))
        content = await self.do_shutdown(restart)
        self.session.send(stream, "shutdown_reply", content, parent, ident=ident)
        self.session.send(self.iopub_socket, "shutdown_reply", content, parent, ident=self._topic("shutdown"))
        self.stop()

    async def do_shutdown(self, restart: bool) -> dict[str, Any]:
        return {"status": "ok", "restart": restart}

    # ------------------------------------------------------------------------------------------ comms

    @property
    def comm_manager(self) -> Any:
        """The `comm` package's manager, set up on first use to publish on this kernel's iopub."""
        if self._comm_manager is None:
            from .comms import install

            self._comm_manager = install(self)
        return self._comm_manager

    def _comm_message(self, stream: Any, ident: list[bytes], msg: dict[str, Any]) -> None:
        getattr(self.comm_manager, str(msg["header"]["msg_type"]))(stream, ident, msg)


def _parent_of(pid: int) -> int:
    """The parent pid of `pid` (0 once it is gone)."""
    if pid == os.getpid():
        return os.getppid()
    try:
        with open(f"/proc/{pid}/stat", "rb") as handle:
            stat = handle.read()
    except OSError:
        return 0
    return int(stat[stat.rindex(b")") + 2 :].split()[1])  # after the name, which may hold spaces: state, ppid
