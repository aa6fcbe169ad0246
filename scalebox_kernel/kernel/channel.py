"""The Scalebox kernel's relay on the Jupyter channel: frontend messages go, as they are, over one WebSocket to the
sandbox's kernel (its Jupyter endpoint, PROTOCOL.md 11); every reply, iopub and stdin message comes back as it
is, re-signed with the local connection key, its parent header intact. The frontend sees the sandbox kernel
itself: comms and widgets, `input()`, `clear_output`, display updates, completion, execution counts.

Nothing can hang on it: a request the sandbox can no longer answer (its sandbox expired or was killed, the
connection could not be made again) gets an error reply, and an idle status, from here. A connection that drops
is made again with backoff (`client.jupyter.KernelChannel`); the server kept what the kernel sent meanwhile, and
the running cell gets one line saying so.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import zmq

from ..client.jupyter import ChannelGone, JupyterEndpoint, KernelChannel
from ..errors import NotFound, SandboxNotFound, ScaleboxError, redact
from ..protocol.jupyter_ws import WireMessage
from .wire import InvalidMessage

if TYPE_CHECKING:
    from ..session import SandboxSession
    from ..subcommands import NamedSession
    from .kernel import ScaleboxKernel
    from .relay import CellRelay

log = logging.getLogger(__name__)

#: Seconds between looks at the local stdin socket while the sandbox waits for an `input_reply`.
STDIN_POLL = 0.05
#: Requests whose default answer, when the sandbox can no longer give one, is an empty but valid reply.
_EMPTY_REPLIES: dict[str, dict[str, Any]] = {
    "complete_request": {"matches": [], "cursor_start": 0, "cursor_end": 0, "metadata": {}, "status": "ok"},
    "inspect_request": {"found": False, "data": {}, "metadata": {}, "status": "ok"},
    "is_complete_request": {"status": "unknown"},
    "history_request": {"history": [], "status": "ok"},
    "comm_info_request": {"comms": {}, "status": "ok"},
}


def asks_exit(content: dict[str, Any]) -> bool:
    """An execute_reply whose cell called `exit`/`quit` (IPython's ask_exit payload) without keep_kernel."""
    payload = content.get("payload")
    return isinstance(payload, list) and any(
        isinstance(item, dict) and item.get("source") == "ask_exit" and not item.get("keepkernel") for item in payload
    )


@dataclass
class Pending:
    """A forwarded request waiting for its reply: where the reply goes, and what to say if it never comes."""

    stream: Any  # the local socket the request came on
    idents: list[bytes]
    header: dict[str, Any]
    channel: str = "shell"
    parts: list[bytes] = field(default_factory=list, repr=False)  # kept until the sandbox shows it got it
    buffers: list[bytes] = field(default_factory=list, repr=False)
    seen: bool = False  # something came back for it (so the sandbox has it)
    replied: bool = False
    idle: bool = False
    timer: asyncio.TimerHandle | None = field(default=None, repr=False)

    @property
    def msg_type(self) -> str:
        return str(self.header.get("msg_type", ""))


class SandboxChannel:
    """The relay of one Scalebox kernel to the kernel of its current session's context."""

    def __init__(self, kernel: ScaleboxKernel) -> None:
        self.kernel = kernel
        self.mode = kernel.scalebox_config.channel  # auto | jupyter | execute
        self.fallback_said = False
        self._channel: KernelChannel | None = None
        self._endpoint: JupyterEndpoint | None = None
        self._target: tuple[str, str] | None = None  # (sandbox id, kernel id) the channel goes to
        self._entry: NamedSession | None = None
        self._session: SandboxSession | None = None  # the session the channel's sandbox belongs to
        self._pending: dict[str, Pending] = {}
        self._stdin_task: asyncio.Task[None] | None = None
        self._awaiting_input: set[str] = set()  # parent msg_ids of input requests not yet answered
        self._notice: str | None = None  # said at the start of the next cell
        self._lock = asyncio.Lock()

    # ------------------------------------------------------------------------------------------ state

    @property
    def open(self) -> bool:
        """Whether messages go to a sandbox kernel now (the channel is up, or coming back)."""
        return self._channel is not None and self._channel.gone is None

    def busy(self) -> bool:
        """A cell forwarded to the sandbox's kernel has not had its reply yet."""
        return any(p.msg_type == "execute_request" and not p.replied for p in self._pending.values())

    def describe(self, entry: NamedSession) -> str:
        """The `%scalebox info` line: which path cells of this session take."""
        if self._entry is entry and self.open:
            return "Jupyter endpoint (every message relayed)"
        if self.mode == "execute":
            return "ExecutionService (SCALEBOX_CHANNEL=execute)"
        if self.fallback_said:
            return "ExecutionService (the back end has no Jupyter endpoint)"
        return "Jupyter endpoint (from the next cell)"

    @property
    def wanted(self) -> bool:
        """Whether cells should take this channel (not forced off, and not found missing)."""
        return self.mode != "execute" and not (self.mode == "auto" and self.fallback_said)

    # ------------------------------------------------------------------------------------------ connecting

    async def ensure(self, relay: CellRelay) -> bool:
        """Connect to the current session's kernel (opening its sandbox first if needed); False when cells must
        take the ExecutionService path instead (the notice is given once, in `relay`'s cell)."""
        if not self.wanted:
            if not self.fallback_said and not relay.silent:
                self.fallback_said = True
                relay.stream(
                    "stderr",
                    "scalebox: SCALEBOX_CHANNEL=execute, so cells run over the sandbox's ExecutionService: output, "
                    "results and errors arrive, but widgets, input() and clear_output do not.\n",
                )
            return False
        async with self._lock:
            entry = self.kernel.sessions.entry()
            for attempt in range(2):
                try:
                    return await self._connect(entry, relay)
                except SandboxNotFound:  # it ended before the channel heard: open the one that replaces it
                    if attempt:
                        raise
                    await self._lost(entry, entry.session)
            raise AssertionError("unreachable")

    async def _lost(self, entry: NamedSession, session: SandboxSession | None) -> None:
        """Forget the entry's sandbox, if it still is `session` (a later cell may have replaced it already)."""
        if session is not None and entry.session is session:
            await self.kernel.sessions.lost(entry)

    async def _connect(self, entry: NamedSession, relay: CellRelay) -> bool:
        kernel = self.kernel
        if self._channel is not None and self._channel.sandbox_gone:
            await self._lost(entry, self._session)
        session = await kernel.sessions.open(entry, _output(kernel, relay), kernel.lang.wire)
        if entry.paused:
            await session.resume()
            entry.paused = False
        context = await session.context(kernel.lang.wire)
        target = (session.session_id, context.id)
        if self._target == target and self.open:
            return True
        await self._close_channel()
        endpoint = session.sandbox.jupyter()
        if not await self._available(endpoint, session):
            self.fallback_said = True
            relay.stream(
                "stderr",
                "scalebox: this back end has no Jupyter endpoint for its sandboxes, so cells run over its "
                "ExecutionService: output, results and errors arrive, but widgets, input() and clear_output "
                "do not. `%scalebox info` shows the path in use.\n",
            )
            return False
        reconnect_for = kernel.scalebox_config.reconnect_timeout
        channel = endpoint.channel(context.id, self._on_message, self._on_event, reconnect_for=reconnect_for)
        try:
            await channel.open()
        except NotFound:  # the context went away (restarted elsewhere): a fresh one
            await session.restart(kernel.lang.wire)
            context = await session.context(kernel.lang.wire)
            channel = endpoint.channel(context.id, self._on_message, self._on_event, reconnect_for=reconnect_for)
            await channel.open()
            target = (session.session_id, context.id)
        if channel.notice:
            relay.stream("stderr", f"scalebox: {channel.notice}\n")
        self._channel, self._endpoint, self._target, self._entry = channel, endpoint, target, entry
        self._session = session
        return True

    async def _available(self, endpoint: JupyterEndpoint, session: SandboxSession) -> bool:
        if self.mode == "jupyter":
            return True  # required: opening the channel says what is wrong
        try:
            return await endpoint.available()
        except ScaleboxError as exc:
            if getattr(exc, "status_code", None) == 409:  # paused meanwhile: resume and ask again
                await session.resume()
                return await endpoint.available()
            raise

    async def _close_channel(self) -> None:
        channel, self._channel, self._target = self._channel, None, None
        if channel is not None:
            await channel.close()
        self._fail_all("the sandbox kernel this notebook was attached to changed")

    async def close(self) -> None:
        await self._close_channel()
        if self._stdin_task is not None:
            self._stdin_task.cancel()

    # ------------------------------------------------------------------------------------------ frontend -> sandbox

    async def forward(
        self,
        stream: Any,
        idents: list[bytes],
        header: dict[str, Any],
        parts: list[bytes],
        buffers: list[Any],
        channel: str = "shell",
    ) -> None:
        """Send one frontend request to the sandbox kernel, to be answered through `stream` to `idents`."""
        assert self._channel is not None
        msg_id = str(header.get("msg_id", ""))
        buffers = [bytes(b) for b in buffers]
        pending = Pending(stream, idents, header, channel, parts, buffers)
        if not pending.msg_type.endswith("_request"):  # comms: no reply comes, nothing to wait for
            if self._channel is not None:
                with contextlib.suppress(ChannelGone):
                    await self._channel.send(WireMessage(channel, parts, buffers))
            return
        self._pending[msg_id] = pending
        if header.get("msg_type") == "execute_request":
            if self._notice:
                self._publish_stream(header, "stderr", self._notice)
                self._notice = None
            limit = self.kernel.scalebox_config.execution_timeout
            if limit:
                loop = asyncio.get_running_loop()
                pending.timer = loop.call_later(limit, lambda: asyncio.ensure_future(self._time_out(msg_id, limit)))
        await self._send(msg_id, pending)

    async def _send(self, msg_id: str, pending: Pending) -> None:
        assert self._channel is not None
        # If the channel is gone, its `gone` event answers the request (or sends it to the sandbox that replaced
        # the one it was meant for).
        with contextlib.suppress(ChannelGone):
            await self._channel.send(WireMessage(pending.channel, pending.parts, pending.buffers))

    def send_stdin(self, parts: list[bytes]) -> None:
        """An `input_reply` from the frontend, on its way to the sandbox."""
        if self._channel is None:
            return
        with contextlib.suppress(Exception):
            parent = json.loads(parts[1])
            self._awaiting_input.discard(str(parent.get("msg_id", "")))
        task = asyncio.ensure_future(self._channel.send(WireMessage("stdin", parts)))
        task.add_done_callback(lambda t: t.cancelled() or t.exception())

    async def interrupt(self) -> None:
        """The stop button: the endpoint's interrupt of the kernel the channel goes to."""
        if self._endpoint is None or self._target is None:
            return
        try:
            await self._endpoint.interrupt(self._target[1])
        except ScaleboxError as exc:
            log.warning("Interrupting the sandbox kernel failed: %s", redact(str(exc), self.kernel.secrets()))

    async def _time_out(self, msg_id: str, limit: float) -> None:
        pending = self._pending.get(msg_id)
        if pending is None or pending.replied:
            return
        line = f"scalebox: the cell ran longer than {limit:g} s; interrupted.\n"
        self._publish_stream(pending.header, "stderr", line)
        await self.interrupt()

    # ------------------------------------------------------------------------------------------ sandbox -> frontend

    def _on_message(self, message: WireMessage) -> None:
        try:
            header = json.loads(bytes(message.parts[0]))
            parent = json.loads(bytes(message.parts[1]))
        except ValueError:
            log.debug("dropped a sandbox message whose header is not JSON")
            return
        if not isinstance(header, dict) or not isinstance(parent, dict):
            return
        # Passed on without a copy (zmq keeps a reference to the WebSocket frame until the message is out).
        frames = [*message.parts, *message.buffers]
        msg_type = str(header.get("msg_type", ""))
        parent_id = str(parent.get("msg_id", ""))
        session = self.kernel.session
        assert session is not None
        if message.channel == "iopub":
            session.send_raw(self.kernel.iopub_socket, frames, copy=False, ident=self.kernel._topic(msg_type))
            pending = self._pending.get(parent_id)
            if pending is not None:
                pending.seen = True
            if pending is not None and msg_type == "status":
                pending.idle = _content(message).get("execution_state") == "idle"
                self._settle(parent_id)
            return
        pending = self._pending.get(parent_id)
        if pending is None:
            log.debug("dropped a %s for a request this kernel did not forward", msg_type)
            return
        pending.seen = True
        if message.channel == "stdin":
            self._awaiting_input.add(parent_id)
            session.send_raw(self.kernel.stdin_socket, frames, copy=False, ident=pending.idents)
            self._watch_stdin()
            return
        session.send_raw(pending.stream, frames, copy=False, ident=pending.idents)
        pending.replied = True
        if msg_type == "execute_reply":
            content = _content(message)
            count = content.get("execution_count")
            if isinstance(count, int) and not isinstance(count, bool):
                self.kernel.execution_count = count
            self._awaiting_input.discard(parent_id)
            if asks_exit(content):  # `exit`/`quit`: the sandbox's kernel stops, and this one too, as ipykernel does
                self.kernel.exit_soon()
        if pending.msg_type != "execute_request":
            pending.idle = True  # only cells are waited on for their idle (they may still print after the reply)
        self._settle(parent_id)

    def _settle(self, msg_id: str) -> None:
        pending = self._pending.get(msg_id)
        if pending is not None and pending.replied and pending.idle:
            del self._pending[msg_id]
            if pending.timer is not None:
                pending.timer.cancel()

    def _watch_stdin(self) -> None:
        if self._stdin_task is None or self._stdin_task.done():
            self._stdin_task = asyncio.ensure_future(self._pump_stdin())

    async def _pump_stdin(self) -> None:
        """Carry input replies from the local stdin socket while the sandbox waits for one (ipykernel reads that
        socket only inside its own input(), so nothing else competes for it)."""
        session = self.kernel.session
        socket = self.kernel.stdin_socket
        assert session is not None
        while self._awaiting_input and self.open:
            while True:
                try:
                    frames = socket.recv_multipart(zmq.NOBLOCK)
                except zmq.Again:
                    break
                try:
                    _idents, rest = session.feed_identities(frames)
                    reply = session.deserialize(rest)  # signed with the connection's key, like any request
                except InvalidMessage as exc:
                    log.warning("refused a stdin message: %s", exc)
                    continue
                self.send_stdin(list(reply["parts"]))
            await asyncio.sleep(STDIN_POLL)

    # ------------------------------------------------------------------------------------------ failures

    def _on_event(self, kind: str, detail: str) -> None:
        channel = self._channel
        if kind == "reconnected" and channel is not None:
            if channel.resumed:
                line = "scalebox: the connection to the sandbox dropped and was made again; nothing was lost.\n"
            else:
                line = (
                    "scalebox: the connection to the sandbox dropped; scalebox-local restarted meanwhile, so what "
                    "the kernel sent in between is lost.\n"
                )
            cells = [p for p in self._pending.values() if p.msg_type == "execute_request"]
            for pending in cells:
                self._publish_stream(pending.header, "stderr", line)
            if not channel.resumed:
                self._fail_all("the sandbox's server restarted while this request ran")
            if channel.notice:
                self._notice = f"scalebox: {channel.notice}\n"
        elif kind == "gone" and channel is not None:
            if (channel.sandbox_gone or channel.paused) and self._entry is not None:
                # Cells the sandbox never saw go to the one that replaces it (announced), as on the Execute path.
                unseen = {k: p for k, p in self._pending.items() if not p.seen and p.msg_type == "execute_request"}
                for msg_id in unseen:
                    del self._pending[msg_id]
                self._fail_all(detail)
                session = None if channel.paused else self._session  # paused: the same sandbox, resumed
                task = asyncio.ensure_future(self._replace(self._entry, session, unseen, detail))
                task.add_done_callback(lambda t: t.cancelled() or t.exception())
            else:
                self._fail_all(detail)
        elif kind == "silent":  # the server stopped answering: every request waiting fails now, as on Execute
            running = any(p.msg_type == "execute_request" and not p.replied for p in self._pending.values())
            self._fail_all(detail, ename="ServerUnavailable")
            if running:  # and the cell stops once the server answers again, so the next one does not wait for it
                self.kernel.run_later(self.interrupt(), lambda _result: None)
        elif kind == "dropped":
            log.info("The connection to the sandbox kernel dropped (%s); making it again", detail)

    async def _replace(
        self, entry: NamedSession, session: SandboxSession | None, unseen: dict[str, Pending], reason: str
    ) -> None:
        """The sandbox is gone: forget it, and run the cells it never saw in the sandbox that replaces it."""
        async with self._lock:
            await self._lost(entry, session)
        if not unseen:
            return
        from .relay import CellRelay

        first = next(iter(unseen.values()))
        count = self.kernel.execution_count
        relay = CellRelay(self.kernel, silent=False, execution_count=count, parent={"header": first.header})
        try:
            if await self.ensure(relay):
                for msg_id, pending in unseen.items():
                    self._pending[msg_id] = pending
                    await self._send(msg_id, pending)
                return
        except Exception as exc:
            reason = str(exc)
        for msg_id, pending in unseen.items():
            self._pending[msg_id] = pending
            self._fail(msg_id, reason)

    def _fail_all(self, reason: str, ename: str = "SandboxUnavailable") -> None:
        for msg_id in list(self._pending):
            self._fail(msg_id, reason, ename)

    def _fail(self, msg_id: str, reason: str, ename: str = "SandboxUnavailable") -> None:
        """Answer a request the sandbox will not answer: an error (for a cell, shown in it) and an idle status."""
        pending = self._pending.pop(msg_id, None)
        if pending is None:
            return
        if pending.timer is not None:
            pending.timer.cancel()
        self._awaiting_input.discard(msg_id)
        kernel = self.kernel
        session = kernel.session
        assert session is not None
        reason = redact(reason, kernel.secrets())
        if not pending.replied:
            reply_type = pending.msg_type.replace("_request", "_reply")
            if pending.msg_type == "execute_request":
                error = {"ename": ename, "evalue": reason, "traceback": [f"{ename}: {reason}"]}
                self._publish(pending.header, "error", error)
                content = {"status": "error", "execution_count": kernel.execution_count, **error}
            elif pending.msg_type in _EMPTY_REPLIES:
                content = dict(_EMPTY_REPLIES[pending.msg_type])
            else:
                content = {"status": "error", "ename": ename, "evalue": reason, "traceback": []}
            session.send(pending.stream, reply_type, content, parent={"header": pending.header}, ident=pending.idents)
        if not pending.idle:
            self._publish(pending.header, "status", {"execution_state": "idle"})

    def _publish_stream(self, header: dict[str, Any], name: str, text: str) -> None:
        self._publish(header, "stream", {"name": name, "text": text})

    def _publish(self, header: dict[str, Any], msg_type: str, content: dict[str, Any]) -> None:
        """An iopub message of ours, answering the frontend request whose header this is."""
        kernel = self.kernel
        if kernel.session is not None:
            parent = {"header": header}
            kernel.session.send(kernel.iopub_socket, msg_type, content, parent=parent, ident=kernel._topic(msg_type))


def _content(message: WireMessage) -> dict[str, Any]:
    """A message's content as a dict, whatever the sandbox put there (only small ones are parsed: statuses and
    replies; output passes through unparsed)."""
    if len(message.parts[3]) > 1024 * 1024:
        return {}
    try:
        content = json.loads(bytes(message.parts[3]))
    except ValueError:
        return {}
    return content if isinstance(content, dict) else {}


def _output(kernel: ScaleboxKernel, relay: CellRelay) -> Any:
    from .commands import CellOutput

    return CellOutput(kernel, relay)
