"""What a subcommand needs from the door it runs behind: somewhere to write text, show progress and put a panel."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, Protocol, TypeVar

from ..errors import ScaleboxError
from ..session._progress import ProgressCallback
from ._status import StatusPanel

T = TypeVar("T")


class SubcommandError(ScaleboxError):
    """A `%scalebox` line (or `%%scalebox` options) used wrongly; the message says how to use it. Doors show it
    as a UsageError."""


class Output(Protocol):
    """One door's output for the line or cell being run. Called on the loop that owns the sessions; each door
    makes sure the output lands in the running cell (the magics hand it to the shell's thread)."""

    @property
    def widgets(self) -> bool:
        """Whether an ipywidgets panel can be shown here."""
        ...

    def stream(self, name: str, text: str) -> None:
        """Text on `stdout` or `stderr`, as is."""

    async def progress(self, work: Callable[[ProgressCallback], Awaitable[T]], what: str) -> T:
        """Await `work(on_progress)`, showing its progress if it takes a while (`what` names the wait)."""
        ...

    def panel(self, panel: StatusPanel) -> None:
        """Show the status panel (only asked for when `widgets` is true)."""


def say(out: Output, text: str) -> None:
    """A line (or lines) of text on stdout."""
    out.stream("stdout", text.rstrip("\n") + "\n")


def streamer(out: Output, name: str) -> Callable[[Any], None]:
    """A callback for command or cell output (strings or OutputMessages) that writes it to `name`."""
    return lambda message: out.stream(name, str(message))
