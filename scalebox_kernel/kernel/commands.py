"""The Scalebox kernel's door onto the shared `%scalebox` subcommands (`scalebox_kernel.subcommands`): its named
sessions (the `default` one is the notebook's own sandbox), its output (messages of the running cell), and what
carries out a cell's `%scalebox` lines and `%%scalebox` cells (`cell_syntax` finds them)."""

from __future__ import annotations

import asyncio
import contextlib
import shlex
from collections.abc import Awaitable, Callable, Coroutine
from typing import TYPE_CHECKING, Any, TypeVar

from ..client import AsyncSandbox
from ..errors import SandboxNotFound
from ..session import SandboxSession
from ..session._progress import ProgressCallback
from ..subcommands import (
    COMMANDS_HELP,
    DEFAULT,
    Commands,
    NamedSession,
    Output,
    Sessions,
    StatusPanel,
    SubcommandError,
    cell_parser,
    parse_env,
    status_widget,
)
from .relay import CellRelay, OpeningProgress
from .sandbox import NotebookSandbox

if TYPE_CHECKING:
    from .kernel import ScaleboxKernel

T = TypeVar("T")

HELP = f"""\
In the Scalebox kernel every cell runs in the current session's sandbox (at first the notebook's own, which a
restarted kernel re-attaches to). %scalebox lines at the top of a cell run here, in the kernel:

%%scalebox [--language L] [--session NAME] [--timeout S] [--env K=V ...]   (the cell's first line)
    run the rest of the cell in language L, in the same sandbox (or in session NAME)

{COMMANDS_HELP.format(exit="the kernel shuts down")}"""


class CellOutput:
    """The kernel's `subcommands.Output`: stream and display_data messages of the running cell."""

    def __init__(self, kernel: ScaleboxKernel, relay: CellRelay) -> None:
        self.kernel = kernel
        self.relay = relay

    @property
    def widgets(self) -> bool:
        return not self.relay.silent and self.kernel.widgets_ready()

    def stream(self, name: str, text: str) -> None:
        self.relay.stream(name, text)

    async def progress(self, work: Callable[[ProgressCallback], Awaitable[T]], what: str) -> T:
        shown = OpeningProgress(self.relay, self.kernel.progress_delay, what)
        return await shown.wait(work(shown.update))

    def panel(self, panel: StatusPanel) -> None:
        widget = status_widget(panel, self.kernel.run_later)
        self.relay.display(widget._repr_mimebundle_())


