"""The Process service: commands (pipes or a PTY) in their own session, output fanned out to attached streams.

A command outlives the stream that started it: a client that disconnects (or a background `commands.run`)
leaves it running, and `Connect` re-attaches. The stream ends when the command itself exits, even when a
background child still holds its output open: what is already in the pipe still arrives (up to OUTPUT_GRACE of
quiet after the exit, at most DRAIN_LIMIT of further output), and the child's later output is drained and
dropped, as the SDKs expect.

Each attached stream buffers at most `ServerSettings.stream_buffer_mb`; while one is full, the command's output is
not read, so a client that reads slowly slows the command down (its writes block) instead of filling the server's
memory.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import pty
import signal
import struct
import termios
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

from ...protocol import pb
from ...protocol.connect import ConnectError
from ..streaming import MiB, StreamBuffer
from ..validation import request_problem

#: Seconds a finished command stays findable by Connect (which then reports how it ended).
FINISHED_TTL = 60.0
#: Seconds of quiet on a command's output, after it exited, before its stream ends.
OUTPUT_GRACE = 0.2
#: Seconds a background child's output may keep an exited command's stream open (not counting a slow client).
DRAIN_LIMIT = 2.0
#: Seconds between looks at whether a command exited (asyncio's wait() also waits for its pipes to close).
EXIT_POLL = 0.05
READ_SIZE = 64 * 1024
#: Seconds SendInput may wait for a terminal that reads nothing.
INPUT_TIMEOUT = 10.0
#: Seconds between two reads of output nobody will see (a background child's, after its command ended).
DROP_PAUSE = 0.05

#: (argv, env, cwd) -> the same, to run inside the sandbox (raises OSError for a program it does not have).
Launcher = Callable[[list[str], dict[str, str], Path], Awaitable[tuple[list[str], dict[str, str], Path]]]

_SIGNALS = {pb.SIGNAL_SIGTERM: signal.SIGTERM, pb.SIGNAL_SIGKILL: signal.SIGKILL}


def _end_event(returncode: int) -> pb.ProcessEvent.EndEvent:
    """Exit code, `exited` and status text the way the Go agent reports them (`exit status 1`, `signal: killed`)."""
    if returncode >= 0:
        return pb.ProcessEvent.EndEvent(exit_code=returncode, exited=True, status=f"exit status {returncode}")
    name = signal.strsignal(-returncode) or f"signal {-returncode}"
    return pb.ProcessEvent.EndEvent(exit_code=-1, exited=False, status=f"signal: {name.lower()}")


class Command:
    """One started command: its config, its output readers, and the buffers of the streams attached to it."""

    def __init__(self, config: pb.ProcessConfig, tag: str | None, master_fd: int | None, buffer_bytes: int) -> None:
        self.config = config
        self.tag = tag
        self.master_fd = master_fd
        self.process: asyncio.subprocess.Process | None = None
        self.pid = 0
        self.subscribers: set[StreamBuffer[pb.ProcessEvent]] = set()
        self.end: pb.ProcessEvent | None = None
        self.finished_at = 0.0
        self.tasks: list[asyncio.Task[None]] = []
        self._buffer_bytes = buffer_bytes

    def subscribe(self) -> StreamBuffer[pb.ProcessEvent]:
        buffer = StreamBuffer(pb.ProcessEvent, self._buffer_bytes)
        if self.end is not None:
            buffer.put(self.end)
            buffer.close()
        else:
            self.subscribers.add(buffer)
        return buffer

    def unsubscribe(self, buffer: StreamBuffer[pb.ProcessEvent]) -> None:
        self.subscribers.discard(buffer)
        buffer.discard()

    def publish(self, event: pb.ProcessEvent) -> None:
        for buffer in self.subscribers:
            buffer.put(event)

    async def room(self) -> None:
        """Wait until every attached stream has room for more output."""
        while full := [buffer for buffer in self.subscribers if not buffer.has_room]:
            await full[0].room()

    def info(self) -> pb.ProcessInfo:
        info = pb.ProcessInfo(config=self.config, pid=self.pid)
        if self.tag is not None:
            info.tag = self.tag
        return info

    def signal_group(self, signum: int) -> None:
        """Signal the command's process group (started with setsid: its id is the pid), only while the command
        itself has not been reaped: after that the number may belong to anyone's new group. What it left behind
        is the sandbox's cgroup's business (the freezer pauses it, the cgroup kill ends it)."""
        if self.process is not None and self.process.returncode is None:
            signal_group(self.pid, signum)


def signal_group(pgid: int, signum: int) -> None:
    """Signal a process group that may have gone already (or, in a jail, belong to another uid)."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signum)


