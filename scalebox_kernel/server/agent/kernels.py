"""One context's Jupyter kernel: started on demand, one cell at a time, its iopub output turned into protocol events.

Each cell runs in a task of its own that the Execute stream only reads from, so a client that disconnects can
not cancel it half way: the task interrupts the kernel, waits for it to settle, and only then lets the next cell
in. A kernel that dies mid-cell is reported in the cell and restarted.

Nothing a cell prints is lost on the way: the kernel's iopub is drained all the time (`iopub.IopubReader`) into
the cell's `StreamBuffer`, which spills to a file on the sandbox's own disk (`SandboxIsolation.spill_dir`) when
the client reads slower than the cell prints. A cell ends on its execute_reply (the shell channel never drops)
plus its idle status; if the idle does not come, a kernel_info round trip stands in for it (its own status comes
after everything before it on iopub), so a lost message can never hang a cell. Messages that went missing are
reported on the cell's stderr.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import signal
from collections.abc import AsyncGenerator, Callable, Mapping
from pathlib import Path
from typing import Any

import zmq
import zmq.asyncio
from jupyter_client.asynchronous import AsyncKernelClient
from jupyter_client.kernelspec import KernelSpec, KernelSpecManager
from jupyter_client.manager import AsyncKernelManager
from traitlets import Instance

from ...protocol import pb
from ...protocol.connect import ConnectError
from ..isolation.sandbox import SandboxIsolation
from ..scrub import scrub
from ..streaming import MiB, StreamBuffer
from .channels import KernelClients
from .events import cell_events, merge_following, stderr_event
from .iopub import MAX_MESSAGE, IopubReader
from .kernel_log import KernelLog
from .process import signal_group
from .runtimes import KernelLaunch, Runtime

log = logging.getLogger(__name__)

POLL = 0.2  # seconds between looks at a running cell (also how fast a disconnect is noticed)
ALIVE_CHECK = 0.5  # seconds between checks that the kernel process still runs
INTERRUPT_GRACE = 10.0  # seconds an interrupted cell may take to stop before the kernel is restarted
SILENT_TIMEOUT = 30.0  # seconds for a silent helper request (env vars) to be answered
IDLE_WAIT = 1.0  # seconds of quiet iopub after the reply before a barrier stands in for a missing idle
BARRIER_WAIT = 2.0  # seconds a barrier may take (it also collects output a kernel sends after idle)
BARRIER_TRIES = 3  # barriers sent for a missing idle before the cell ends without one
LOSS_WAIT = 0.5  # seconds a numbered message may trail its successors before it counts as lost
READY_RETRY = 1.0  # seconds a starting kernel has to answer a kernel_info before it is asked again
IOPUB_WAIT = 0.2  # seconds for an iopub message once kernel_info is answered (else iopub is not subscribed yet)
#: Messages of a kernel started through IOPUB_LAUNCHER that wait for the iopub reader in the server's memory.
IOPUB_RCVHWM = 16
#: Messages of other kernels a Jupyter endpoint client's iopub socket holds in the server's memory before the
#: kernel's side drops for that client (a client that reads far slower than its kernel prints).
BRIDGE_RCVHWM = 10_000


class _OneSpec(KernelSpecManager):
    """Hands jupyter_client the kernelspec we built, instead of looking one up on disk."""

    spec = Instance(KernelSpec)

    def get_kernel_spec(self, kernel_name: str) -> KernelSpec:
        return self.spec


class _Cell:
    """What flows from a cell's task to its Execute stream, and whether that stream is still there."""

    def __init__(self, output: StreamBuffer[pb.ExecuteResponse]) -> None:
        self.output = output
        self.abandoned = asyncio.Event()

    def put(self, event: pb.ExecuteResponse) -> None:
        self.output.put(event)


class _CellEnd:
    """How far a running cell has come towards its end: iopub traffic, its idle, and the barrier's idle."""

    def __init__(self) -> None:
        self.idle = False
        self.barrier_idle = False
        self.last_activity = asyncio.get_running_loop().time()
        self.changed = asyncio.Event()

    def touch(self) -> None:
        self.last_activity = asyncio.get_running_loop().time()
        self.changed.set()

    async def wait(self, timeout: float) -> None:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                await self.changed.wait()
        self.changed.clear()


