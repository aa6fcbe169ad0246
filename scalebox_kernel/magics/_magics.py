"""`%%scalebox` (a cell in the sandbox), `%scalebox SUBCOMMAND` and `%autoscalebox`."""

from __future__ import annotations

import atexit
import contextlib
import shlex
from collections.abc import Coroutine
from dataclasses import dataclass
from typing import Any, TypeVar

from IPython.core.error import UsageError
from IPython.core.magic import Magics, line_cell_magic, line_magic, magics_class
from traitlets import Bool, Float

from ..client import ExecutionError, portal
from ..config import ScaleboxConfig
from ..errors import ExecutionTimeout, SandboxNotFound, ScaleboxError
from ..session import SandboxSession, canonical_language
from ..subcommands import COMMANDS_HELP, Commands, Sessions, SubcommandError, cell_parser, parse_env
from ._channel import CellChannels
from ._display import Relay, ScaleboxInterrupted, cell_error, from_execution_error, from_scalebox_error
from ._transfer import receive, send

T = TypeVar("T")

HELP = f"""\
Scalebox magics: run cells in a sandbox (scalebox-local, or the Scalebox cloud with SCALEBOX_API_KEY).

%%scalebox [--language L] [--session NAME] [--timeout S] [--env K=V ...] [-i VAR ...] [-o VAR ...] [--unsafe-pickle]
    Run the cell in the sandbox; output, plots and errors show here as it runs. -i sends local variables in
    before the cell (pickle for Python, JSON for other languages). -o brings sandbox variables back after it in
    safe formats only: JSON, bytes, numpy arrays as .npy (no object dtypes), pandas DataFrames and Series as
    Arrow (pyarrow on both sides) or pandas' JSON table. --unsafe-pickle lets -o bring Python values back as
    pickles instead: any value, exactly, but unpickling runs whatever code the sandbox chose on this machine.
%autoscalebox on [options] | off
    Run every following cell in the sandbox (cells starting with % still run here).

{COMMANDS_HELP.format(exit="this shell exits")}"""


@dataclass
class _Outcome:
    """What the magics need of a cell run over the Jupyter endpoint (as of an Execution): its error, if any."""

    error: ExecutionError | None