class _Output:
    """Reads one output of a command (stdout, stderr or its terminal) into its streams, pausing while one is full."""

    def __init__(self, command: Command, kind: str) -> None:
        self.command = command
        self.kind = kind
        self.waiting = False  # waiting for the command to write (not for a client to read)
        self.last_data = 0.0
        self.done = False

    def _emit(self, chunk: bytes) -> None:
        self.last_data = asyncio.get_running_loop().time()
        if self.command.end is None:  # after the end, output is drained and dropped
            self.command.publish(pb.ProcessEvent(data=pb.ProcessEvent.DataEvent(**{self.kind: chunk})))

    async def _wait_for_room(self) -> None:
        await self.command.room()
        if self.command.end is not None:  # what a background child writes later is dropped, at a slow pace
            await asyncio.sleep(DROP_PAUSE)  # (it waits on a full pipe, rather than the server spinning)
        self.last_data = asyncio.get_running_loop().time()

    async def read_pipe(self, stream: asyncio.StreamReader) -> None:
        await self._pump(lambda: stream.read(READ_SIZE))

    async def read_pty(self, master_fd: int) -> None:
        await self._pump(lambda: _read_terminal(master_fd))

    async def _pump(self, next_chunk: Callable[[], Awaitable[bytes]]) -> None:
        """Emit chunks until the end of the output (an empty chunk), waiting for room after each."""
        try:
            while True:
                self.waiting = True
                chunk = await next_chunk()
                self.waiting = False
                if not chunk:
                    return
                self._emit(chunk)
                await self._wait_for_room()
        finally:
            self.done, self.waiting = True, False


async def _read_terminal(master_fd: int) -> bytes:
    """The next chunk a (non-blocking) terminal has; empty once every holder of its slave side is gone (EIO)."""
    loop = asyncio.get_running_loop()
    while True:
        await _readable(loop, master_fd)
        try:
            return os.read(master_fd, READ_SIZE)
        except BlockingIOError:
            continue
        except OSError:
            return b""


async def _write_terminal(master_fd: int, data: bytes) -> None:
    """Write all of `data` to a (non-blocking) terminal, waiting while its input buffer is full, up to
    INPUT_TIMEOUT: a program that reads nothing cannot hold the call forever."""
    view = memoryview(data)
    try:
        async with asyncio.timeout(INPUT_TIMEOUT):
            while view:
                try:
                    view = view[os.write(master_fd, view) :]
                except BlockingIOError:
                    await asyncio.sleep(0.01)
    except TimeoutError:
        raise ConnectError(
            "resource_exhausted", f"the terminal took no input for {INPUT_TIMEOUT:.0f} s; {len(view)} bytes not sent"
        ) from None
    except OSError as exc:
        raise ConnectError("failed_precondition", f"the terminal is closed: {os.strerror(exc.errno or 0)}") from None


async def _readable(loop: asyncio.AbstractEventLoop, fd: int) -> None:
    ready: asyncio.Future[None] = loop.create_future()

    def readable() -> None:
        if not ready.done():
            ready.set_result(None)

    loop.add_reader(fd, readable)
    try:
        await ready
    finally:
        loop.remove_reader(fd)


async def _exit_code(process: asyncio.subprocess.Process) -> int:
    """The exit status as soon as the process exits; asyncio's wait() alone would also wait for every holder of
    its pipes (a background child) to close them."""
    waiter = asyncio.ensure_future(process.wait())
    try:
        while not waiter.done() and process.returncode is None:
            await asyncio.wait({waiter}, timeout=EXIT_POLL)
    finally:
        waiter.cancel()
    returncode = process.returncode
    assert returncode is not None
    return returncode


async def _drain_after_exit(outputs: list[_Output]) -> None:
    """Let output the command wrote before it exited arrive: until every output is closed, or has been quiet for
    OUTPUT_GRACE, or DRAIN_LIMIT has passed while no client held it back."""
    loop = asyncio.get_running_loop()
    exited = loop.time()
    active = 0.0
    while not all(output.done for output in outputs):
        now = loop.time()
        quiet = [o.done or (o.waiting and now - max(o.last_data, exited) >= OUTPUT_GRACE) for o in outputs]
        if all(quiet) or active >= DRAIN_LIMIT:
            return
        await asyncio.sleep(EXIT_POLL)
        if all(output.done or output.waiting for output in outputs):
            active += EXIT_POLL


