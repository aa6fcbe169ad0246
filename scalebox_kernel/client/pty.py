"""`AsyncPty`: interactive terminals in the sandbox (PROTOCOL.md 7), as the seed SDK's `sandbox.pty`.

A terminal is `bash -i -l` on a pseudo-terminal of the Process service: its output arrives as raw bytes to the
`on_data` callback, input goes in with `send_stdin`, `resize` changes its size. The stream is the commands' own
(`CommandHandle`); only the request and the ending differ.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass

from ..errors import InvalidArgument, ScaleboxError
from ..protocol import pb
from .callbacks import Callback
from .commands import AsyncCommands, CommandHandle
from .connect_client import ConnectClient
from .models import CommandResult

#: What the seed SDKs set in every terminal.
TERM = "xterm-256color"


@dataclass
class PtySize:
    """A terminal's size in character cells."""

    rows: int = 24
    cols: int = 80

    def to_pb(self) -> pb.PTY:
        for name in ("rows", "cols"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= 0xFFFF:
                raise InvalidArgument(f"PtySize.{name} must be a whole number from 1 to 65535, not {value!r}")
        return pb.PTY(size=pb.PTY.Size(rows=self.rows, cols=self.cols))


class PtyHandle(CommandHandle):
    """A running terminal: `pid`, `wait()` for how its shell ended, `kill()`, `disconnect()`."""

    _timer: asyncio.Task[None] | None = None

    async def wait(self) -> CommandResult:
        """How the terminal's shell ended. Its `exit_code` is returned, not raised: a terminal that exits with the
        status of its last command has not failed (-1 when it was killed)."""
        assert self._task is not None
        return await asyncio.shield(self._task)

    def kill_after(self, seconds: float) -> None:
        """Kill the terminal once `seconds` have passed, unless it ended before."""

        async def expire() -> None:
            await asyncio.sleep(seconds)
            with contextlib.suppress(ScaleboxError):
                await self.kill()

        timer = self._timer = asyncio.create_task(expire())
        assert self._task is not None
        self._task.add_done_callback(lambda _: timer.cancel())


class AsyncPty:
    """Start and drive terminals in the sandbox (`sandbox.pty`)."""

    def __init__(self, rpc: ConnectClient, commands: AsyncCommands) -> None:
        self._rpc = rpc
        self._commands = commands

    async def create(
        self,
        size: PtySize | None = None,
        on_data: Callback | None = None,
        *,
        cwd: str | None = None,
        envs: dict[str, str] | None = None,
        timeout: float | None = None,
    ) -> PtyHandle:
        """Start an interactive shell on a terminal of `size` (24 x 80 by default). `on_data(bytes)` gets all it
        writes (plain functions and coroutines both work); `timeout` seconds, when given, is its lifetime."""
        if timeout is not None and timeout <= 0:
            raise InvalidArgument(f"timeout must be a positive number of seconds or None, not {timeout!r}")
        config = pb.ProcessConfig(cmd="/bin/bash", args=["-i", "-l"], envs={"TERM": TERM, **(envs or {})})
        if cwd:
            config.cwd = cwd
        request = pb.StartRequest(process=config, pty=(size or PtySize()).to_pb())
        handle = PtyHandle(self._commands, None, None, on_pty=on_data)
        await handle._begin("Process/Start", request, pb.StartResponse, "Starting a terminal")
        if timeout is not None:
            handle.kill_after(timeout)
        return handle

    async def send_stdin(self, pid: int, data: str | bytes) -> None:
        """Type into the terminal (keys as text or bytes: `"ls\\n"`, `b"\\x03"` for Ctrl-C)."""
        payload = data.encode() if isinstance(data, str) else bytes(data)
        request = pb.SendInputRequest(process=pb.ProcessSelector(pid=pid), input=pb.ProcessInput(pty=payload))
        await self._rpc.unary("Process/SendInput", request, pb.SendInputResponse, what=f"Typing into terminal {pid}")

    async def resize(self, pid: int, size: PtySize) -> None:
        """Change the terminal's size (its programs get SIGWINCH)."""
        request = pb.UpdateRequest(process=pb.ProcessSelector(pid=pid), pty=size.to_pb())
        await self._rpc.unary("Process/Update", request, pb.UpdateResponse, what=f"Resizing terminal {pid}")

    async def kill(self, pid: int) -> bool:
        """Kill the terminal (SIGKILL); False if it was already gone."""
        return await self._commands.kill(pid)
