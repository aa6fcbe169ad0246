"""`AsyncCommands`: shell commands in the sandbox through the Process service (Start, Connect, signals, stdin)."""

from __future__ import annotations

import asyncio
import codecs
import contextlib
from typing import Any

from google.protobuf.message import Message

from ..errors import CommandExitError, ExecutionTimeout, NotFound, SandboxNotFound, ScaleboxError
from ..protocol import pb
from .callbacks import Callback, call_back
from .connect_client import ConnectClient
from .models import CommandResult, OutputMessage, ProcessInfo


class CommandHandle:
    """A started command whose output keeps being read in the background; `wait()` for its end. A terminal's
    output (`on_pty`) goes to its callback as raw bytes, and is not kept."""

    def __init__(
        self,
        commands: AsyncCommands,
        on_stdout: Callback | None,
        on_stderr: Callback | None,
        on_pty: Callback | None = None,
    ) -> None:
        self._commands = commands
        self._callbacks = {"stdout": on_stdout, "stderr": on_stderr}
        self._on_pty = on_pty
        self._output: dict[str, list[str]] = {"stdout": [], "stderr": []}
        self._decoders = {name: codecs.getincrementaldecoder("utf-8")(errors="replace") for name in self._output}
        self._task: asyncio.Task[CommandResult] | None = None
        self.pid = 0

    def __repr__(self) -> str:
        return f"CommandHandle(pid={self.pid})"

    @property
    def stdout(self) -> str:
        """Everything the command wrote to stdout so far."""
        return "".join(self._output["stdout"])

    @property
    def stderr(self) -> str:
        return "".join(self._output["stderr"])

    async def _begin(self, method: str, request: Message, response_type: type[Message], what: str) -> None:
        """Open the stream in a task of its own and return once the agent said which pid it started."""
        started: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._task = asyncio.create_task(self._pump(method, request, response_type, what, started))
        self._task.add_done_callback(_retrieve)
        try:
            self.pid = await started
        except BaseException:
            self._task.cancel()
            raise

    async def _pump(
        self, method: str, request: Message, response_type: type[Message], what: str, started: asyncio.Future[int]
    ) -> CommandResult:
        rpc = self._commands._rpc
        result: CommandResult | None = None
        try:
            async with rpc.stream(method, request, response_type, what=what) as messages:
                async for message in messages:
                    event = message.event  # type: ignore[attr-defined]
                    kind = event.WhichOneof("event")
                    if kind == "start" and not started.done():
                        started.set_result(event.start.pid)
                    elif kind == "data":
                        await self._on_data(event.data)
                    elif kind == "end":
                        end = event.end
                        self._flush()
                        result = CommandResult(
                            stdout=self.stdout,
                            stderr=self.stderr,
                            exit_code=end.exit_code,
                            error=end.error if end.HasField("error") else None,
                        )
            if not started.done():
                raise rpc.transport.error(ScaleboxError, f"{what}: the process stream ended before the process started")
            if result is None:
                raise rpc.transport.error(ScaleboxError, f"{what}: the process stream ended without an end event")
            return result
        except BaseException as exc:
            if not started.done():
                if isinstance(exc, Exception):
                    started.set_exception(exc)
                else:
                    started.cancel()
            raise

    async def _on_data(self, data: Any) -> None:
        stream = data.WhichOneof("output")
        if stream == "pty":
            await call_back(self._on_pty, data.pty)
            return
        if stream not in ("stdout", "stderr"):
            return
        text = self._decoders[stream].decode(getattr(data, stream))
        if text:
            self._output[stream].append(text)
            await call_back(self._callbacks[stream], OutputMessage(text, error=stream == "stderr"))

    def _flush(self) -> None:
        """Whatever an incomplete UTF-8 sequence left in the decoders (as replacement characters)."""
        for stream, decoder in self._decoders.items():
            tail = decoder.decode(b"", final=True)
            if tail:
                self._output[stream].append(tail)

    async def wait(self) -> CommandResult:
        """The command's result once it ended; raises CommandExitError when it exited with a non-zero code."""
        assert self._task is not None
        result = await asyncio.shield(self._task)
        if result.exit_code != 0:
            raise CommandExitError(result.exit_code, result.stdout, result.stderr, result.error)
        return result

    async def kill(self) -> bool:
        """Kill the command (SIGKILL); False if it was already gone."""
        return await self._commands.kill(self.pid)

    async def disconnect(self) -> None:
        """Stop following the command's output; the command itself keeps running."""
        if self._task is not None and not self._task.done():
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, ScaleboxError):
                await self._task


