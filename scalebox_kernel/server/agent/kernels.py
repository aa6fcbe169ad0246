"""One context's Jupyter kernel: started on demand, one cell at a time, its iopub output turned into protocol events.

Each cell runs in a task of its own that the Execute stream only reads from, so a client that disconnects can
not cancel it half way: the task interrupts the kernel, waits for it to settle, and only then lets the next cell
in. A kernel that dies mid-cell is reported in the cell and restarted.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import signal
from collections.abc import AsyncGenerator, Callable, Mapping
from pathlib import Path
from typing import IO, Any

from jupyter_client.asynchronous import AsyncKernelClient
from jupyter_client.kernelspec import KernelSpec, KernelSpecManager
from jupyter_client.manager import AsyncKernelManager
from traitlets import Instance

from ...protocol import pb
from ...protocol.connect import ConnectError
from ...protocol.mime import bundle_to_fields
from ..isolation.sandbox import SandboxIsolation
from .process import signal_group
from .runtimes import KernelLaunch, Runtime

log = logging.getLogger(__name__)

POLL = 0.2  # seconds between iopub polls (also how fast a disconnect is noticed)
ALIVE_CHECK = 0.5  # seconds between checks that the kernel process still runs
INTERRUPT_GRACE = 10.0  # seconds an interrupted cell may take to stop before the kernel is restarted
SILENT_TIMEOUT = 30.0  # seconds for a silent helper request (env vars) to be answered
LATE_OUTPUT_WAIT = 2.0  # seconds to wait for the barrier that collects output a kernel sends after idle

_Item = pb.ExecuteResponse | ConnectError | None


class _OneSpec(KernelSpecManager):
    """Hands jupyter_client the kernelspec we built, instead of looking one up on disk."""

    spec = Instance(KernelSpec)

    def get_kernel_spec(self, kernel_name: str) -> KernelSpec:
        return self.spec


class _Cell:
    """What flows from a cell's task to its Execute stream, and whether that stream is still there."""

    def __init__(self) -> None:
        self.items: asyncio.Queue[_Item] = asyncio.Queue()
        self.abandoned = asyncio.Event()

    def put(self, item: _Item) -> None:
        self.items.put_nowait(item)


def restarted_notice(runtime: Runtime, why: str) -> str:
    """The stderr line a cell gets before it runs in a kernel that lost the state of earlier cells."""
    return f"scalebox-local: the {runtime.name} kernel {why}; variables from earlier cells are gone.\n"


