"""What the magics show: remote output relayed on the shell's own thread, progress bars, compact errors."""

from __future__ import annotations

import getpass
import queue
import sys
import time
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, TypeVar

from IPython.core.error import StdinNotImplementedError
from IPython.display import clear_output, display, publish_display_data

from ..client import ExecutionError, OutputMessage, Result, portal
from ..errors import ScaleboxError, redact
from ..session import ProgressInfo
from ..session._progress import ProgressCallback
from ..subcommands import StatusPanel, status_widget

T = TypeVar("T")
Emit = Callable[[str, Any], None]

#: Stages worth a progress bar (waits the user did not write code for).
WAITING_STAGES = frozenset({"connecting", "uploading", "installing", "downloading"})


class ScaleboxCellError(Exception):
    """A cell (or command) failed inside the sandbox. IPython shows the remote traceback, without local frames."""

    def __init__(self, name: str, value: str, traceback: list[str]) -> None:
        super().__init__(value)
        self.name = name
        self.value = value
        self.traceback_lines = traceback

    def _render_traceback_(self) -> list[str]:
        return self.traceback_lines


class ScaleboxInterrupted(KeyboardInterrupt):
    """The cell was interrupted here, so it was interrupted in the sandbox too (whose state is kept)."""

    def _render_traceback_(self) -> list[str]:
        return [f"\x1b[0;31mKeyboardInterrupt\x1b[0m: {self}"]


_error_classes: dict[str, type[ScaleboxCellError]] = {}


def cell_error(name: str, value: str, traceback: str | list[str] | None = None) -> ScaleboxCellError:
    """A ScaleboxCellError whose class carries the remote exception's name (so `ename` is `ZeroDivisionError`)."""
    name = name if name.isidentifier() else "ScaleboxError"
    cls = _error_classes.get(name)
    if cls is None:
        cls = _error_classes[name] = type(name, (ScaleboxCellError,), {"__module__": "scalebox"})
    lines = traceback.splitlines() if isinstance(traceback, str) else list(traceback or [])
    if not lines:
        lines = [f"\x1b[0;31m{name}\x1b[0m: {value}" if value else f"\x1b[0;31m{name}\x1b[0m"]
    return cls(name, value, lines)


def from_execution_error(error: ExecutionError) -> ScaleboxCellError:
    return cell_error(error.name or "Error", error.value, error.traceback)


def from_scalebox_error(exc: ScaleboxError, secrets: list[str]) -> ScaleboxCellError:
    """A short error for the user (no local traceback) from a client/session error; secrets redacted."""
    return cell_error(type(exc).__name__, redact(str(exc), secrets))


class ProgressBar:
    """A progress bar for long waits: an ipywidgets bar in a kernel, a `\\r` line on stderr elsewhere; removed
    when done."""

    def __init__(self, widgets: bool) -> None:
        self.widgets = widgets
        self._bar: Any = None
        self._width = 0

    def show(self, info: ProgressInfo) -> None:
        label = info.message[:90]
        if self.widgets:
            import ipywidgets

            if self._bar is None:
                self._bar = ipywidgets.FloatProgress(
                    value=info.percent, min=0, max=100, description=label, style={"description_width": "initial"}
                )
                display(self._bar)
            else:
                self._bar.value = info.percent
                self._bar.description = label
            return
        filled = int(info.percent / 5)
        line = f"\r{label} [{'#' * filled}{'.' * (20 - filled)}] {info.percent:3.0f}%"
        self._width = max(self._width, len(line))
        sys.stderr.write(line.ljust(self._width))
        sys.stderr.flush()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        if self._width:
            sys.stderr.write("\r" + " " * self._width + "\r")
            sys.stderr.flush()
            self._width = 0


def run_now(coro: Coroutine[Any, Any, Any], done: Callable[[Any], None]) -> None:
    """The status panel's runner: a button click waits (on the shell's thread) for its action on the portal."""
    try:
        result = portal.run(coro)
    except Exception as exc:
        result = exc
    done(result)