def _retrieve(task: asyncio.Task[Any]) -> None:
    """Mark a failed background read as seen: its error is raised by `wait()` when someone asks."""
    if not task.cancelled():
        task.exception()


class AsyncCommands:
    """Run and manage processes in the sandbox."""

    def __init__(self, rpc: ConnectClient) -> None:
        self._rpc = rpc

    async def run(
        self,
        cmd: str,
        *,
        background: bool = False,
        envs: dict[str, str] | None = None,
        cwd: str | None = None,
        on_stdout: Callback | None = None,
        on_stderr: Callback | None = None,
        timeout: float | None = 60,
        stdin: bool = False,
    ) -> CommandResult | CommandHandle:
        """Run `cmd` with bash. Foreground: wait and return its result (a non-zero exit raises CommandExitError;
        past `timeout` seconds it is killed and ExecutionTimeout raised). Background: return a handle at once.

        `stdin` is accepted for compatibility: the agent always lets `send_stdin` write to the process.
        """
        config = pb.ProcessConfig(cmd="/bin/bash", args=["-l", "-c", cmd], envs=envs or {})
        if cwd:
            config.cwd = cwd
        request = pb.StartRequest(process=config)
        if background:
            return await self._start("Process/Start", request, pb.StartResponse, on_stdout, on_stderr, cmd)
        handle: CommandHandle | None = None
        deadline = asyncio.timeout(timeout or None)
        try:
            async with deadline:
                handle = await self._start("Process/Start", request, pb.StartResponse, on_stdout, on_stderr, cmd)
                return await handle.wait()
        except TimeoutError:
            if not deadline.expired():
                raise
            await self._abandon(handle)
            raise ExecutionTimeout(f"The command ran longer than {timeout} s and was killed: {cmd}") from None
        except asyncio.CancelledError:
            await asyncio.shield(self._abandon(handle))
            raise

    async def _abandon(self, handle: CommandHandle | None) -> None:
        """Kill a foreground command nobody waits for any more, and stop reading it."""
        if handle is None:
            return
        with contextlib.suppress(ScaleboxError):
            await handle.kill()
        await handle.disconnect()

    async def _start(
        self,
        method: str,
        request: Message,
        response_type: type[Message],
        on_stdout: Callback | None,
        on_stderr: Callback | None,
        what: str,
    ) -> CommandHandle:
        handle = CommandHandle(self, on_stdout, on_stderr)
        await handle._begin(method, request, response_type, f"Running {what!r}")
        return handle

    async def connect(
        self, pid: int, on_stdout: Callback | None = None, on_stderr: Callback | None = None
    ) -> CommandHandle:
        """Follow a running process's output (from now on) and wait for its end."""
        request = pb.ConnectRequest(process=pb.ProcessSelector(pid=pid))
        return await self._start("Process/Connect", request, pb.ConnectResponse, on_stdout, on_stderr, f"pid {pid}")

    async def kill(self, pid: int) -> bool:
        """Send SIGKILL to a process; False if there is no such process."""
        request = pb.SendSignalRequest(process=pb.ProcessSelector(pid=pid), signal=pb.SIGNAL_SIGKILL)
        try:
            await self._rpc.unary("Process/SendSignal", request, pb.SendSignalResponse, what=f"Killing pid {pid}")
        except SandboxNotFound:
            raise
        except NotFound:
            return False
        return True

    async def send_stdin(self, pid: int, data: str | bytes) -> None:
        """Write to a process's standard input."""
        payload = data.encode() if isinstance(data, str) else bytes(data)
        request = pb.SendInputRequest(process=pb.ProcessSelector(pid=pid), input=pb.ProcessInput(stdin=payload))
        await self._rpc.unary("Process/SendInput", request, pb.SendInputResponse, what=f"Writing to pid {pid}")

    async def list(self) -> list[ProcessInfo]:
        """The processes the agent started that are still running."""
        reply = await self._rpc.unary(
            "Process/List", pb.ListRequest(), pb.ListResponse, what="Listing processes", idempotent=True
        )
        return [ProcessInfo.from_pb(process) for process in reply.processes]