class NotebookSessions(Sessions):
    """The kernel's named sessions. `default` is the notebook's sandbox (`NotebookSandbox`): remembered for the
    notebook, re-attached by a new kernel process, killed at shutdown unless kept; `close` forgets it, and the
    next cell opens a new one."""

    exit_event = "the kernel shuts down"

    def __init__(self, notebook: NotebookSandbox, kernel_name: str) -> None:
        super().__init__(notebook.config, notebook.lang.wire)
        self.notebook = notebook
        self.kernel_name = kernel_name
        self.open_timeout = notebook.open_timeout
        self.entry(DEFAULT).keep = notebook.keep
        self.describe_channel: Callable[[NamedSession], str] | None = None  # set by the kernel

    def channel_of(self, entry: NamedSession) -> str | None:
        return self.describe_channel(entry) if self.describe_channel is not None else None

    def metadata(self, entry: NamedSession) -> dict[str, str]:
        return {"scalebox_kernel": self.kernel_name, "scalebox_kernel_session": entry.name}

    async def _open(self, entry: NamedSession, out: Output, replace_missing: bool) -> SandboxSession:
        if entry.name != DEFAULT or not isinstance(out, CellOutput):
            return await super()._open(entry, out, replace_missing)
        session = await self.notebook.open(  # says itself when it replaced an expired sandbox
            out.relay,
            create={k: v for k, v in entry.create.items() if k != "envs"},
            envs=entry.create.get("envs"),
            timeout=entry.timeout,
        )
        entry.session, entry.session_id, entry.keep = session, session.session_id, self.notebook.keep
        return session

    async def lost(self, entry: NamedSession) -> None:
        if entry.name == DEFAULT:
            self.notebook.lost()
        await super().lost(entry)

    def lifetime_rows(self, entry: NamedSession, session: SandboxSession) -> list[tuple[str, str]]:
        if entry.name != DEFAULT:
            return []
        notebook = self.notebook
        if session.pinned:
            alive = "until its end above (set by %scalebox timeout: not extended)"
        else:
            alive = f"while this kernel runs (its {session.timeout} s are renewed before they end)"
        idle = notebook.idle_pause
        pause = f"after {idle:g} s without a cell (SCALEBOX_IDLE_PAUSE); the next cell resumes it" if idle else "off"
        if notebook.idle_paused_at is not None:
            pause += " (paused now, for idleness)"
        end = "kept when the kernel shuts down" if entry.keep else "killed when the kernel shuts down"
        return [("kept alive", alive), ("idle pause", pause), ("real end", end)]

    def set_keep(self, entry: NamedSession, keep: bool) -> None:
        entry.keep = keep
        if entry.name == DEFAULT:
            self.notebook.keep = keep
            self.notebook.remember()

    async def close(self, entry: NamedSession, kill: bool = True) -> None:
        if entry.name != DEFAULT:
            return await super().close(entry, kill)
        notebook = self.notebook
        sandbox_id = entry.sandbox_id or notebook.recall().get("sandbox_id")
        notebook.store.forget(notebook.notebook, notebook.server, notebook.lang.key)
        session, notebook.session, entry.session, entry.session_id = entry.session, None, None, None
        if sandbox_id and kill:  # before the kill: a cell that opens the next sandbox meanwhile must say it
            self.closed[DEFAULT] = str(sandbox_id)
        with contextlib.suppress(SandboxNotFound):
            if session is not None:
                await session.close(kill=kill)
            elif sandbox_id and kill:
                await AsyncSandbox.kill_by_id(str(sandbox_id), config=self.config)

    async def shutdown(self, restart: bool = False) -> None:
        """Restart: a fresh context in the notebook's sandbox; shutdown: kill it unless kept. Other sessions
        this kernel created are killed unless kept; those it attached to are let go."""
        default = self.named.pop(DEFAULT, None)
        try:
            await super().shutdown(restart)
        finally:
            if default is not None:
                self.named[DEFAULT] = default
                default.session = None
            await self.notebook.close(restart)


async def run_line(kernel: ScaleboxKernel, line: str, relay: CellRelay) -> None:
    """Carry out one `%scalebox` line, its output going to the cell."""
    await Commands(kernel.sessions, CellOutput(kernel, relay), HELP).run(line[len("%scalebox") :])


async def run_magic(kernel: ScaleboxKernel, options: str, body: str, relay: CellRelay) -> dict[str, Any]:
    """A `%%scalebox` cell: its body runs in `--language` (default: the session's) in the current session's
    sandbox, or in `--session NAME`'s; the execute_reply content."""
    try:
        opts = cell_parser().parse_args(shlex.split(options))
    except ValueError as exc:
        raise SubcommandError(f"%%scalebox: {exc}") from None
    if opts.inputs or opts.outputs:
        raise SubcommandError(
            "-i/-o move values between a local Python namespace and the sandbox; in the Scalebox kernel every "
            "cell already runs in the sandbox (use the IPython extension in a Python kernel for -i/-o)"
        )
    entry = kernel.sessions.entry(opts.session)
    envs = {**entry.envs, **parse_env(opts.env)}
    return await kernel.run(
        body, relay, language=opts.language or entry.language, entry=entry, envs=envs, timeout=opts.timeout
    )


class Background:
    """Coroutines started from the kernel's loop (status panel clicks), kept referenced until they finish."""

    def __init__(self) -> None:
        self.tasks: set[asyncio.Future[Any]] = set()

    def __call__(self, coro: Coroutine[Any, Any, Any], done: Callable[[Any], None]) -> None:
        task = asyncio.ensure_future(coro)
        self.tasks.add(task)

        def finished(task: asyncio.Future[Any]) -> None:
            self.tasks.discard(task)
            if task.cancelled():
                done(asyncio.CancelledError("cancelled"))
            else:
                done(task.exception() or task.result())

        task.add_done_callback(finished)
