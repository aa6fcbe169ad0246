"""ScaleboxKernel: a Jupyter kernel whose cells run in a Scalebox sandbox (on the lean base of `base.py`).

Threads: shell requests (execute, complete, ...) are served on the main thread's asyncio loop and control
requests (interrupt, shutdown) on a control thread with its own loop (`base.WireKernel`). The sandbox session and
its HTTP connections belong to the main loop, so control handlers hand work over with `call_soon_threadsafe` /
`run_coroutine_threadsafe`.

Start-up: `kernel_info` is answered from this module's light imports alone (no IPython, ipykernel or
jupyter_client in the process). What runs cells (the session layer,
the client with httpx and protobuf, the `%scalebox` subcommands, the relay) is imported and built by the first
request that needs it (`_cells`), not at start. Those imports (about a quarter of a second) are made on a thread of
their own once the first `kernel_info` is answered, while the user types the first cell; a cell that comes sooner
waits for that thread instead of importing beside it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from traitlets import Bool, Float, Unicode, default

from .. import __version__
from ..config import ScaleboxConfig
from ..errors import InvalidArgument, ScaleboxError, redact
from . import introspect
from .base import WireKernel
from .cell_syntax import misplaced, split_cell, split_magic
from .history import LocalHistory
from .languages import get_language
from .notebooks import notebook_key
from .relay import CellRelay, split_traceback
from .wire import PROTOCOL_VERSION

if TYPE_CHECKING:
    from ..session import SandboxSession
    from ..subcommands import NamedSession
    from .channel import SandboxChannel
    from .commands import Background, NotebookSessions
    from .sandbox import NotebookSandbox

#: Requests about this kernel process, answered by it even when a sandbox's kernel answers the rest.
LOCAL_REQUESTS = frozenset({"kernel_info_request", "shutdown_request", "connect_request"})
#: VS Code runs hidden helper code (interpreter probe, Variables view) whose names start with this.
VSCODE_PREFIX = "_VSCODE_"
#: The notebook's own session (`subcommands.DEFAULT`, restated so that start-up does not import the subcommands).
DEFAULT = "default"
#: A cell that is only `exit` / `quit` (IPython's exiter), with or without `()` or `keep_kernel=True`.
EXIT_CELL = re.compile(r"(?:exit|quit)(?:\(\s*(?:keep_kernel\s*=\s*(?:True|False))?\s*\))?")


def _truthy(value: str | None) -> bool:
    return (value or "").strip().lower() in ("1", "true", "yes", "on")


class ScaleboxKernel(WireKernel):
    """Forwards every cell to a context in a Scalebox sandbox and relays what comes back."""

    implementation = "scalebox_kernel"
    implementation_version = __version__

    language = Unicode("python", config=True, help="The sandbox language this kernel runs cells in.")
    keep_sandbox = Bool(
        config=True,
        help="Keep the sandbox (and its state) when the kernel shuts down, so that reopening the notebook "
        "re-attaches while the sandbox lives. `%scalebox keep` sets it for one kernel. Env: SCALEBOX_KEEP_SANDBOX.",
    )

    @default("keep_sandbox")
    def _default_keep(self) -> bool:
        return _truthy(os.environ.get("SCALEBOX_KEEP_SANDBOX"))

    progress_delay = Float(
        config=True, help="Seconds before opening a sandbox shows a progress line. Env: SCALEBOX_PROGRESS_DELAY."
    )

    @default("progress_delay")
    def _default_progress_delay(self) -> float:
        return float(os.environ.get("SCALEBOX_PROGRESS_DELAY") or 1.0)

    preload = Bool(
        config=True,
        help="Import what runs cells (the client, the session layer, the relay) on a thread of its own once the first "
        "kernel_info is answered, so that the first cell does not wait for them. Env: SCALEBOX_PRELOAD.",
    )

    @default("preload")
    def _default_preload(self) -> bool:
        return _truthy(os.environ.get("SCALEBOX_PRELOAD", "1"))

    introspection_timeout = Float(2.0, config=True, help="Seconds completion and inspection may wait for the sandbox.")
    open_timeout = Float(90.0, config=True, help="Seconds opening a sandbox may take before the cell fails.")

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.lang = get_language(self.language)
        self.language_info = dict(self.lang.language_info)
        self.banner = f"{self.lang.display_name}: every cell runs in a Scalebox sandbox."
        # The one configuration (file, .env, environment, then this kernel's own options). A bad value does not
        # kill the kernel, which a frontend shows as a crash: every cell says what is wrong instead.
        self.config_error: str | None = None
        try:
            self.scalebox_config = ScaleboxConfig.load(config=self.config)
        except InvalidArgument as exc:
            self.config_error = str(exc)
            self.log.error("scalebox: %s", exc)
            self.scalebox_config = ScaleboxConfig.defaults()
        self.history = LocalHistory()
        parent = self.parent
        connection_file = getattr(parent, "abs_connection_file", None) or getattr(parent, "connection_file", None)
        self.notebook = notebook_key(connection_file)
        self._parts: _CellParts | None = None  # built by the first request that needs them
        self._exiting = False
        self._background_tasks: set[asyncio.Future[None]] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._cell_task: asyncio.Task[Any] | None = None
        self._interrupted = False
        self._lines_done = False
        self._count_locally = False
        self._widgets: bool | None = None
        self._preload: threading.Thread | None = None

    # ------------------------------------------------------------------------------------------ what runs cells

    @property
    def cells_ready(self) -> bool:
        """Whether what runs cells has been built (by a cell, `%scalebox` line, shutdown or restart)."""
        return self._parts is not None

    def _cells(self) -> _CellParts:
        """The notebook's sandbox, its named sessions, the relay and the background runner: imported and built on
        first use, so that the kernel process starts (and answers `kernel_info`) without them."""
        if self._parts is None:
            if self._preload is not None:
                self._preload.join()  # one thread imports a module at a time (two could deadlock on a cycle)
            from .channel import SandboxChannel
            from .commands import Background, NotebookSessions
            from .sandbox import NotebookSandbox

            sandbox = NotebookSandbox(
                self.scalebox_config,
                self.lang,
                self.notebook,
                keep=self.keep_sandbox,
                progress_delay=self.progress_delay,
                open_timeout=self.open_timeout,
            )
            sessions = NotebookSessions(sandbox, self.lang.kernel_name)
            channel = SandboxChannel(self)  # the relay to the sandbox's kernel (when the back end has one)
            sessions.describe_channel = channel.describe
            sandbox.busy = lambda: self._cell_task is not None or channel.busy()
            sandbox.on_idle_pause = self._paused_for_idle
            sandbox.still_paused = lambda: sessions.entry(DEFAULT).paused
            self._parts = _CellParts(sandbox, sessions, channel, Background())
        return self._parts

    @property
    def sandbox(self) -> NotebookSandbox:
        return self._cells().sandbox

    @property
    def sessions(self) -> NotebookSessions:
        return self._cells().sessions

    @property
    def channel(self) -> SandboxChannel:
        return self._cells().channel

    @property
    def run_later(self) -> Background:
        """Coroutines started from the kernel's loop (status panel clicks, remote interrupts)."""
        return self._cells().run_later

    # ------------------------------------------------------------------------------------------ identity

    def secrets(self) -> list[str]:
        return self.sessions.secrets() if self.cells_ready else self.scalebox_config.secrets()

    def widgets_ready(self) -> bool:
        """Whether ipywidgets (the status panel) can be shown: it is installed, and its comm targets registered."""
        if self._widgets is None:
            self.comm_manager  # noqa: B018  (ipywidgets then registers its targets with this kernel's manager)
            try:
                import ipywidgets
            except ImportError:
                self._widgets = False
            else:
                ipywidgets.register_comm_target()
                self._widgets = True
        return self._widgets

    async def kernel_info_request(self, stream: Any, ident: Any, parent: Any) -> None:
        await super().kernel_info_request(stream, ident, parent)
        if self.preload and self._preload is None and self._parts is None:  # after the reply, never before it
            self._preload = threading.Thread(target=self._import_cell_parts, name="scalebox-preload", daemon=True)
            self._preload.start()

    def _import_cell_parts(self) -> None:
        """Import what `_cells` builds from, ahead of the first cell (on the preload thread)."""
        try:
            from . import channel, commands, sandbox  # noqa: F401
        except Exception:  # the cell that needs them imports them again, and shows what fails
            self.log.debug("preloading what runs cells failed", exc_info=True)

    @property
    def kernel_info(self) -> dict[str, Any]:
        """Answered from local data at once (the sandbox is opened by the first cell, not by frontends' probes)."""
        return {
            "protocol_version": PROTOCOL_VERSION,
            "implementation": self.implementation,
            "implementation_version": self.implementation_version,
            "language_info": self.language_info,
            "banner": self.banner,
            "help_links": self.help_links,
            "supported_features": [],
        }

    # ------------------------------------------------------------------------------------------ signals

    def start(self) -> None:
        super().start()
        # A frontend may still send SIGINT (signal-mode interrupt): treat it as the interrupt message.
        self._loop = self.loop
        assert self._loop is not None
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            self._loop.add_signal_handler(signal.SIGINT, self._interrupt_cell)

    async def interrupt_request(self, stream: Any, ident: Any, parent: Any) -> None:
        """Runs on the control thread: on the main loop, cancel the in-flight cell (closing the Execute stream,
        which the sandbox treats as an interrupt, or stopping a sandbox that is still opening) and interrupt the
        sandbox kernel the relay goes to; reply at once."""
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._interrupt_cell)
        self.session.send(stream, "interrupt_reply", {"status": "ok"}, parent, ident=ident)

    def _interrupt_cell(self, *, remote: bool = True) -> None:
        task = self._cell_task
        if task is not None and not task.done():
            self._interrupted = True
            task.cancel()
        if remote and self.cells_ready and self.channel.open:
            self.run_later(self.channel.interrupt(), lambda _result: None)

    # ------------------------------------------------------------------------------------------ the relay

    async def relay(self, idents: list[bytes], msg: dict[str, Any]) -> bool:
        """Relay a frontend request to the sandbox kernel when it is one the sandbox answers; anything else (and
        everything on the ExecutionService path) is handled here, by the base's handlers."""
        try:
            return await self._relay(idents, msg)
        except Exception:
            self.log.exception("Relaying a message to the sandbox failed")
            return False

    async def _relay(self, idents: list[bytes], parsed: dict[str, Any]) -> bool:
        """True if the request went to the sandbox kernel (or was answered on its behalf)."""
        header = parsed["header"]
        msg_type = header.get("msg_type", "")
        if msg_type in LOCAL_REQUESTS or (msg_type != "execute_request" and not self.cells_ready):
            return False  # about this kernel process itself; nothing goes to a sandbox before a cell opened one
        if not (self.channel.wanted or msg_type == "execute_request"):
            return False
        if self.config_error:  # nothing goes anywhere with a broken configuration: each cell says what is wrong
            return False
        parts: list[bytes] = list(parsed["parts"])
        buffers = list(parsed["buffers"])
        stream = self.shell_stream
        if msg_type == "execute_request":
            return await self._relay_cell(stream, list(idents), parsed, parts, buffers)
        if msg_type in ("comm_msg", "comm_close"):
            comm_id = parsed["content"].get("comm_id")
            if comm_id in self.comm_manager.comms:  # one of ours (the status panel)
                return False
        if not self.channel.open or self.sessions.entry().paused:
            return False  # no sandbox yet, or a paused one: completion, inspection and the rest are answered here
        await self.channel.forward(stream, list(idents), header, parts, buffers)
        return True

    async def _relay_cell(
        self, stream: Any, idents: list[bytes], parsed: dict[str, Any], parts: list[bytes], buffers: list[Any]
    ) -> bool:
        content = dict(parsed["content"])  # parsed once, by the base; a copy, as the lines may be taken out below
        code = content.get("code")
        if not isinstance(code, str):
            return False  # answered here, as a request of the wrong shape: no sandbox is opened for it
        silent = bool(content.get("silent"))
        store_history = bool(content.get("store_history", not silent))
        lines, rest = split_cell(code)
        if misplaced(rest) is not None or not rest.strip():
            self._count_locally = True  # a cell of %scalebox lines (or a usage error) takes no sandbox number
            return False
        if split_magic(rest) is not None:
            return False  # %%scalebox cells run over ExecutionService (another language or session, -l/--env)
        if self.sessions.entry().envs:
            return False  # per-cell env vars (%scalebox env) are applied on the ExecutionService path
        if code.lstrip().startswith(VSCODE_PREFIX) and (silent or not store_history) and not self.channel.open:
            return False  # VS Code's hidden helpers never open a sandbox
        self.set_parent(idents, parsed, channel="shell")
        # No status of our own: the sandbox kernel's busy and idle frame the cell (a progress line while its
        # sandbox opens, and what %scalebox lines print, come before them).
        relay = CellRelay(self, silent=silent, execution_count=self.execution_count + 1)
        self._interrupted = False
        task = asyncio.ensure_future(self._open_for_cell(lines, relay))
        self._cell_task = task
        try:
            connected = await task
        except BaseException as exc:
            if isinstance(exc, asyncio.CancelledError) and not self._interrupted:
                raise
            self._publish_status("busy", "shell")
            reply = self._cell_failure(exc, relay)
            self.session.send(stream, "execute_reply", reply, parent=parsed, ident=idents)
            self._publish_status("idle", "shell")
            if not silent and content.get("stop_on_error", True):
                self._abort_queue = True  # the cells queued behind it would fail the same way
            return True
        finally:
            self._cell_task = None
            self._interrupted = False
        if not connected:
            self._lines_done = bool(lines)
            return False  # the ExecutionService path: ipykernel's dispatch runs the cell (without the lines again)
        if lines:
            content["code"] = rest
            parts = [*parts[:3], json.dumps(content).encode()]
        await self.channel.forward(stream, idents, parsed["header"], parts, buffers)
        if not silent:
            self.sandbox.activity()
        return True

    def exit_soon(self) -> None:
        """`exit`/`quit` in a cell, as ipykernel does it: the reply has gone out with IPython's ask_exit payload (a
        console exits on it, JupyterLab restarts the kernel); then the sandbox is let go of as at shutdown (killed
        unless kept) and this kernel process ends."""
        if self._exiting:
            return
        self._exiting = True

        async def leave() -> None:
            try:
                await asyncio.wait_for(self._close(False), 20)
            except Exception as exc:
                self.log.warning("Scalebox kernel exit: %s", redact(str(exc), self.secrets()))
            asyncio.get_running_loop().call_later(0.1, self.stop)

        task = asyncio.ensure_future(leave())
        self._background_tasks.add(task)
        task.add_done_callback(self._background_tasks.discard)

    def orphaned(self) -> None:
        """The process that started this kernel is gone: let go of the sandbox as at shutdown, then end."""
        self.exit_soon()

    def _paused_for_idle(self) -> None:
        self.sessions.entry(DEFAULT).paused = True  # completion and the like are answered here meanwhile

    async def _wake(self, relay: CellRelay) -> None:
        """A cell is here: resume the sandbox if it was paused for idleness, saying so once."""
        if relay.silent:
            return
        notice = await self.sandbox.wake()
        if notice:
            self.sessions.entry(DEFAULT).paused = False
            relay.stream("stderr", notice)

    async def _open_for_cell(self, lines: list[str], relay: CellRelay) -> bool:
        from .commands import run_line

        await self._wake(relay)
        for line in lines:
            await run_line(self, line, relay)
        return await self.channel.ensure(relay)

    def _cell_failure(self, exc: BaseException, relay: CellRelay) -> dict[str, Any]:
        from ..subcommands import SubcommandError

        if isinstance(exc, asyncio.CancelledError):
            return relay.error("KeyboardInterrupt", "", ["KeyboardInterrupt: the cell was interrupted."])
        if not isinstance(exc, ScaleboxError):
            self.log.error("Cell failed inside the Scalebox kernel", exc_info=exc)
        ename = "UsageError" if isinstance(exc, SubcommandError) else type(exc).__name__
        message = redact(str(exc), self.secrets())
        return relay.error(ename, message, [f"{ename}: {message}"])

    # ------------------------------------------------------------------------------------------ the sandbox

    async def open_session(self, relay: CellRelay) -> SandboxSession:
        """The current session's sandbox (at first the notebook's), opened by the first cell that needs it."""
        from .commands import CellOutput

        return await self.sessions.open(self.sessions.entry(), CellOutput(self, relay), self.lang.wire)

    async def run(
        self,
        code: str,
        relay: CellRelay,
        *,
        timeout: float | None = None,
        language: str | None = None,
        entry: NamedSession | None = None,
        envs: dict[str, str] | None = None,
    ) -> dict[str, Any]:
        """Run `code` in the current session's context (or `entry`'s, for `language`), relaying its output; a
        sandbox that expired or was killed since the last cell is replaced (and that announced) if nothing of
        this cell ran yet. The execute_reply content."""
        from .commands import CellOutput

        entry = entry or self.sessions.entry()
        _session, execution = await self.sessions.run(
            entry,
            CellOutput(self, relay),
            code,
            language=language or self.lang.wire,
            envs=(entry.envs if envs is None else envs) or None,
            on_stdout=relay.on_stdout,
            on_stderr=relay.on_stderr,
            on_result=relay.on_result,
            on_error=relay.on_error,
            timeout=timeout or self.scalebox_config.execution_timeout or None,
        )
        if execution.error is not None:
            err = execution.error
            return {
                "status": "error",
                "execution_count": relay.execution_count,
                "ename": err.name,
                "evalue": err.value,
                "traceback": split_traceback(err.traceback),
            }
        return relay.ok()

    async def _run_code(self, session: SandboxSession, code: str, relay: CellRelay, limit: float | None) -> Any:
        return await session.run_code(
            code,
            language=self.lang.wire,
            envs=self.sessions.entry().envs or None,
            on_stdout=relay.on_stdout,
            on_stderr=relay.on_stderr,
            on_result=relay.on_result,
            on_error=relay.on_error,
            timeout=limit,
        )

    # ------------------------------------------------------------------------------------------ execute

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
        self._loop = asyncio.get_running_loop()
        if not silent and (not store_history or self._count_locally):
            # Like IPython, only stored cells are counted; with the relay the sandbox kernel counts, and a cell
            # of %scalebox lines only (handled here) takes none of its numbers.
            self.execution_count -= 1
        self._count_locally = False
        count = self.execution_count
        relay = CellRelay(self, silent=silent, execution_count=count)
        if (
            code.lstrip().startswith(VSCODE_PREFIX)
            and (silent or not store_history)
            and not self.sessions.entry().session
        ):
            # VS Code's hidden helpers never open a sandbox; once one is open they run there like any code.
            return relay.ok()

        self._interrupted = False
        task = asyncio.ensure_future(self._cell(code, relay))
        self._cell_task = task
        try:
            reply = await task
        except asyncio.CancelledError:
            if not self._interrupted:
                raise
            reply = relay.error("KeyboardInterrupt", "", ["KeyboardInterrupt: the cell was interrupted."])
        except Exception as exc:
            reply = self._cell_failure(exc, relay)
        finally:
            self._cell_task = None
            self._interrupted = False
        if store_history and not silent:
            self.history.add(count, code, relay.main_text)
        if not silent:
            self.sandbox.activity()
        return reply

    async def _cell(self, code: str, relay: CellRelay) -> dict[str, Any]:
        from .commands import run_line, run_magic

        if self.config_error:
            why = f"{self.config_error} (fix it, then restart the kernel)"
            return relay.error("ConfigError", why, [f"ConfigError: {why}"])
        lines, rest = split_cell(code)
        if not self._lines_done:  # else _open_for_cell woke it already
            await self._wake(relay)
        if self._lines_done:  # they ran before the relay found it had to fall back
            lines, self._lines_done = [], False
        for line in lines:
            await run_line(self, line, relay)
        if not rest.strip():
            return relay.ok()
        if self.lang.key == "python" and EXIT_CELL.fullmatch(rest.strip()):  # ExecutionService carries no payload
            keep = "keep_kernel=True" in rest.replace(" ", "")
            reply = relay.ok()
            reply["payload"] = [{"source": "ask_exit", "keepkernel": keep}]
            if not keep:
                self.exit_soon()
            return reply
        magic = split_magic(rest)
        if magic is not None:
            return await run_magic(self, *magic, relay)
        problem = misplaced(rest)
        if problem:
            return relay.error("UsageError", problem, [f"UsageError: {problem}"])
        target = introspect.help_target(rest) if self.lang.key == "python" else None
        if target is not None:
            return await self._page(target, relay)
        return await self.run(rest, relay)

    async def _page(self, target: tuple[str, int], relay: CellRelay) -> dict[str, Any]:
        """`name?` / `name??`: IPython would page the help; the protocol drops payloads, so ask and page here."""
        name, detail = target
        await self.open_session(relay)
        helper = CellRelay(self, silent=True, execution_count=relay.execution_count)
        await self.run(introspect.inspect_cell(name, detail), helper, timeout=30)
        answer = introspect.parse_answer(helper.bundles) or {}
        reply = relay.ok()
        if answer.get("found"):
            reply["payload"] = [{"source": "page", "data": answer["data"], "start": 0}]
        else:
            relay.stream("stdout", f"Object `{name}` not found.\n")
        return reply

    # ------------------------------------------------------------------------------------------ introspection

    async def _ask(self, helper_code: str) -> dict[str, Any] | None:
        """Run a silent helper cell in the open sandbox within `introspection_timeout`; None if it cannot answer."""
        entry = self.sessions.entry()
        session = entry.session
        if session is None or entry.paused or self.lang.key != "python":
            return None
        relay = CellRelay(self, silent=True, execution_count=self.execution_count)
        try:
            await asyncio.wait_for(
                self._run_code(session, helper_code, relay, self.introspection_timeout + 1),
                self.introspection_timeout,
            )
        except Exception as exc:  # TimeoutError included
            self.log.debug("Sandbox introspection failed: %s", redact(str(exc), self.secrets()))
            return None
        return introspect.parse_answer(relay.bundles)

    async def do_complete(self, code: str, cursor_pos: int | None) -> dict[str, Any]:
        cursor_pos = len(code) if cursor_pos is None else cursor_pos
        if self.lang.key != "python":
            return introspect.empty_completions(cursor_pos)
        answer = await self._ask(introspect.complete_cell(code, cursor_pos))
        if answer is None:
            return introspect.local_completions(code, cursor_pos)
        return {
            "matches": answer.get("matches", []),
            "cursor_start": answer.get("cursor_start", cursor_pos),
            "cursor_end": answer.get("cursor_end", cursor_pos),
            "metadata": {"_jupyter_types_experimental": answer.get("types", [])},
            "status": "ok",
        }

    async def do_inspect(
        self, code: str, cursor_pos: int, detail_level: int = 0, omit_sections: Any = ()
    ) -> dict[str, Any]:
        reply: dict[str, Any] = {"status": "ok", "found": False, "data": {}, "metadata": {}}
        name = introspect.inspect_name(code, cursor_pos) if self.lang.key == "python" else ""
        if not name:
            return reply
        answer = await self._ask(introspect.inspect_cell(name, detail_level, omit_sections or ()))
        if answer and answer.get("found"):
            reply.update(found=True, data=answer.get("data") or {})
        return reply

    async def do_is_complete(self, code: str) -> dict[str, Any]:
        if self.lang.key != "python":
            return {"status": "unknown"}
        from IPython.core.inputtransformer2 import TransformerManager

        status, indent = TransformerManager().check_complete(code)
        reply: dict[str, Any] = {"status": status}
        if status == "incomplete":
            reply["indent"] = " " * (indent or 0)
        return reply

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
        history = self.history.query(
            hist_access_type,
            output=output,
            session=session,
            start=start,
            stop=stop,
            n=n,
            pattern=pattern,
            unique=unique,
        )
        return {"status": "ok", "history": history}

    # ------------------------------------------------------------------------------------------ shutdown

    async def do_shutdown(self, restart: bool) -> dict[str, Any]:
        """Runs on the control thread: stop the running cell and close the sandbox session on the main loop, which
        owns it. Restart: a fresh context in the same sandbox. Shutdown: kill the sandbox unless it is kept."""
        loop = self._loop
        try:
            if loop is not None and loop.is_running():
                future = asyncio.run_coroutine_threadsafe(self._close(restart), loop)
                await asyncio.wait_for(asyncio.wrap_future(future), 20)
            else:
                await self.sessions.shutdown(restart)
        except Exception as exc:
            self.log.warning("Scalebox kernel shutdown: %s", redact(str(exc), self.secrets()))
        return {"status": "ok", "restart": restart}

    async def _close(self, restart: bool) -> None:
        self._interrupt_cell(remote=False)  # the sandbox's kernel is restarted, or let go of, next
        await self.channel.close()
        await self.sessions.shutdown(restart)


@dataclass
class _CellParts:
    """What runs cells, built together on first use (`ScaleboxKernel._cells`)."""

    sandbox: NotebookSandbox
    sessions: NotebookSessions
    channel: SandboxChannel
    run_later: Background