class ProcessManager:
    """Every command of one sandbox: Start, Connect, List, SendInput, SendSignal, Update; pause and shutdown."""

    def __init__(
        self,
        resolve_cwd: Callable[[str], Path],
        env: Callable[[], dict[str, str]],
        launcher: Launcher | None = None,
        *,
        buffer_bytes: int = 4 * MiB,
    ) -> None:
        self._resolve_cwd = resolve_cwd
        self._env = env
        self._buffer_bytes = buffer_bytes  # per attached stream; beyond it the command's output is not read
        self._launcher = launcher  # turns (argv, env, cwd) into a launch inside the sandbox's jail
        self._commands: dict[int, Command] = {}
        self._paused = False

    @property
    def running(self) -> list[Command]:
        return [command for command in self._commands.values() if command.end is None]

    async def start(self, request: pb.StartRequest, keepalive: float) -> AsyncIterator[pb.StartResponse]:
        command = await self._spawn(request)
        async for event in self._follow(command, keepalive):
            yield pb.StartResponse(event=event)

    async def connect(self, request: pb.ConnectRequest, keepalive: float) -> AsyncIterator[pb.ConnectResponse]:
        command = self._select(request.process, finished_too=True)
        async for event in self._follow(command, keepalive):
            yield pb.ConnectResponse(event=event)

    async def _follow(self, command: Command, keepalive: float) -> AsyncIterator[pb.ProcessEvent]:
        """Events for one attached stream, the start event first, until the command ends; leaving early leaves the
        command running."""
        buffer = command.subscribe()
        try:
            yield pb.ProcessEvent(start=pb.ProcessEvent.StartEvent(pid=command.pid))
            while True:
                try:
                    async with asyncio.timeout(keepalive):  # not wait_for: before 3.12 it can swallow a cancel
                        event = await buffer.get()
                except TimeoutError:
                    yield pb.ProcessEvent(keepalive=pb.ProcessEvent.KeepAlive())
                    continue
                if event is None:
                    return
                yield event
                if event.HasField("end"):
                    return
        finally:
            command.unsubscribe(buffer)

    async def _spawn(self, request: pb.StartRequest) -> Command:
        config = request.process
        if not config.cmd:
            raise ConnectError("invalid_argument", "process.cmd must name the program to run")
        problem = request_problem(request)  # NUL bytes, environment names, a terminal's size
        if problem:
            raise ConnectError("invalid_argument", problem)
        cwd = self._resolve_cwd(config.cwd if config.HasField("cwd") and config.cwd else "")
        env = self._env()
        env.update(config.envs)
        use_pty = request.HasField("pty")
        if use_pty:
            env.setdefault("TERM", "xterm-256color")
        command = Command(config, request.tag if request.HasField("tag") else None, None, self._buffer_bytes)
        argv = [config.cmd, *config.args]
        try:
            if self._launcher is not None:
                argv, env, cwd = await self._launcher(argv, env, cwd)
            if use_pty:
                command.process = await self._spawn_pty(command, argv, env, cwd, request.pty.size)
            else:
                command.process = await asyncio.create_subprocess_exec(
                    *argv,
                    stdin=asyncio.subprocess.PIPE,
                    stdout=asyncio.subprocess.PIPE,
                    stderr=asyncio.subprocess.PIPE,
                    cwd=cwd,
                    env=env,
                    start_new_session=True,
                )
        except OSError as exc:
            reason = (exc.strerror or str(exc)).lower()
            raise ConnectError("invalid_argument", f"cannot start {config.cmd}: {reason}") from None
        command.pid = command.process.pid
        self._commands[command.pid] = command
        if self._paused:
            command.signal_group(signal.SIGSTOP)
        command.tasks.append(asyncio.create_task(self._supervise(command), name=f"scalebox command {command.pid}"))
        return command

    async def _spawn_pty(
        self, command: Command, argv: list[str], env: dict[str, str], cwd: Path, size: pb.PTY.Size
    ) -> asyncio.subprocess.Process:
        master, slave = pty.openpty()
        try:
            _set_size(master, size)
            os.set_blocking(master, False)

            def become_session_leader() -> None:  # runs in the child: the terminal becomes its controlling tty
                os.setsid()
                fcntl.ioctl(0, termios.TIOCSCTTY, 0)

            process = await asyncio.create_subprocess_exec(
                *argv, stdin=slave, stdout=slave, stderr=slave, cwd=cwd, env=env, preexec_fn=become_session_leader
            )
        except BaseException:
            os.close(master)
            raise
        finally:
            os.close(slave)
        command.master_fd = master
        return process

    async def _supervise(self, command: Command) -> None:
        """Read output until the command exits, then tell every attached stream how it ended."""
        process = command.process
        assert process is not None
        if command.master_fd is not None:
            outputs = [_Output(command, "pty")]
            readers = [asyncio.create_task(outputs[0].read_pty(command.master_fd))]
        else:
            assert process.stdout is not None and process.stderr is not None
            outputs = [_Output(command, "stdout"), _Output(command, "stderr")]
            readers = [
                asyncio.create_task(outputs[0].read_pipe(process.stdout)),
                asyncio.create_task(outputs[1].read_pipe(process.stderr)),
            ]
        returncode = await _exit_code(process)
        await _drain_after_exit(outputs)
        command.end = pb.ProcessEvent(end=_end_event(returncode))
        command.finished_at = time.monotonic()
        command.publish(command.end)
        for buffer in command.subscribers:
            buffer.close()
        command.subscribers.clear()
        await asyncio.gather(*readers, return_exceptions=True)  # keep draining so writers never block
        if command.master_fd is not None:
            os.close(command.master_fd)
            command.master_fd = None

    def _select(self, selector: pb.ProcessSelector, *, finished_too: bool = False) -> Command:
        self._forget_finished()
        which = selector.WhichOneof("selector")
        if which == "tag":
            for candidate in self._commands.values():
                if candidate.tag == selector.tag and (finished_too or candidate.end is None):
                    return candidate
            raise ConnectError("not_found", f"process with tag {selector.tag!r} not found")
        command = self._commands.get(selector.pid)
        if command is None or (command.end is not None and not finished_too):
            raise ConnectError("not_found", f"process with pid {selector.pid} not found")
        return command

    def _forget_finished(self) -> None:
        cutoff = time.monotonic() - FINISHED_TTL
        for pid, command in list(self._commands.items()):
            if command.end is not None and command.finished_at < cutoff:
                del self._commands[pid]

    def list(self) -> pb.ListResponse:
        self._forget_finished()
        return pb.ListResponse(processes=[command.info() for command in self.running])

    async def send_input(self, request: pb.SendInputRequest) -> pb.SendInputResponse:
        command = self._select(request.process)
        which = request.input.WhichOneof("input")
        data = request.input.stdin if which == "stdin" else request.input.pty
        if command.master_fd is not None:
            await _write_terminal(command.master_fd, data)
        else:
            stdin = command.process.stdin if command.process else None
            if stdin is None or stdin.is_closing():
                raise ConnectError("failed_precondition", f"process with pid {command.pid} has closed its stdin")
            stdin.write(data)
            with contextlib.suppress(ConnectionError):
                await stdin.drain()
        return pb.SendInputResponse()

    def send_signal(self, request: pb.SendSignalRequest) -> pb.SendSignalResponse:
        command = self._select(request.process)
        signum = _SIGNALS.get(request.signal)
        if signum is None:
            raise ConnectError("invalid_argument", "signal must be SIGNAL_SIGTERM or SIGNAL_SIGKILL")
        command.signal_group(signum)
        if self._paused:
            command.signal_group(signal.SIGCONT)  # a stopped process only dies once it runs again
        return pb.SendSignalResponse()

    def update(self, request: pb.UpdateRequest) -> pb.UpdateResponse:
        command = self._select(request.process)
        if request.HasField("pty"):
            if command.master_fd is None:
                raise ConnectError("invalid_argument", f"process with pid {command.pid} has no terminal to resize")
            _set_size(command.master_fd, request.pty.size)
        return pb.UpdateResponse()

    def pause(self) -> None:
        """SIGSTOP the process group of every running command (the cgroup freezer, when the sandbox has one, stops
        everything else too)."""
        self._paused = True
        for command in self._commands.values():
            command.signal_group(signal.SIGSTOP)

    def resume(self) -> None:
        self._paused = False
        for command in self._commands.values():
            command.signal_group(signal.SIGCONT)

    async def shutdown(self) -> None:
        """Kill every command's process group and stop reading their output."""
        for command in self._commands.values():
            command.signal_group(signal.SIGKILL)
            command.signal_group(signal.SIGCONT)
        tasks = [task for command in self._commands.values() for task in command.tasks]
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=5)
            for task in pending:
                task.cancel()
        for command in self._commands.values():
            if command.master_fd is not None:
                with contextlib.suppress(OSError):
                    os.close(command.master_fd)
                command.master_fd = None
        self._commands.clear()


def _set_size(master_fd: int, size: pb.PTY.Size) -> None:
    rows, cols = size.rows or 24, size.cols or 80
    fcntl.ioctl(master_fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))
