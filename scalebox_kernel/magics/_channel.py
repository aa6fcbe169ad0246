"""`%%scalebox` cells over the sandbox's Jupyter endpoint (PROTOCOL.md 11), as the Scalebox kernel runs its cells:
the cell goes to the session's context kernel as an execute_request, and what comes back is shown here as the
local kernel would show its own: streams, displays and their updates by id, `clear_output`, `input()` prompts
(answered here), the result and the error. Comms (widgets) of the sandbox are not bridged into the local kernel.

One channel per sandbox context is kept open across cells, on the portal's loop; a back end without the endpoint
makes `run` return None, and the magics take the ExecutionService path.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from jupyter_client.session import Session as Signer

from ..client.jupyter import KernelChannel
from ..errors import ExecutionTimeout, SandboxPaused, ScaleboxError, ServerUnavailable
from ..protocol.jupyter_ws import WireMessage

if TYPE_CHECKING:
    from ..session import SandboxSession
    from ._display import Relay

#: Seconds an interrupted cell may take to end before the magic returns anyway.
INTERRUPT_WAIT = 10.0
#: Messages of a cell shown here (the rest, such as comms and statuses, are not).
SHOWN = frozenset({"stream", "display_data", "update_display_data", "clear_output", "execute_result", "error"})


@dataclass
class _Cell:
    msg_id: str
    relay: Relay
    reply: asyncio.Future[dict[str, Any]]
    idle: asyncio.Event = field(default_factory=asyncio.Event)
    ended: asyncio.Event = field(default_factory=asyncio.Event)  # its execute_reply came (even after we gave up)


class _Channel:
    """One open channel to one sandbox kernel, and the cell running on it."""

    def __init__(self, channel: KernelChannel, endpoint: Any, kernel_id: str) -> None:
        self.channel = channel
        self.endpoint = endpoint
        self.kernel_id = kernel_id
        self.cell: _Cell | None = None
        # A cell given up on while the server was silent, interrupted once it answers: the next cell waits for its
        # end first (a little), else the kernel would abort the next one with it.
        self.abandoned: _Cell | None = None
        # One cell at a time, an interrupted one until it ended: the shell's thread returns at once on Ctrl-C,
        # and a cell sent while the last one still ran would be aborted by the kernel along with it.
        self.lock = asyncio.Lock()


class CellChannels:
    """The magics' channels, by (sandbox id, context id); used on the portal's loop only."""

    def __init__(self) -> None:
        self._channels: dict[tuple[str, str], _Channel] = {}
        self._signer = Signer(key=secrets.token_bytes(16), username="scalebox-magics")  # the server signs anew
        self.missing: set[str] = set()  # sandbox ids whose back end has no endpoint

    async def run(
        self,
        session: SandboxSession,
        language: str,
        code: str,
        relay: Relay,
        *,
        allow_stdin: bool,
        timeout: float | None,
    ) -> dict[str, Any] | None:
        """Run `code` in the session's context of `language`; its execute_reply content (None: no endpoint)."""
        channel = await self._channel(session, language)
        if channel is None:
            return None
        async with channel.lock:
            return await self._run(channel, code, relay, allow_stdin=allow_stdin, timeout=timeout)

    async def _run(
        self, channel: _Channel, code: str, relay: Relay, *, allow_stdin: bool, timeout: float | None
    ) -> dict[str, Any]:
        content = {
            "code": code,
            "silent": False,
            "store_history": True,
            "user_expressions": {},
            "allow_stdin": allow_stdin,
            "stop_on_error": True,
        }
        if channel.abandoned is not None:
            await self._settle(channel.abandoned)
            channel.abandoned = None
        msg = self._signer.msg("execute_request", content)
        msg_id = str(msg["header"]["msg_id"])
        cell = _Cell(msg_id, relay, asyncio.get_running_loop().create_future())
        channel.cell = cell
        try:
            await channel.channel.send(WireMessage("shell", self._parts(msg)))
            async with asyncio.timeout(timeout or None):
                reply = await asyncio.shield(cell.reply)  # kept: an interrupt waits for it to come
                with contextlib.suppress(TimeoutError):  # output may trail the reply a little
                    async with asyncio.timeout(5):
                        await cell.idle.wait()
            return reply
        except TimeoutError:
            await self._interrupt(channel, cell)
            raise ExecutionTimeout(f"the cell ran longer than {timeout:g} s and was interrupted") from None
        except asyncio.CancelledError:  # Ctrl-C / the stop button here: the sandbox's kernel stops too
            await asyncio.shield(self._interrupt(channel, cell))
            raise
        finally:
            channel.cell = None

    def _parts(self, msg: dict[str, Any]) -> list[bytes]:
        return [self._signer.pack(msg[name]) for name in ("header", "parent_header", "metadata", "content")]

    async def _interrupt(self, channel: _Channel, cell: _Cell) -> None:
        """Interrupt the sandbox kernel and wait (a little) for the cell to end: a cell sent while it still runs
        would be aborted by the kernel along with it."""
        with contextlib.suppress(ScaleboxError):
            await channel.endpoint.interrupt(channel.kernel_id)
        await self._settle(cell)

    @staticmethod
    async def _settle(cell: _Cell) -> None:
        """Wait (at most INTERRUPT_WAIT s) for an interrupted cell's reply and the kernel's idle after it: by then
        the kernel has aborted what was queued meanwhile, and takes a new cell."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(INTERRUPT_WAIT):
                await cell.ended.wait()
                await cell.idle.wait()

    async def _channel(self, session: SandboxSession, language: str) -> _Channel | None:
        if session.session_id in self.missing:
            return None
        context = await session.context(language)
        key = (session.session_id, context.id)
        open_channel = self._channels.get(key)
        if open_channel is not None and open_channel.channel.gone is None:
            return open_channel
        endpoint = session.sandbox.jupyter()
        try:
            available = await endpoint.available()
        except SandboxPaused:  # paused elsewhere (or by its timeout): a cell resumes it
            await session.resume()
            available = await endpoint.available()
        if not available:
            self.missing.add(session.session_id)
            return None
        holder: list[_Channel] = []
        channel = endpoint.channel(
            context.id,
            lambda message: self._on_message(holder[0], message),
            lambda kind, detail: self._on_event(holder[0], kind, detail),
            reconnect_for=session.sandbox.config.reconnect_timeout,
        )
        holder.append(_Channel(channel, endpoint, context.id))
        await channel.open()
        self._channels[key] = holder[0]
        return holder[0]

    def _on_message(self, channel: _Channel, message: WireMessage) -> None:
        if channel.cell is None and channel.abandoned is None:
            return
        try:
            header = json.loads(bytes(message.parts[0]))
            parent = json.loads(bytes(message.parts[1]))
            content = json.loads(bytes(message.parts[3]))
        except ValueError:
            return
        if not (isinstance(header, dict) and isinstance(parent, dict) and isinstance(content, dict)):
            return  # not a message: the sandbox's kernel wrote something else
        msg_type = str(header.get("msg_type", ""))
        abandoned = channel.abandoned
        if abandoned is not None and parent.get("msg_id") == abandoned.msg_id:  # its end only; its output is late
            if message.channel == "shell" and msg_type == "execute_reply":
                abandoned.ended.set()
            elif message.channel == "iopub" and msg_type == "status" and content.get("execution_state") == "idle":
                abandoned.idle.set()
            return
        cell = channel.cell
        if cell is None or parent.get("msg_id") != cell.msg_id:
            return
        if message.channel == "shell" and msg_type == "execute_reply":
            cell.ended.set()
            if not cell.reply.done():
                cell.reply.set_result(content)
        elif message.channel == "stdin" and msg_type == "input_request":
            loop = asyncio.get_running_loop()

            def answer(value: str) -> None:  # called on the shell's thread
                reply = self._signer.msg("input_reply", {"value": value}, parent={"header": header})
                wire = WireMessage("stdin", self._parts(reply))
                loop.call_soon_threadsafe(lambda: asyncio.ensure_future(channel.channel.send(wire)))

            cell.relay.emit("input", (str(content.get("prompt", "")), bool(content.get("password")), answer))
        elif message.channel == "iopub":
            if msg_type == "status" and content.get("execution_state") == "idle":
                cell.idle.set()
            elif msg_type in SHOWN:
                cell.relay.emit("jupyter", (msg_type, content))

    def _on_event(self, channel: _Channel, kind: str, detail: str) -> None:
        cell = channel.cell
        if cell is None:
            return
        if kind == "reconnected":
            note = "the connection to the sandbox dropped and was made again"
            note += "; nothing was lost" if channel.channel.resumed else "; output sent meanwhile is lost"
            cell.relay.emit("stderr", f"scalebox: {note}.\n")
        elif kind == "gone" and not cell.reply.done():
            cell.reply.set_exception(ScaleboxError(f"the sandbox kernel went away: {detail}"))
        elif kind == "silent" and not cell.reply.done():  # the server stopped answering: the cell fails now,
            cell.reply.set_exception(ServerUnavailable(detail))  # and stops once the server answers again
            channel.abandoned = cell
            task = asyncio.ensure_future(channel.endpoint.interrupt(channel.kernel_id))
            task.add_done_callback(lambda t: t.cancelled() or t.exception())

    async def close(self) -> None:
        channels, self._channels = list(self._channels.values()), {}
        for channel in channels:
            await channel.channel.close()