class Relay:
    """Runs a coroutine on the portal while this (the shell's) thread shows what it emits: stdout, stderr, rich
    results, progress and panels, in order, so output lands in the running cell. Ctrl-C / interrupt cancels the
    coroutine, which closes its stream; the server then interrupts the sandbox's kernel. It is the magics'
    `subcommands.Output`."""

    def __init__(self, *, widgets: bool, progress_delay: float = 0.5, show_main_result: bool = True) -> None:
        self.widgets = widgets
        self.progress_delay = progress_delay
        self.show_main_result = show_main_result
        self.main_result: Result | None = None
        self._events: queue.SimpleQueue[tuple[str, Any]] = queue.SimpleQueue()
        self._progress: ProgressInfo | None = None
        self._stage_t0 = 0.0
        self._bar = ProgressBar(widgets)

    def emit(self, kind: str, value: Any) -> None:
        """Thread-safe: queue something to show (`stdout`, `stderr`, `result`, `progress`)."""
        self._events.put((kind, value))

    # callbacks for run_code / install / commands, called on the portal's thread
    def on_stdout(self, message: OutputMessage | str) -> None:
        self.emit("stdout", str(message))

    def on_stderr(self, message: OutputMessage | str) -> None:
        self.emit("stderr", str(message))

    def on_result(self, result: Result) -> None:
        self.emit("result", result)

    def on_progress(self, info: ProgressInfo) -> None:
        self.emit("progress", info)

    # subcommands.Output, called on the portal's thread
    def stream(self, name: str, text: str) -> None:
        self.emit(name, text)

    async def progress(self, work: Callable[[ProgressCallback], Awaitable[T]], what: str) -> T:
        return await work(self.on_progress)

    def panel(self, panel: StatusPanel) -> None:
        self.emit("panel", panel)

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        future = portal.submit(coro)
        try:
            while True:
                try:
                    kind, value = self._events.get(timeout=0.05)
                except queue.Empty:
                    if future.done():
                        break
                    self._tick()
                    continue
                self._show(kind, value)
        except KeyboardInterrupt:
            future.cancel()
            deadline = time.monotonic() + 10
            while not future.done() and time.monotonic() < deadline:
                time.sleep(0.02)
            self._drain()
            raise
        finally:
            self._bar.close()
        self._drain()
        return future.result()

    def _drain(self) -> None:
        while True:
            try:
                kind, value = self._events.get_nowait()
            except queue.Empty:
                return
            self._show(kind, value)

    def _show_message(self, msg_type: str, content: dict[str, Any]) -> None:
        """A message of the sandbox kernel, shown as this kernel (or terminal) would show its own."""
        if msg_type == "stream":
            stream = sys.stderr if content.get("name") == "stderr" else sys.stdout
            stream.write(str(content.get("text", "")))
            stream.flush()
        elif msg_type in ("display_data", "update_display_data"):
            sys.stdout.flush()
            publish_display_data(
                content.get("data") or {},
                content.get("metadata") or {},
                transient=content.get("transient") or {},
                update=msg_type == "update_display_data",
            )
        elif msg_type == "clear_output":
            clear_output(wait=bool(content.get("wait")))
        elif msg_type == "execute_result":
            data = content.get("data") or {}
            count = content.get("execution_count")
            result = Result.from_bundle(data, execution_count=count, is_main_result=True)
            if self.show_main_result:
                display(data, raw=True)
            else:
                self.main_result = result

    def _tick(self) -> None:
        if self._progress is not None and time.monotonic() - self._stage_t0 >= self.progress_delay:
            self._bar.show(self._progress)

    def _show(self, kind: str, value: Any) -> None:
        if kind == "progress":
            info: ProgressInfo = value
            if info.stage not in WAITING_STAGES or info.percent >= 100:
                self._progress = None
                self._bar.close()
                return
            if self._progress is None or info.stage != self._progress.stage:
                self._stage_t0 = time.monotonic() - info.stage_elapsed_ms / 1000
            self._progress = info
            self._tick()
            return
        if kind in ("stdout", "stderr"):
            self._bar.close()
            stream = sys.stdout if kind == "stdout" else sys.stderr
            stream.write(value)
            stream.flush()
        elif kind == "panel":
            self._bar.close()
            display(status_widget(value, run_now))
        elif kind == "jupyter":
            self._bar.close()
            self._show_message(*value)
        elif kind == "input":
            prompt, password, answer = value
            self._bar.close()
            try:
                text = getpass.getpass(prompt) if password else input(prompt)
            except (EOFError, KeyboardInterrupt, StdinNotImplementedError):
                text = ""
            answer(text)
        elif kind == "result":
            result: Result = value
            if result.is_main_result and not self.show_main_result:
                self.main_result = result
                return
            self._bar.close()
            display(result.to_bundle(), raw=True)