def _stderr(text: str) -> pb.ExecuteResponse:
    return pb.ExecuteResponse(stderr=pb.Output(content=text))


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
    ) -> None:
        self.runtime = runtime
        self._launch = launch
        self._cwd = cwd
        self._runtime_dir = runtime_dir
        self._name = name
        self._start_timeout = start_timeout
        self._isolation = isolation
        self.lock = asyncio.Lock()
        self.notice: str | None = None  # stderr line written before the next cell runs
        self._km: AsyncKernelManager | None = None
        self._kc: AsyncKernelClient | None = None
        self._log: IO[bytes] | None = None
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
        async with self.lock:
            try:
                await self._ensure_started()
            except Exception as exc:  # reported again, to the client, by the first cell
                log.warning("could not start the %s kernel of %s: %s", self.runtime.name, self._name, exc)

    async def _ensure_started(self) -> None:
        if self._closed:
            raise ConnectError("not_found", f"context {self._name} was destroyed")
        if self._km is not None and await self._km.is_alive():
            return
        if self._km is not None:
            self.notice = self.notice or restarted_notice(self.runtime, "of this context had stopped and was restarted")
            await self._stop()
        await self._start()

    async def _start(self) -> None:
        launch = self._launch()
        self._isolation.own_paths_in(launch.env)  # package directories the runtime made for the kernel
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
        km = self._isolation.kernel_manager(relay=not self.runtime.ipc_transport, cwd=self._cwd, **manager)
        self._log = open(self._runtime_dir / f"kernel-{self._name}.log", "ab")  # noqa: SIM115 (closed in _stop)
        self._km = km
        try:
            await km.start_kernel(env=launch.env, cwd=str(self._cwd), stdout=self._log, stderr=self._log)
            kc: AsyncKernelClient = km.client()
            self._kc = kc
            kc.start_channels()
            await kc.wait_for_ready(timeout=self._start_timeout)
            startup = self.runtime.startup_code()
            if startup:
                await self._silent(startup)
        except Exception as exc:
            await self._stop()
            reason = str(exc) or type(exc).__name__
            raise ConnectError(
                "unavailable", f"the {self.runtime.name} kernel did not start: {reason} (see {self._log_name})"
            ) from None
        if self._paused:
            self.signal_group(signal.SIGSTOP)

    @property
    def _log_name(self) -> str:
        return f"kernel-{self._name}.log in the sandbox's runtime directory"

    async def _stop(self) -> None:
        km, kc, self._km, self._kc = self._km, self._kc, None, None
        if kc is not None:
            kc.stop_channels()
        if km is not None:
            self.signal_group(signal.SIGCONT, km)
            with contextlib.suppress(Exception):
                await km.shutdown_kernel(now=True)
        if self._log is not None:
            self._log.close()
            self._log = None

    async def restart(self) -> None:
        await self._stop()
        await self._start()

    async def shutdown(self) -> None:
        """Stop the kernel for good (the context was destroyed or the sandbox is going away)."""
        self._closed = True
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._stop()

    def signal_group(self, signum: int, km: AsyncKernelManager | None = None) -> None:
        """Send a signal to the kernel's process group (jupyter_client starts each kernel in its own session)."""
        km = km or self._km
        process = getattr(km.provisioner, "process", None) if km is not None and km.provisioner else None
        if process is not None:
            signal_group(process.pid, signum)

    def pause(self) -> None:
        self._paused = True
        self.signal_group(signal.SIGSTOP)

    def resume(self) -> None:
        self._paused = False
        self.signal_group(signal.SIGCONT)

    # ------------------------------------------------------------------ cells

    async def execute(
        self, code: str, env_vars: Mapping[str, str], *, json_in_extra: bool, keepalive: float
    ) -> AsyncGenerator[pb.ExecuteResponse, None]:
        """Run one cell; yields its output as it arrives and an empty message when quiet for `keepalive` s."""
        cell = _Cell()
        self._spawn(self._run_cell(cell, code, env_vars, json_in_extra), "cell")
        done = False
        try:
            while True:
                try:
                    item = await asyncio.wait_for(cell.items.get(), keepalive)
                except TimeoutError:
                    yield pb.ExecuteResponse()
                    continue
                if item is None:
                    done = True
                    return
                if isinstance(item, ConnectError):
                    done = True
                    raise item
                yield item
        finally:
            if not done:
                cell.abandoned.set()  # the client went away: the cell's task interrupts the kernel

    async def _run_cell(self, cell: _Cell, code: str, env_vars: Mapping[str, str], json_in_extra: bool) -> None:
        async with self.lock:
            try:
                if cell.abandoned.is_set():
                    return  # the client left before its turn came
                await self._ensure_started()
                if self.notice:
                    cell.put(_stderr(self.notice))
                    self.notice = None
                env_code = self.runtime.env_code(env_vars) if env_vars else None
                if env_vars and env_code is None:
                    cell.put(_stderr(self._no_env_notice()))
                if env_code:
                    await self._silent(env_code[0])
                await self._run(cell, code, json_in_extra)
                if env_code and self._kc is not None:  # after a restart this finds nothing to restore
                    await self._silent(env_code[1])
            except ConnectError as exc:
                cell.put(exc)
            except asyncio.CancelledError:
                cell.put(ConnectError("unavailable", f"context {self._name} is shutting down"))
                raise
            except Exception as exc:
                log.exception("cell failed in %s", self._name)
                cell.put(ConnectError("internal", f"scalebox-local failed to run the cell: {exc}"))
            finally:
                cell.put(None)

    async def _silent(self, code: str) -> None:
        """Run helper code that must not show up as output or in history, and wait for it."""
        assert self._kc is not None
        msg_id = self._kc.execute(code, silent=True, store_history=False, allow_stdin=False)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._reply(msg_id), SILENT_TIMEOUT)

    async def _reply(self, msg_id: str) -> dict[str, Any]:
        assert self._kc is not None
        while True:
            msg = await self._kc.get_shell_msg()
            if msg["parent_header"].get("msg_id") == msg_id:
                return msg

    async def _run(self, cell: _Cell, code: str, json_in_extra: bool) -> None:
        kc, km = self._kc, self._km
        assert kc is not None and km is not None
        loop = asyncio.get_running_loop()
        output = self.runtime.cell_output(code)
        msg_id = kc.execute(code, silent=False, store_history=True, allow_stdin=False)
        reply = asyncio.ensure_future(self._reply(msg_id))
        idle = failed = False

        def deliver(msg_type: str, content: dict[str, Any]) -> None:
            nonlocal failed
            for normal_type, normal in output.message(msg_type, content):
                for event in self._events(normal_type, normal, json_in_extra):
                    failed = failed or event.HasField("error")
                    cell.put(event)

        interrupt_deadline: float | None = None
        next_alive_check = loop.time() + ALIVE_CHECK
        try:
            while not (idle and reply.done()):
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
                if idle:  # only the reply is missing now: wait for it, not for more iopub
                    await asyncio.wait({reply}, timeout=POLL)
                    msg = None
                else:
                    try:
                        msg = await kc.get_iopub_msg(timeout=POLL)
                    except queue.Empty:
                        msg = None
                if msg is not None and msg["parent_header"].get("msg_id") == msg_id:
                    if msg["msg_type"] == "status" and msg["content"].get("execution_state") == "idle":
                        idle = True
                    else:
                        deliver(msg["msg_type"], msg["content"])
                if loop.time() >= next_alive_check:
                    next_alive_check = loop.time() + ALIVE_CHECK
                    if not await km.is_alive():
                        cell.put(self._died())
                        await self.restart()
                        return
            if self.runtime.flush_barrier:
                await self._late_output(kc, msg_id, deliver)
            reply_content = reply.result()["content"]
            failed = failed or reply_content.get("status") == "error"
            for msg_type, content in output.reply(reply_content):
                for event in self._events(msg_type, content, json_in_extra):
                    failed = failed or event.HasField("error")
                    cell.put(event)
            if failed and self.runtime.settle_after_error:
                await asyncio.sleep(self.runtime.settle_after_error)
        finally:
            reply.cancel()

    async def _late_output(
        self, kc: AsyncKernelClient, msg_id: str, deliver: Callable[[str, dict[str, Any]], None]
    ) -> None:
        """Output the kernel sent after idle: a kernel_info round trip is the barrier (its idle comes after)."""
        barrier = kc.kernel_info()
        deadline = asyncio.get_running_loop().time() + LATE_OUTPUT_WAIT
        while asyncio.get_running_loop().time() < deadline:
            try:
                msg = await kc.get_iopub_msg(timeout=POLL)
            except queue.Empty:
                continue
            parent = msg["parent_header"].get("msg_id")
            if parent == msg_id and msg["msg_type"] != "status":
                deliver(msg["msg_type"], msg["content"])
            elif parent == barrier and msg["content"].get("execution_state") == "idle":
                return

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

    def _events(self, msg_type: str, content: dict[str, Any], json_in_extra: bool) -> list[pb.ExecuteResponse]:
        """One (normalised) kernel message as protocol events; clear_output has no place in the protocol."""
        if msg_type == "stream":
            output = pb.Output(content=content.get("text", ""))
            if content.get("name") == "stderr":
                return [pb.ExecuteResponse(stderr=output)]
            return [pb.ExecuteResponse(stdout=output)]
        if msg_type in ("execute_result", "display_data", "update_display_data"):
            # update_display_data cannot update anything on the wire; its new content arrives as one more result.
            fields = bundle_to_fields(content.get("data", {}), json_in_extra=json_in_extra)
            if msg_type == "execute_result":
                count = content.get("execution_count") or 0
                return [pb.ExecuteResponse(result=pb.Result(**fields, is_main_result=True, execution_count=count))]
            return [pb.ExecuteResponse(result=pb.Result(**fields, is_main_result=False))]
        if msg_type == "error":
            error = pb.Error(
                name=content.get("ename", ""),
                value=content.get("evalue", ""),
                traceback="\n".join(content.get("traceback", [])),
            )
            return [pb.ExecuteResponse(error=error)]
        return []
