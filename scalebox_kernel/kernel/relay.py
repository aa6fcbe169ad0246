"""One cell's output, published on iopub in the order it arrives from the sandbox, and the delay-gated
progress display shown while a sandbox is being opened."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Awaitable
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    from ..client import ExecutionError, OutputMessage, Result
    from .base import WireKernel as Kernel

T = TypeVar("T")


def split_traceback(traceback: str) -> list[str]:
    return traceback.split("\n") if traceback else []


class CellRelay:
    """Turns a running cell's events (stdout, stderr, results, error) into Jupyter messages for one request."""

    def __init__(
        self, kernel: Kernel, *, silent: bool, execution_count: int, parent: dict[str, Any] | None = None
    ) -> None:
        self.kernel = kernel
        self.parent = parent  # the request the output answers (default: the one being handled)
        self.silent = silent
        self.execution_count = execution_count
        self.published = 0  # output messages sent so far (a shown progress display included)
        self.main_text: str | None = None  # text/plain of the execute_result, for history
        self.bundles: list[dict[str, Any]] = []  # every result's bundle, kept for silent helper cells

    def _send(self, msg_type: str, content: dict[str, Any]) -> None:
        if self.silent:
            return
        if msg_type != "update_display_data":  # an update changes an output, it adds none
            self.published += 1
        if self.parent is None:
            self.kernel.send_response(self.kernel.iopub_socket, msg_type, content)
        elif self.kernel.session is not None:
            topic = self.kernel._topic(msg_type)
            self.kernel.session.send(self.kernel.iopub_socket, msg_type, content, parent=self.parent, ident=topic)

    def stream(self, name: str, text: str) -> None:
        if text:
            self._send("stream", {"name": name, "text": text})

    def on_stdout(self, message: OutputMessage) -> None:
        self.stream("stdout", message.line)

    def on_stderr(self, message: OutputMessage) -> None:
        self.stream("stderr", message.line)

    def on_result(self, result: Result) -> None:
        bundle = result.to_bundle()
        self.bundles.append(bundle)
        if not bundle:
            return
        if result.is_main_result:
            text = bundle.get("text/plain")
            self.main_text = text if isinstance(text, str) else None
            content = {"execution_count": self.execution_count, "data": bundle, "metadata": {}}
            self._send("execute_result", content)
        else:
            self._send("display_data", {"data": bundle, "metadata": {}, "transient": {}})

    def on_error(self, error: ExecutionError) -> None:
        self.error(error.name, error.value, split_traceback(error.traceback))

    def ok(self) -> dict[str, Any]:
        """The `execute_reply` content of a cell that ran without an error."""
        return {"status": "ok", "execution_count": self.execution_count, "payload": [], "user_expressions": {}}

    def error(self, ename: str, evalue: str, traceback: list[str]) -> dict[str, Any]:
        """Publish an `error` message and return the matching `execute_reply` content."""
        fields = {"ename": ename, "evalue": evalue, "traceback": traceback}
        self._send("error", fields)
        return {"status": "error", "execution_count": self.execution_count, **fields}

    def display(self, bundle: dict[str, Any], display_id: str | None = None, *, update: bool = False) -> None:
        transient = {"display_id": display_id} if display_id else {}
        self._send(
            "update_display_data" if update else "display_data",
            {"data": bundle, "metadata": {}, "transient": transient},
        )

    def clear(self) -> None:
        self._send("clear_output", {"wait": False})


class OpeningProgress:
    """A progress line shown only when opening the sandbox takes longer than `delay` seconds, then removed."""

    def __init__(self, relay: CellRelay, delay: float, what: str = "Opening a sandbox") -> None:
        self.relay = relay
        self.delay = delay
        self.what = what
        self.message = ""
        self.display_id: str | None = None
        self.started = time.monotonic()

    def _bundle(self) -> dict[str, Any]:
        seconds = time.monotonic() - self.started
        text = f"{self.what}… {self.message} ({seconds:.0f} s)".replace("…  ", "… ")
        return {"text/plain": text}

    def update(self, info: Any) -> None:
        """on_progress callback: remember the stage message, refresh the display if it is shown."""
        self.note(str(getattr(info, "message", "") or ""))

    def note(self, message: str) -> None:
        self.message = message
        if self.display_id:
            self.relay.display(self._bundle(), self.display_id, update=True)

    async def wait(self, awaitable: Awaitable[T]) -> T:
        """Await `awaitable`, showing progress if it takes long; the display is gone when this returns."""
        task = asyncio.ensure_future(awaitable)
        try:
            await asyncio.wait({task}, timeout=self.delay)
            if not task.done() and not self.relay.silent:
                self.display_id = uuid.uuid4().hex
                before = self.relay.published
                self.relay.display(self._bundle(), self.display_id)
                try:
                    return await task
                finally:
                    self._remove(before)
            return await task
        finally:
            if not task.done():
                task.cancel()

    def _remove(self, before: int) -> None:
        if self.relay.published == before + 1:
            self.relay.clear()  # the progress line is the cell's only output so far: leave no trace
            self.relay.published = before
        else:
            self.relay.display({"text/plain": ""}, self.display_id, update=True)
        self.display_id = None