@magics_class
class ScaleboxMagics(Magics):
    """Run cells in Scalebox sandboxes and manage them: `%scalebox help` lists everything."""

    max_transfer_mb = Float(50.0, config=True, help="Largest value (serialised, in MB) that -i/-o move.")
    progress_delay = Float(0.5, config=True, help="Seconds a wait must last before a progress bar appears.")
    use_widgets = Bool(
        None, allow_none=True, config=True, help="Use ipywidgets for progress and status (default: in kernels)."
    )

    def __init__(self, shell: Any = None, **kwargs: Any) -> None:
        super().__init__(shell=shell, **kwargs)
        self.sessions = Sessions(ScaleboxConfig.load(config=shell.config if shell is not None else None))
        self.auto_args: str | None = None  # set while %autoscalebox is on
        self.channels = CellChannels()  # cells over the sandboxes' Jupyter endpoints (on the portal's loop)
        atexit.register(self.at_exit)

    # ------------------------------------------------------------------------------------------ plumbing

    @property
    def widgets(self) -> bool:
        if self.use_widgets is not None:
            return bool(self.use_widgets)
        if getattr(self.shell, "kernel", None) is None:
            return False
        try:
            import ipywidgets  # noqa: F401
        except ImportError:
            return False
        return True

    @property
    def namespace(self) -> dict[str, Any]:
        assert self.shell is not None
        ns: dict[str, Any] = self.shell.user_ns
        return ns

    def secrets(self) -> list[str]:
        return self.sessions.secrets()

    @property
    def _allow_stdin(self) -> bool:
        """Whether input() in the sandbox can be answered here (a terminal can; a kernel when its frontend can)."""
        kernel = getattr(self.shell, "kernel", None)
        return bool(getattr(kernel, "_allow_stdin", True)) if kernel is not None else True

    def relay(self, *, show_main_result: bool = True) -> Relay:
        return Relay(widgets=self.widgets, progress_delay=self.progress_delay, show_main_result=show_main_result)

    def run(self, coro: Coroutine[Any, Any, T], relay: Relay | None = None) -> T:
        """Run a coroutine on the portal, showing its output and progress here; errors become short messages."""
        relay = relay or self.relay()
        try:
            return relay.run(coro)
        except SubcommandError as exc:
            raise UsageError(str(exc)) from None
        except ScaleboxError as exc:
            raise from_scalebox_error(exc, self.secrets()) from None

    def at_exit(self) -> None:
        """Kill the sandboxes this shell created (not those it attached to, nor those asked to be kept)."""
        with contextlib.suppress(BaseException):
            portal.run(self.channels.close())
        with contextlib.suppress(BaseException):
            portal.run(self.sessions.shutdown())

    # ------------------------------------------------------------------------------------------ magics

    @line_cell_magic
    def scalebox(self, line: str, cell: str | None = None) -> Any:
        """%%scalebox [--language L] [--session NAME] [--timeout S] [--env K=V ...] [-i VAR ...] [-o VAR ...]
        runs the cell in a sandbox; %scalebox SUBCOMMAND manages sandboxes (%scalebox help)."""
        if cell is None:
            return self.subcommand(line)
        return self.run_cell(line, cell)

    @line_magic
    def autoscalebox(self, line: str) -> None:
        """%autoscalebox on [%%scalebox options] | off: route every following cell to the sandbox."""
        words = line.strip().split(None, 1)
        if not words or words[0] not in ("on", "off"):
            raise UsageError("usage: %autoscalebox on [--session NAME] [--language L] ...  |  %autoscalebox off")
        if words[0] == "off":
            self.auto_args = None
            print("Cells run locally again.")
            return
        args = words[1] if len(words) > 1 else ""
        self._options(args)  # fail now, not on every cell
        self.auto_args = args
        print("Every cell now runs in the sandbox (lines starting with % still run here; %autoscalebox off to stop).")

    def route_cell(self, lines: list[str]) -> list[str]:
        """Input transformer: while %autoscalebox is on, a cell becomes a %%scalebox cell (magic lines excepted)."""
        if self.auto_args is None:
            return lines
        first = next((line for line in lines if line.strip()), "")
        if not first or first.lstrip().startswith("%"):
            return lines
        return [f"%%scalebox {self.auto_args}\n", *lines]

    # ------------------------------------------------------------------------------------------ %%scalebox

    @staticmethod
    def _options(line: str) -> Any:
        try:
            return cell_parser().parse_args(shlex.split(line))
        except (SubcommandError, ValueError) as exc:
            raise UsageError(str(exc)) from None

    def run_cell(self, line: str, cell: str) -> Any:
        opts = self._options(line)
        entry = self.sessions.entry(opts.session)
        language = canonical_language(opts.language or entry.language)
        names = [*opts.inputs, *opts.outputs]
        if opts.unsafe_pickle and not opts.outputs:
            raise UsageError("--unsafe-pickle applies to -o: name the variables to bring back")
        bad = [n for n in names if not n.isidentifier()]
        if bad:
            raise UsageError(f"-i/-o take variable names, not {', '.join(bad)}")
        missing = [n for n in opts.inputs if n not in self.namespace]
        if missing:
            raise UsageError(f"-i: no local variable named {', '.join(missing)}")
        inputs = {name: self.namespace[name] for name in opts.inputs}
        try:
            envs = {**entry.envs, **parse_env(opts.env)}
        except SubcommandError as exc:
            raise UsageError(str(exc)) from None
        relay = self.relay(show_main_result=False)

        async def send_inputs(session: SandboxSession) -> None:
            for name, value in inputs.items():
                await send(session, name, value, language, limit_mb=self.max_transfer_mb, use_pickle=True)

        async def over_channel() -> tuple[SandboxSession, Any] | None:
            """The cell over the sandbox's Jupyter endpoint (None: take the ExecutionService path)."""
            if self.sessions.config.channel == "execute" or envs or language != "python":
                # Env vars for the cell are applied on the ExecutionService path, and other languages' output
                # is made uniform there (results as Out[n], errors with their names), which these cells rely on.
                return None
            paused, entry.paused = entry.paused, False
            for attempt in range(2):
                session = await self.sessions.open(entry, relay, language)
                if paused:  # paused here (%scalebox pause): a cell resumes it, as on the ExecutionService path
                    await session.resume()
                    paused = False
                try:
                    await send_inputs(session)
                    reply = await self.channels.run(
                        session, language, cell, relay, allow_stdin=self._allow_stdin, timeout=opts.timeout
                    )
                except SandboxNotFound:  # gone before the cell ran: a new one (announced), as sessions.run does
                    if attempt:
                        raise
                    await self.sessions.lost(entry)
                    continue
                if reply is None:
                    return None
                error = None
                if reply.get("status") == "aborted":
                    why = "the sandbox's kernel did not run this cell: it was aborted after an earlier error"
                    error = ExecutionError("CellAborted", why, f"CellAborted: {why}")
                elif reply.get("status") == "error":
                    traceback = reply.get("traceback") or []
                    error = ExecutionError(
                        str(reply.get("ename", "")), str(reply.get("evalue", "")), "\n".join(traceback)
                    )
                return session, error
            return None

        async def job() -> tuple[Any, dict[str, Any]]:
            done = await over_channel()
            if done is not None:
                session, error = done
                outputs = {}
                if error is None:
                    for name in opts.outputs:
                        outputs[name] = await receive(
                            session, name, language, limit_mb=self.max_transfer_mb, allow_pickle=opts.unsafe_pickle
                        )
                return _Outcome(error), outputs
            session, execution = await self.sessions.run(
                entry,
                relay,
                cell,
                language=language,
                prepare=send_inputs,
                envs=envs,
                on_stdout=relay.on_stdout,
                on_stderr=relay.on_stderr,
                on_result=relay.on_result,
                timeout=opts.timeout,
            )
            outputs = {}
            if execution.error is None:
                for name in opts.outputs:
                    outputs[name] = await receive(
                        session, name, language, limit_mb=self.max_transfer_mb, allow_pickle=opts.unsafe_pickle
                    )
            return execution, outputs

        try:
            execution, outputs = relay.run(job())
        except KeyboardInterrupt:
            where = entry.session.session_id if entry.session else "the sandbox"
            raise ScaleboxInterrupted(f"the cell was interrupted in {where}; its state is kept") from None
        except ExecutionTimeout:
            limit = opts.timeout if opts.timeout is not None else self.sessions.config.execution_timeout
            raise cell_error(
                "ExecutionTimeout",
                f"the cell ran longer than {limit:g} s and was interrupted; the sandbox keeps its state",
            ) from None
        except ScaleboxError as exc:
            raise from_scalebox_error(exc, self.secrets()) from None
        self.namespace.update(outputs)
        if execution.error is not None:
            raise from_execution_error(execution.error)
        return relay.main_result

    # ------------------------------------------------------------------------------------------ %scalebox

    def subcommand(self, line: str) -> None:
        """One `%scalebox` line, carried out on the portal by the subcommands both doors share."""
        relay = self.relay()
        try:
            self.run(Commands(self.sessions, relay, HELP).run(line), relay)
        except KeyboardInterrupt:
            raise ScaleboxInterrupted("the %scalebox command was stopped") from None