def restarted_notice(runtime: Runtime, why: str) -> str:
    """The stderr line a cell gets before it runs in a kernel that lost the state of earlier cells."""
    return f"scalebox-local: the {runtime.name} kernel {why}; variables from earlier cells are gone.\n"


class Kernel:
    """The kernel of one context."""

    def __init__(
        self,
        runtime: Runtime,
        launch: Callable[[], KernelLaunch],
        *,
        cwd: Path,
        runtime_dir: Path,
        name: str,
        start_timeout: float,
        isolation: SandboxIsolation,
        buffer_bytes: int = 4 * MiB,
    ) -> None:
        self.runtime = runtime
        self._launch = launch
        self._cwd = cwd
        self._move: str | None = None  # the chdir still to run (move_to)
        self._started_in: Path | None = None  # the cwd its running process was started in
        self._runtime_dir = runtime_dir
        self._name = name
        self._start_timeout = start_timeout
        self._isolation = isolation
        self._buffer_bytes = buffer_bytes  # per Execute stream, in memory; beyond it output spills to disk
        self.lock = asyncio.Lock()  # one Execute cell at a time
        self._start_lock = asyncio.Lock()  # one start, stop or restart at a time
        self.clients = KernelClients(self, buffer_bytes)  # WebSocket clients of the Jupyter endpoint
        self.notice: str | None = None  # stderr line written before the next cell runs
        self._km: AsyncKernelManager | None = None
        self._kc: AsyncKernelClient | None = None
        self._iopub: IopubReader | None = None
        self._log: KernelLog | None = None
        self._last_log: KernelLog | None = None  # its tail explains a kernel that did not start
        self._tasks: set[asyncio.Task[None]] = set()
        self._paused = False
        self._closed = False

    # ------------------------------------------------------------------ lifetime

    def _spawn(self, coro: Any, label: str) -> asyncio.Task[None]:
        task = asyncio.create_task(coro, name=f"scalebox {self._name} {label}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def warm(self) -> None:
        """Start the kernel in the background so the first cell does not wait for it."""
        self._spawn(self._warm(), "warm-up")

    async def _warm(self) -> None:
        try:
            await self._ensure_started()
        except Exception as exc:  # reported again, to the client, by the first cell
            log.warning("could not start the %s kernel of %s: %s", self.runtime.name, self._name, exc)

    async def ready(self) -> None:
        """Start the kernel if it is not running (a Jupyter endpoint client is about to use it)."""
        await self._ensure_started()
        if self._move is not None:
            async with self.lock:
                await self._moved()

    def move_to(self, cwd: Path, code: str) -> None:
        """Work in `cwd` from now on: a running (or starting) kernel runs `code` (its language's chdir) silently
        before anything else reaches it (started at once), and a restart starts there."""
        self._cwd = cwd
        self._move = code
        self._spawn(self._move_now(), "move")  # while its client is still on the way

    async def _move_now(self) -> None:
        try:
            await self.ready()
        except Exception as exc:  # the first use tries again, and tells its client
            log.debug("moving the %s kernel of %s ahead of use failed: %s", self.runtime.name, self._name, exc)

    async def _moved(self) -> None:
        """Run a pending move (under the lock, the kernel started), at most once; a kernel started since is
        already there."""
        code, self._move = self._move, None
        if code is not None and self._kc is not None and self._started_in != self._cwd:
            await self._silent(code)

    async def _ensure_started(self) -> None:
        async with self._start_lock:
            if self._closed:
                raise ConnectError("not_found", f"context {self._name} was destroyed")
            if self._km is not None and await self._km.is_alive():
                return
            if self._km is not None:
                why = "of this context had stopped and was restarted"
                self.notice = self.notice or restarted_notice(self.runtime, why)
                await self._stop()
            await self._start()

    # ------------------------------------------------------------------ the Jupyter endpoint's view

    @property
    def signer(self) -> Any:
        """The kernel's jupyter_client Session (its key signs what clients send)."""
        if self._km is None:
            raise ConnectError("unavailable", f"the kernel of {self._name} is not running")
        return self._km.session

    def connect_channel(self, channel: str, identity: bytes) -> zmq.asyncio.Socket:
        """A new socket on one channel of the running kernel (a SUB subscribed to everything for iopub)."""
        km = self._km
        if km is None:
            raise ConnectError("unavailable", f"the kernel of {self._name} is not running")
        if channel == "iopub":
            socket = km.connect_iopub()
            # A client's socket takes what its client has not read yet up to a bound (the Execute path's reader
            # takes everything: it has its own spill file); kernels of ours then hold the rest.
            socket.setsockopt(zmq.RCVHWM, IOPUB_RCVHWM if self.runtime.ipykernel_based else BRIDGE_RCVHWM)
        else:
            connect = {"shell": km.connect_shell, "control": km.connect_control, "stdin": km.connect_stdin}[channel]
            socket = connect(identity=identity)
        assert isinstance(socket, zmq.asyncio.Socket)  # an AsyncKernelManager's context makes asyncio sockets
        return socket

    @property
    def late_output(self) -> bool:
        return self.runtime.flush_barrier

    @property
    def execution_state(self) -> str:
        if self._iopub is None:
            return "starting" if not self._closed else "dead"
        return self._iopub.execution_state

    @property
    def last_activity(self) -> float:
        return self._iopub.last_activity if self._iopub is not None else 0.0

    async def interrupt(self) -> None:
        """The endpoint's interrupt: a signal or message to the kernel (a restart, for kernels that die of it)."""
        await self._ensure_started()
        await self._interrupt()

    async def _start(self) -> None:
        launch = self._launch()
        await self._isolation.make_dirs_in(launch.env)  # package directories, made as the sandbox
        spec = KernelSpec(
            argv=launch.argv,
            env={},
            display_name=self.runtime.display_name,
            language=self.runtime.name,
            interrupt_mode=launch.interrupt_mode,
            metadata=launch.metadata,
        )
        self._runtime_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        manager = dict(
            kernel_name=f"scalebox-{self.runtime.name}",
            kernel_spec_manager=_OneSpec(spec=spec),
            connection_file=str(self._runtime_dir / f"kernel-{self._name}.json"),
        )
        await self._isolation.ensure_running()
        cwd = self._cwd  # move_to may change it while this starts: a pending move then still runs
        km = self._isolation.kernel_manager(relay=not self.runtime.ipc_transport, cwd=cwd, **manager)
        self._log = KernelLog(self._runtime_dir / f"kernel-{self._name}.log")
        self._km = km
        try:
            writer = self._log.writer
            await km.start_kernel(env=launch.env, cwd=str(cwd), stdout=writer, stderr=writer)
            self._started_in = cwd
            self._log.started()
            kc: AsyncKernelClient = km.client()
            self._kc = kc
            # Kernels of ours never drop on iopub (no SNDHWM): a small RCVHWM makes them hold what the reader has
            # not taken yet. Others drop at their SNDHWM once our side stops taking, so ours takes everything.
            kc.context.setsockopt(zmq.RCVHWM, IOPUB_RCVHWM if self.runtime.ipykernel_based else 0)
            kc.context.setsockopt(zmq.MAXMSGSIZE, MAX_MESSAGE)
            # Only the channels the server uses: no heartbeat thread (the kernel's process is watched instead), and
            # input and interrupts go over the endpoint's sockets and the manager's own control socket.
            kc.start_channels(shell=True, iopub=True, stdin=False, hb=False, control=False)
            await self._until_ready(km, kc)
            self._iopub = IopubReader(kc.iopub_channel.socket, kc.session.auth, self._name)
            self._iopub.start()
            startup = self.runtime.startup_code()
            if startup:
                await self._silent(startup)
        except (Exception, asyncio.CancelledError) as exc:
            cancelled = isinstance(exc, asyncio.CancelledError)
            task = asyncio.current_task()
            if cancelled and (task is None or task.cancelling()):
                raise  # this task itself is being cancelled
            # Otherwise a cancel means our sockets were closed under the start (the kernel was shut down
            # meanwhile, its sandbox killed): a start that failed, like any other.
            await self._stop()
            reason = "it was shut down while it started" if cancelled else (str(exc) or type(exc).__name__)
            tail = scrub(self._last_log.tail()) if self._last_log is not None else ""
            said = f"; it said: {tail}" if tail else ""
            raise ConnectError("unavailable", f"the {self.runtime.name} kernel did not start: {reason}{said}") from None
        if self._paused:
            self.signal_group(signal.SIGSTOP)
        self.clients.reconnect()

    async def _until_ready(self, km: AsyncKernelManager, kc: AsyncKernelClient) -> None:
        """The kernel answered kernel_info and its iopub reaches us: jupyter_client's `wait_for_ready` without the
        0.2 s of iopub silence it then waits for (the iopub reader started next routes messages by the request
        they answer, so those of the start are nobody's anyway)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._start_timeout
        answered = False
        while loop.time() < deadline:
            if not answered:
                kc.kernel_info()  # again after a second without a reply (a kernel may miss one while it starts)
                with contextlib.suppress(queue.Empty):
                    reply = await kc.get_shell_msg(timeout=min(READY_RETRY, max(0.0, deadline - loop.time())))
                    answered = reply["msg_type"] == "kernel_info_reply"
            if answered:
                with contextlib.suppress(queue.Empty):  # some iopub message (its status, the welcome) arrived
                    await kc.get_iopub_msg(timeout=IOPUB_WAIT)
                    return
                answered = False  # iopub was not subscribed yet when it answered: ask again
            if not await km.is_alive():
                raise RuntimeError("the kernel process ended before it answered kernel_info")
        raise RuntimeError(f"the kernel did not answer kernel_info within {self._start_timeout:g} s")

    async def _stop(self) -> None:
        km, kc, iopub, self._km, self._kc, self._iopub = self._km, self._kc, self._iopub, None, None, None
        if iopub is not None:
            await iopub.stop()
        if kc is not None:
            kc.stop_channels()
        if km is not None:
            self.signal_group(signal.SIGCONT, km)
            with contextlib.suppress(Exception):
                await km.shutdown_kernel(now=True)
        if self._log is not None:
            self._log.close()
            self._last_log, self._log = self._log, None

    async def restart(self) -> None:
        async with self._start_lock:
            await self._stop()
            await self._start()

    async def shutdown(self, reason: str = "its context was destroyed") -> None:
        """Stop the kernel for good (the context was destroyed or the sandbox is going away)."""
        self._closed = True
        await self.clients.close(f"the kernel is gone: {reason}")
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._stop()

    def signal_group(self, signum: int, km: AsyncKernelManager | None = None) -> None:
        """Send a signal to the kernel's process group (jupyter_client starts each kernel in its own session)."""
        km = km or self._km
        process = getattr(km.provisioner, "process", None) if km is not None and km.provisioner else None
        if process is not None and process.poll() is None:  # once reaped, its number may be anyone's group
            signal_group(process.pid, signum)

    def pause(self) -> None:
        self._paused = True
        self.clients.pause()
        self.signal_group(signal.SIGSTOP)

    def resume(self) -> None:
        self._paused = False
        self.signal_group(signal.SIGCONT)

    # ------------------------------------------------------------------ cells

    async def execute(
        self, code: str, env_vars: Mapping[str, str], *, json_in_extra: bool, keepalive: float
    ) -> AsyncGenerator[pb.ExecuteResponse, None]:
        """Run one cell; yields its output as it arrives and an empty message when quiet for `keepalive` s."""
        output = StreamBuffer(pb.ExecuteResponse, self._buffer_bytes, spill_dir=self._isolation.spill_dir)
        cell = _Cell(output)
        self._spawn(self._run_cell(cell, code, env_vars, json_in_extra), "cell")
        done = False
        try:
            while True:
                try:
                    async with asyncio.timeout(keepalive):  # not wait_for: before 3.12 it can swallow a cancel
                        event = await output.get()
                except TimeoutError:
                    yield pb.ExecuteResponse()
                    continue
                except ConnectError:
                    done = True
                    raise
                if event is None:
                    done = True
                    return
                yield merge_following(event, output)
        finally:
            if not done:
                cell.abandoned.set()  # the client went away: the cell's task interrupts the kernel
            output.discard()

    async def _run_cell(self, cell: _Cell, code: str, env_vars: Mapping[str, str], json_in_extra: bool) -> None:
        error: ConnectError | None = None
        async with self.lock:
            try:
                if cell.abandoned.is_set():
                    return  # the client left before its turn came
                await self._ensure_started()
                await self._moved()
                if self.notice:
                    cell.put(stderr_event(self.notice))
                    self.notice = None
                env_code = self.runtime.env_code(env_vars) if env_vars else None
                if env_vars and env_code is None:
                    cell.put(stderr_event(self._no_env_notice()))
                if env_code:
                    await self._silent(env_code[0])
                await self._run(cell, code, json_in_extra)
                if env_code and self._kc is not None:  # after a restart this finds nothing to restore
                    await self._silent(env_code[1])
            except ConnectError as exc:
                error = exc
            except asyncio.CancelledError:
                error = ConnectError("unavailable", f"context {self._name} is shutting down")
                raise
            except Exception as exc:
                log.exception("cell failed in %s", self._name)
                error = ConnectError("internal", f"scalebox-local failed to run the cell: {exc}")
            finally:
                if cell.output.dropped:
                    notice = (
                        f"scalebox-local: {cell.output.dropped} output messages were dropped: the client read "
                        "nothing while more than the server keeps for it piled up.\n"
                    )
                    cell.output.put(stderr_event(notice), always=True)
                cell.output.close(error)

    async def _silent(self, code: str) -> None:
        """Run helper code that must not show up as output or in history, and wait for it."""
        assert self._kc is not None
        msg_id = self._kc.execute(code, silent=True, store_history=False, allow_stdin=False)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(SILENT_TIMEOUT):
                await self._reply(msg_id)

    async def _reply(self, msg_id: str) -> dict[str, Any]:
        assert self._kc is not None
        while True:
            msg = await self._kc.get_shell_msg()
            if msg["parent_header"].get("msg_id") == msg_id:
                return msg

    async def _run(self, cell: _Cell, code: str, json_in_extra: bool) -> None:
        kc, km, iopub = self._kc, self._km, self._iopub
        assert kc is not None and km is not None and iopub is not None
        loop = asyncio.get_running_loop()
        output = self.runtime.cell_output(code)
        end = _CellEnd()
        failed = False

        def deliver(msg_type: str, content: dict[str, Any]) -> None:
            nonlocal failed
            for normal_type, normal in output.message(msg_type, content):
                for event in cell_events(normal_type, normal, json_in_extra):
                    failed = failed or event.HasField("error")
                    cell.put(event)

        def on_cell(msg_type: str, content: dict[str, Any]) -> None:  # called by the iopub reader
            end.touch()
            if msg_type != "status":
                deliver(msg_type, content)
            elif content.get("execution_state") == "idle":
                end.idle = True

        def on_barrier(msg_type: str, content: dict[str, Any]) -> None:
            if msg_type == "status" and content.get("execution_state") == "idle":
                end.barrier_idle = True
                end.touch()

        msg_id = kc.execute(code, silent=False, store_history=True, allow_stdin=False)
        iopub.route(msg_id, on_cell)
        reply = asyncio.ensure_future(self._reply(msg_id))
        reply.add_done_callback(lambda _: end.touch())
        barriers: list[str] = []
        barrier_sent = 0.0
        interrupt_deadline: float | None = None
        next_alive_check = loop.time() + ALIVE_CHECK
        try:
            while True:
                if cell.abandoned.is_set() and interrupt_deadline is None:
                    interrupt_deadline = loop.time() + INTERRUPT_GRACE
                    if await self._interrupt():
                        return  # restarted instead: nothing of this cell is left to wait for
                if interrupt_deadline is not None and self._paused:
                    interrupt_deadline = loop.time() + INTERRUPT_GRACE  # a stopped kernel cannot react yet
                if interrupt_deadline is not None and loop.time() > interrupt_deadline:
                    self.notice = restarted_notice(self.runtime, "did not stop when interrupted, so it was restarted")
                    await self.restart()
                    return
                if reply.done():
                    if end.barrier_idle or (end.idle and not self.runtime.flush_barrier):
                        break
                    now = loop.time()
                    if self._paused:
                        barrier_sent = max(barrier_sent, now)  # a stopped kernel cannot answer yet
                    elif not barriers and (end.idle or now - end.last_activity >= IDLE_WAIT):
                        barriers.append(self._barrier(kc, iopub, on_barrier))
                        barrier_sent = now
                    elif barriers and now - barrier_sent >= BARRIER_WAIT:
                        if end.idle:
                            break  # the barrier only collects late output, and none came in time
                        if len(barriers) >= BARRIER_TRIES:
                            cell.put(stderr_event(self._no_end_notice()))
                            break
                        barriers.append(self._barrier(kc, iopub, on_barrier))
                        barrier_sent = now
                await end.wait(POLL)
                if loop.time() >= next_alive_check:
                    next_alive_check = loop.time() + ALIVE_CHECK
                    if not await km.is_alive():
                        cell.put(self._died())
                        await self.restart()
                        return
            await self._report_losses(cell, iopub)
            reply_content = reply.result()["content"]
            failed = failed or reply_content.get("status") == "error"
            for msg_type, content in output.reply(reply_content):
                for event in cell_events(msg_type, content, json_in_extra):
                    failed = failed or event.HasField("error")
                    cell.put(event)
            if failed and self.runtime.settle_after_error:
                await asyncio.sleep(self.runtime.settle_after_error)
        finally:
            reply.cancel()
            iopub.unroute(msg_id, *barriers)

    @staticmethod
    def _barrier(kc: AsyncKernelClient, iopub: IopubReader, handler: Callable[[str, dict[str, Any]], None]) -> str:
        """Send a kernel_info request; its idle on iopub comes after everything the kernel sent before it."""
        barrier = kc.kernel_info()
        iopub.route(barrier, handler)
        return barrier

    async def _report_losses(self, cell: _Cell, iopub: IopubReader) -> None:
        """Tell the cell how many numbered iopub messages never arrived (waiting briefly for stragglers)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + LOSS_WAIT
        while iopub.losses.missing() and loop.time() < deadline:
            await asyncio.sleep(0.05)
        lost = iopub.losses.settle()
        if lost:
            log.warning("%d iopub messages of %s were lost", lost, self._name)
            what = "1 output message was" if lost == 1 else f"{lost} output messages were"
            cell.put(stderr_event(f"scalebox-local: {what} lost on the way from the kernel.\n"))

    def _no_end_notice(self) -> str:
        return (
            f"scalebox-local: the {self.runtime.name} kernel never confirmed the end of this cell's output; "
            "some of it may be missing.\n"
        )

    def _no_env_notice(self) -> str:
        return (
            f"scalebox-local: the {self.runtime.name} kernel cannot change its environment per cell, so this "
            "cell's env_vars were not applied (set them when creating the sandbox instead).\n"
        )

    async def _interrupt(self) -> bool:
        """Interrupt the running cell; True if the kernel had to be restarted instead."""
        if self.runtime.interrupt_restarts:
            self.notice = restarted_notice(self.runtime, "cannot be interrupted, so it was restarted")
            await self.restart()
            return True
        assert self._km is not None
        with contextlib.suppress(Exception):
            await self._km.interrupt_kernel()
        return False

    def _died(self) -> pb.ExecuteResponse:
        value = f"the {self.runtime.name} kernel died while running this cell (restarted; state was lost)"
        name = "KernelDied"
        out_of_memory = self._isolation.out_of_memory()
        if out_of_memory:  # the cgroup's OOM killer took the kernel
            name = "OutOfMemory"
            value = f"{out_of_memory}; the {self.runtime.name} kernel was restarted and its state lost"
        return pb.ExecuteResponse(error=pb.Error(name=name, value=value, traceback=value))
